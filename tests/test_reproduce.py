"""`brn reproduce`: aggregation arithmetic, and a tiny real run (one setting, one seed, a few steps)."""

from __future__ import annotations

import json
import statistics

import pytest

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


def test_settings_match_the_paper_batches():
    assert (SETTINGS["iid-32"].batch_size, SETTINGS["iid-32"].sampler) == (32, "iid")
    assert (SETTINGS["micro-4"].batch_size, SETTINGS["micro-4"].microbatch) == (32, 4)
    assert SETTINGS["micro-2"].microbatch == 2
    assert SETTINGS["grouped-2"].sampler == "grouped:2"


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
        run_reproduce(ReproduceConfig(output=str(tmp_path / "x"), settings=["iid-64"]), progress=False)
    with pytest.raises(BrnError, match="no finished runs"):
        write_report(tmp_path)
