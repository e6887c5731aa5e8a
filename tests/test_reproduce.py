"""`brn reproduce`: aggregation arithmetic, and a tiny real run (one setting, one seed, a few steps)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from brn_cli.errors import BrnError
from brn_cli.recipes.reproduce import SETTINGS, aggregate, markdown_table


def _record(setting, method, seed, acc):
    return {"setting": setting, "method": method, "seed": seed, "steps": 10, "val_accuracy": acc}


def test_aggregate_mean_and_sample_std_per_setting_and_method():
    bn = [0.90, 0.92, 0.97]
    brn = [0.95, 0.96, 0.98]
    records = [_record("grouped-2", "batchnorm", s, a) for s, a in enumerate(bn)]
    records += [_record("grouped-2", "renorm", s, a) for s, a in enumerate(brn)]
    records += [_record("iid-32", "batchnorm", 0, 0.5)]
    rows = {r["setting"]: r for r in aggregate(records)}
    assert set(rows) == {"grouped-2", "iid-32"}  # settings without runs are left out
    g = rows["grouped-2"]
    assert g["batchnorm"]["mean"] == pytest.approx(100 * statistics.fmean(bn))
    assert g["batchnorm"]["std"] == pytest.approx(100 * statistics.stdev(bn))
    assert g["renorm"]["n"] == 3
    assert g["difference"] == pytest.approx(100 * (statistics.fmean(brn) - statistics.fmean(bn)))
    assert rows["iid-32"]["renorm"] is None and "difference" not in rows["iid-32"]
    table = markdown_table(list(rows.values()))
    assert "93.0 ± 3.6% (n=3)" in table  # 90, 92, 97 -> mean 93.0, sample std 3.61
    assert "+3.3 pts" in table
    assert SETTINGS["grouped-2"].paper in table and "50.0% (n=1)" in table


# The paper's batches (Ioffe 2017, section 4), stated here rather than read from SETTINGS: minibatches of 32
# (4.1), normalized in microbatches of 4 (4.2), or made of 16 labels x 2 examples each (4.3).
PAPER_BATCH = 32
PAPER_MICROBATCH = 4
PAPER_EXAMPLES_PER_LABEL = 2


def _drawn_batches(setting) -> tuple[list[list[int]], torch.Tensor]:
    """One epoch of the batches a run of `setting` trains on: the real sampler over the bundled digits."""
    from brn_cli.data.datasets import load_data
    from brn_cli.data.samplers import LabelBatchSampler
    from brn_cli.samples import SAMPLE_DATA

    labels = load_data(str(SAMPLE_DATA), seed=0).train_labels
    return list(LabelBatchSampler(labels, setting.batch_size, setting.sampler, seed=0)), labels


def _normalization_groups(batch_size: int, microbatch: int | None) -> int:
    """How many examples share statistics in a batch of `batch_size` with `microbatch` set on the layer:
    the largest n for which the first n outputs equal the layer run on those n examples alone."""
    from brn_cli.nn.layer import BatchRenorm2d

    x = torch.randn(batch_size, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    layer = BatchRenorm2d(3).train()
    layer.microbatch = microbatch
    with torch.no_grad():
        whole = layer(x)
        for n in range(2, batch_size + 1):
            alone = BatchRenorm2d(3).train()(x[:n])
            if n < batch_size and batch_size % n == 0 and torch.allclose(whole[:n], alone, atol=1e-5):
                return n
    return batch_size


def test_settings_draw_the_batches_their_names_and_the_paper_describe():
    """Each setting's batches as a run draws them, against its name ("grouped-K", "micro-K", "iid-B"), its
    description ("batch B = L labels x K examples") and the paper's batch composition."""
    for name, setting in SETTINGS.items():
        kind, number = name.split("-")
        batches, labels = _drawn_batches(setting)
        assert batches and all(len(b) == setting.batch_size for b in batches), name
        counts = [torch.bincount(labels[b], minlength=10) for b in batches]
        groups = _normalization_groups(setting.batch_size, setting.microbatch)
        if kind == "grouped":
            k = int(number)
            # every label in a batch has exactly K examples, and a batch covers only some of the labels
            assert all(set(c[c > 0].tolist()) == {k} for c in counts), name
            n_labels = setting.batch_size // k
            assert all(int((c > 0).sum()) == n_labels < 10 for c in counts), name
            assert f"batch {setting.batch_size} = {n_labels} labels x {k} examples" == setting.description
            assert groups == setting.batch_size, name  # the whole batch shares statistics
        else:
            # i.i.d.: no example twice in an epoch, and batches are not made of equal-size label groups
            flat = [i for b in batches for i in b]
            assert len(flat) == len(set(flat)), name
            assert any(len(set(c[c > 0].tolist())) > 1 for c in counts), name
            assert groups == (int(number) if kind == "micro" else setting.batch_size), name
            assert setting.batch_size == (PAPER_BATCH if kind == "micro" else int(number)), name
        if setting.paper_bn is not None:  # a setting the paper ran: its batches are the paper's
            assert setting.batch_size in (PAPER_BATCH, PAPER_BATCH // 2), name
            if kind == "micro":
                assert groups == PAPER_MICROBATCH, name
            if kind == "grouped":
                assert int(number) == PAPER_EXAMPLES_PER_LABEL, name
            assert (
                f"BN {setting.paper_bn:g}%" in setting.paper
                and f"BRN {setting.paper_brn:g}%" in setting.paper
            )


@pytest.mark.slow
def test_tiny_reproduction_runs_resumes_and_reports(run_cli, tmp_path):
    import torch

    out = tmp_path / "rep"
    threads = torch.get_num_threads()
    try:
        args = (
            "reproduce",
            "-o",
            out,
            "--settings",
            "micro-2",
            "--seeds",
            "3",
            "--steps",
            "3",
            "--threads",
            "1",
        )
        res = run_cli(*args)
        assert res.code == 0, res.err
        for name in ("results.json", "results.md", "results.png"):
            assert (out / name).is_file()
        report = json.loads((out / "results.json").read_text())
        assert [r["setting"] for r in report["rows"]] == ["micro-2"]
        runs = {r["method"]: r for r in report["runs"]}
        assert set(runs) == {"batchnorm", "renorm"}
        for method, run in runs.items():
            assert run["steps"] == 3 and run["seed"] == 3 and 0.0 <= run["val_accuracy"] <= 1.0
            cfg = json.loads((out / "runs" / "micro-2" / method / "seed3" / "config.json").read_text())
            assert cfg["microbatch"] == 2 and cfg["batch_size"] == 32
            assert cfg["rmax_schedule"] == {"batchnorm": "off", "renorm": "paper-scaled"}[method]
        # both methods started from the same random initialisation
        assert (out / "init" / "seed3.pt").is_file()

        # finished runs are not repeated
        marker = out / "runs" / "micro-2" / "renorm" / "seed3" / "run.json"
        stamp = marker.stat().st_mtime_ns
        again = run_cli(*args)
        assert again.code == 0 and marker.stat().st_mtime_ns == stamp
        # ... and a different length into the same folder is refused instead of being mixed in
        other = run_cli(*args[:-4], "--steps", "4", "--threads", "1")
        assert other.code != 0 and "steps/lr/momentum" in other.err and len(other.err_lines) == 1
    finally:
        torch.set_num_threads(threads)


def test_reproduce_rejects_unknown_settings_and_empty_report(tmp_path):
    from brn_cli.recipes.reproduce import ReproduceConfig, run_reproduce, write_report

    with pytest.raises(BrnError, match="unknown setting"):
        run_reproduce(ReproduceConfig(output=str(tmp_path / "x"), settings=["iid-64"]))
    with pytest.raises(BrnError, match="no finished runs"):
        write_report(tmp_path)
