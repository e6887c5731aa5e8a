"""`brn reproduce`: the grid's design and size, the batches it draws, the step-decay rate, the GroupNorm
swap, the report arithmetic, and the --quick flow end to end (every method, baseline, curve and resume)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from brn_cli.errors import BrnError
from brn_cli.recipes.reproduce_grid import ARCHS, COMPOSITIONS, LR_REGIMES, Cell, full_grid, quick_grid

# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------

AXES = ("arch", "composition", "lr_schedule", "alpha", "steps")


def _axes(cell: Cell) -> tuple:
    return tuple(getattr(cell, a) for a in AXES)


def test_grid_is_a_full_main_slice_plus_one_axis_variations():
    cells = full_grid()
    assert len({c.name for c in cells}) == len(cells)  # no cell twice
    main = [c for c in cells if c.group == "main"]
    assert {(c.composition, c.lr_schedule) for c in main} == {
        (comp, lr) for comp in COMPOSITIONS for lr in LR_REGIMES
    }
    assert {(c.arch, c.alpha, c.steps) for c in main} == {("plain_cnn", 0.01, 800)}
    main_axes = {_axes(c) for c in main}
    for cell in cells:
        if cell.group == "main":
            continue
        # a variation differs from some main-slice cell in exactly the axis its group names
        changed = [[a for a, x, y in zip(AXES, _axes(cell), ref, strict=True) if x != y] for ref in main_axes]
        axis = {"alpha": "alpha", "arch": "arch", "steps": "steps"}[cell.group]
        assert [axis] in changed, cell.name
    # the ranges: both alphas, every bundled architecture, 400-1600 steps
    assert {c.alpha for c in cells} == {0.01, 0.1}
    assert {c.arch for c in cells} == set(ARCHS)
    assert {c.steps for c in cells} == {400, 800, 1600}


def test_full_grid_fits_an_hour_on_two_workers_and_shares_groupnorm_runs(tmp_path):
    from brn_cli.recipes.reproduce import ReproduceConfig, plan, plan_summary

    config = ReproduceConfig(output=str(tmp_path / "g"), jobs=2)
    jobs = plan(config)
    assert len({j["run_dir"] for j in jobs}) == len(jobs)
    assert {j["seed"] for j in jobs} == {0, 1, 2}
    by_method = {m: [j for j in jobs if j["method"] == m] for m in ("batchnorm", "renorm", "groupnorm")}
    assert len(by_method["batchnorm"]) == len(by_method["renorm"]) == 3 * len(full_grid())
    # GroupNorm has neither moving averages nor microbatches: iid-32, micro-4 and micro-2 share one run
    assert len(by_method["groupnorm"]) < len(by_method["batchnorm"])
    summary = plan_summary(config)
    assert summary["runs"] == len(jobs) and summary["todo"] == len(jobs)
    assert summary["estimate_seconds"] < 3600
    assert jobs[0]["cell"]["group"] == "main"  # the main slice runs first


# The paper's batches (Ioffe 2017, section 4), stated here rather than read from COMPOSITIONS: minibatches of
# 32 (4.1), normalized in microbatches of 4 (4.2), or made of 16 labels x 2 examples each (4.3).
PAPER_BATCH = 32
PAPER_MICROBATCH = 4
PAPER_EXAMPLES_PER_LABEL = 2


def _drawn_batches(comp) -> tuple[list[list[int]], torch.Tensor]:
    """One epoch of the batches a run of `comp` trains on: the real sampler over the bundled digits."""
    from brn_cli.data.datasets import load_data
    from brn_cli.data.samplers import LabelBatchSampler
    from brn_cli.samples import SAMPLE_DATA

    labels = load_data(str(SAMPLE_DATA), seed=0).train_labels
    return list(LabelBatchSampler(labels, comp.batch_size, comp.sampler, seed=0)), labels


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


def test_compositions_draw_the_batches_their_names_and_the_paper_describe():
    """Each composition's batches as a run draws them, against its name ("grouped-K", "micro-K", "iid-B"),
    its description ("batch B = L labels x K examples") and the paper's batch composition."""
    for name, comp in COMPOSITIONS.items():
        kind, number = name.split("-")
        batches, labels = _drawn_batches(comp)
        assert batches and all(len(b) == comp.batch_size for b in batches), name
        counts = [torch.bincount(labels[b], minlength=10) for b in batches]
        groups = _normalization_groups(comp.batch_size, comp.microbatch)
        assert groups == comp.group, name
        if kind == "grouped":
            k = int(number)
            # every label in a batch has exactly K examples, and a batch covers only some of the labels
            assert all(set(c[c > 0].tolist()) == {k} for c in counts), name
            n_labels = comp.batch_size // k
            assert all(int((c > 0).sum()) == n_labels < 10 for c in counts), name
            noun = "label" if n_labels == 1 else "labels"
            assert f"batch {comp.batch_size} = {n_labels} {noun} x {k} examples" == comp.description
            assert groups == comp.batch_size, name  # the whole batch shares statistics
        else:
            # i.i.d.: no example twice in an epoch, and batches are not made of equal-size label groups
            flat = [i for b in batches for i in b]
            assert len(flat) == len(set(flat)), name
            assert any(len(set(c[c > 0].tolist())) > 1 for c in counts), name
            assert groups == (int(number) if kind == "micro" else comp.batch_size), name
            assert comp.batch_size == (PAPER_BATCH if kind == "micro" else int(number)), name
        if comp.paper_bn is not None:  # a composition the paper ran: its batches are the paper's
            assert comp.batch_size in (PAPER_BATCH, PAPER_BATCH // 2), name
            if kind == "micro":
                assert groups == PAPER_MICROBATCH, name
            if kind == "grouped":
                assert int(number) == PAPER_EXAMPLES_PER_LABEL, name
            assert f"BN {comp.paper_bn:g}%" in comp.paper and f"BRN {comp.paper_brn:g}%" in comp.paper
    # the paper's "training mode" number stands beside our batch-statistics baseline
    assert "batch statistics 76.5%" in COMPOSITIONS["grouped-2"].paper


# ----------------------------------------------------------------------------------------------
# Step decay and the GroupNorm swap
# ----------------------------------------------------------------------------------------------


def test_step_lr_schedule_decays_by_094_at_81_even_steps():
    from brn_cli.train.finetune import LR_SCHEDULES, lr_at

    assert "step" in LR_SCHEDULES
    kw = {"base_lr": 1.0, "total_steps": 810, "kind": "step"}
    assert lr_at(0, **kw) == 1.0 and lr_at(9, **kw) == 1.0  # 810 / 81 = 10 updates per stair
    assert lr_at(10, **kw) == pytest.approx(0.94) and lr_at(19, **kw) == pytest.approx(0.94)
    assert lr_at(20, **kw) == pytest.approx(0.94**2)
    assert lr_at(809, **kw) == pytest.approx(0.94**80)  # ends at 0.7 % of the peak, not at zero
    assert lr_at(5000, **kw) == pytest.approx(0.94**80)
    values = [lr_at(s, **kw) for s in range(810)]
    assert len(set(values)) == 81 and values == sorted(values, reverse=True)
    # after a warm-up the stairs span the remaining updates
    warm = {**kw, "warmup_steps": 10, "total_steps": 820}
    assert lr_at(4, **warm) == pytest.approx(0.5) and lr_at(10, **warm) == 1.0
    assert lr_at(20, **warm) == pytest.approx(0.94)


def test_step_lr_schedule_is_accepted_by_finetune_config():
    from brn_cli.train.config import FinetuneConfig, validate

    validate(FinetuneConfig(checkpoint="c", data="d", output="o", steps=5, lr_schedule="step"))
    with pytest.raises(BrnError, match="lr_schedule"):
        validate(FinetuneConfig(checkpoint="c", data="d", output="o", steps=5, lr_schedule="steps"))


def test_group_count_rule():
    from brn_cli.nn.groupnorm import group_count

    # 32 groups at most, at least 4 channels a group, a divisor of the channels; 1 group below 8 channels
    assert [group_count(c) for c in (1, 3, 7, 8, 16, 32, 64, 128, 256, 48)] == [
        1,
        1,
        1,
        2,
        4,
        8,
        16,
        32,
        32,
        12,
    ]
    with pytest.raises(BrnError):
        group_count(0)


@pytest.mark.parametrize("arch", ["plain_cnn", "small_resnet", "separable_cnn"])
def test_groupnorm_swap_keeps_shapes_parameters_and_trains(arch, one_thread):
    from brn_cli.nn.convert import convert_batchnorm
    from brn_cli.nn.groupnorm import swap_batchnorm_for_groupnorm
    from brn_cli.nn.norms import norm_layers
    from brn_cli.samples.models import SAMPLE_ARCHS

    torch.manual_seed(0)
    model = SAMPLE_ARCHS[arch]()
    n_bn = len(norm_layers(model))
    with torch.no_grad():  # affine parameters that are not the defaults, to see them carried over
        for _, bn in norm_layers(model):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    before = {n: m for n, m in norm_layers(model)}
    x = torch.randn(6, 1, 28, 28)
    swapped = swap_batchnorm_for_groupnorm(model)
    assert set(swapped) == set(before) and len(swapped) == n_bn
    assert not norm_layers(model, with_stats=False)  # no batch norm left
    for name, groups in swapped.items():
        gn = model.get_submodule(name)
        assert isinstance(gn, torch.nn.GroupNorm) and gn.num_groups == groups
        assert gn.num_channels == before[name].num_features
        assert torch.equal(gn.weight, before[name].weight) and torch.equal(gn.bias, before[name].bias)
    assert model(x).shape == (6, 10)
    # batch-independent: an example's output does not depend on the rest of its batch, in train mode too
    model.train()
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)
    # and it trains: a few steps on 16 real digits halve the loss
    import numpy as np

    from brn_cli.samples import SAMPLE_DATA

    digits = np.load(SAMPLE_DATA)
    x, y = torch.tensor(digits["x_train"][:16]).float() / 255, torch.tensor(digits["y_train"][:16]).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # renorm layers are swapped as well; a model without batch norms is refused
    renormed = convert_batchnorm(SAMPLE_ARCHS[arch]())
    assert len(swap_batchnorm_for_groupnorm(renormed)) == n_bn
    with pytest.raises(BrnError, match="no BatchNorm layers"):
        swap_batchnorm_for_groupnorm(renormed)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def _record(cell, method, seed, final, best, curve, **extra):
    from brn_cli.recipes.reproduce_report import run_key

    return {
        "key": run_key(cell, method),
        "method": method,
        "seed": seed,
        "cell": dict(cell.__dict__),
        "val_accuracy": final,
        "best_accuracy": best,
        "curve": curve,
        **extra,
    }


def test_aggregate_means_stds_curves_and_shared_groupnorm():
    from brn_cli.recipes.reproduce_report import aggregate, markdown_report

    iid = Cell("plain_cnn", "iid-32", "constant", 0.01, 20)
    micro = Cell("plain_cnn", "micro-2", "constant", 0.01, 20)
    bn = [0.90, 0.92, 0.97]
    records = [
        _record(iid, "batchnorm", s, a, a + 0.01, [[10, a - 0.1], [20, a]], precise_bn_accuracy=0.95)
        for s, a in enumerate(bn)
    ]
    records += [_record(iid, "renorm", s, 0.96, 0.96, [[10, 0.5], [20, 0.96]]) for s in range(2)]
    records += [_record(iid, "renorm", 2, None, None, [], failed="training loss became nan at step 7")]
    records += [_record(iid, "groupnorm", s, 0.8 + s / 100, 0.85, [[10, 0.7], [20, 0.8]]) for s in range(3)]
    rows = {
        r["cell"]: r
        for r in aggregate([iid, micro, Cell("plain_cnn", "grouped-2", "step", 0.1, 20)], records)
    }
    assert set(rows) == {iid.name, micro.name}  # micro-2 has only the shared GroupNorm runs; grouped-2 none
    row = rows[iid.name]
    assert row["batchnorm"]["final"]["mean"] == pytest.approx(100 * statistics.fmean(bn))
    assert row["batchnorm"]["final"]["std"] == pytest.approx(100 * statistics.stdev(bn))
    assert row["batchnorm"]["best"]["mean"] == pytest.approx(100 * statistics.fmean(bn) + 1)
    assert row["batchnorm"]["precise_bn"]["mean"] == pytest.approx(95.0)
    assert row["renorm"]["final"]["n"] == 2 and row["renorm"]["failed"] == [
        "seed 2: training loss became nan at step 7"
    ]
    assert row["difference"] == pytest.approx(96.0 - 100 * statistics.fmean(bn))
    curve = row["batchnorm"]["curve"]
    assert curve["steps"] == [10, 20] and curve["seeds"] == 3
    assert curve["low"][1] == pytest.approx(90.0) and curve["high"][1] == pytest.approx(97.0)
    assert rows[micro.name]["groupnorm"]["final"] == row["groupnorm"]["final"]
    assert rows[micro.name]["batchnorm"]["final"] is None and rows[micro.name]["difference"] is None
    text = markdown_report(list(rows.values()), {"command": "brn reproduce --x", "seeds": [0, 1, 2]})
    assert "Command: `brn reproduce --x`" in text
    assert "93.0 ± 3.6 (94.0)" in text  # 90, 92, 97: mean 93.0, sample std 3.61; best 1 point higher
    assert "failed: renorm: seed 2: training loss became nan" in text
    assert COMPOSITIONS["iid-32"].paper in text and f"curves/{iid.name}.png" in text


def test_reproduce_rejects_unknown_cells_and_an_empty_report(tmp_path):
    from brn_cli.recipes.reproduce import ReproduceConfig, run_reproduce, write_grid_report

    with pytest.raises(BrnError, match="no cell of the grid matches"):
        run_reproduce(ReproduceConfig(output=str(tmp_path / "x"), cells=["nope"]))
    with pytest.raises(BrnError, match="no grid.json"):
        write_grid_report(tmp_path)


# ----------------------------------------------------------------------------------------------
# --quick, end to end
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_grid_runs_every_method_baseline_and_curve_then_resumes(run_cli, tmp_path):
    out = tmp_path / "rep"
    threads = torch.get_num_threads()
    try:
        res = run_cli("reproduce", "--quick", "-o", out, "--json")
        assert res.code == 0, res.err
        report = json.loads(res.out)
        cells = quick_grid()
        assert report["ran"] == 16  # 3 cells x 2 seeds x (batchnorm, renorm) + 2 shared GroupNorm runs x 2
        rows = {r["cell"]: r for r in report["rows"]}
        assert set(rows) == {c.name for c in cells}
        text = (out / "results.md").read_text()
        assert f"Command: `brn reproduce -o {out} --quick`" in text
        for cell in cells:
            row = rows[cell.name]
            for method in ("batchnorm", "renorm", "groupnorm"):
                final = row[method]["final"]
                assert final["n"] == 2 and 0 <= final["min"] <= final["max"] <= 100, (cell.name, method)
                assert row[method]["curve"]["steps"] == [4, 8, 12] and row[method]["curve"]["seeds"] == 2
            assert row["batchnorm"]["precise_bn"]["n"] == 2 and row["batchnorm"]["batch_stats"]["n"] == 2
            assert row["renorm"]["batch_stats"]["n"] == 2 and row["renorm"]["precise_bn"] is None
            png = out / "curves" / f"{cell.name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            drawn = report["drawn"][cell.name]
            assert set(drawn) == {
                "batchnorm",
                "renorm",
                "groupnorm",
                "batchnorm, precise BN",
                "batchnorm, batch statistics",
            }
            assert drawn["renorm"]["mean"] == row["renorm"]["curve"]["mean"]
            assert f"| {cell.name} | {cell.batches.description} | {cell.lr_schedule} |" in text
            assert f"![{cell.name}](curves/{cell.name}.png)" in text
        # each run used its cell's settings; iid-32 and micro-2 shared their GroupNorm run
        cfg = json.loads((out / "runs" / cells[1].name / "batchnorm" / "seed1" / "config.json").read_text())
        assert (cfg["microbatch"], cfg["batch_size"], cfg["lr_schedule"], cfg["rmax_schedule"]) == (
            2,
            32,
            "constant",
            "off",
        )
        cfg = json.loads((out / "runs" / cells[2].name / "renorm" / "seed0" / "config.json").read_text())
        assert (cfg["sampler"], cfg["momentum"], cfg["lr_schedule"]) == ("grouped:2", 0.1, "step")
        assert cells[0].groupnorm_key() == cells[1].groupnorm_key()
        gn = json.loads(
            (out / "runs" / cells[0].groupnorm_key() / "groupnorm" / "seed0" / "run.json").read_text()
        )
        assert gn["curve"] and "failed" not in gn
        stats = json.loads((out / "runs" / cells[1].name / "batchnorm" / "seed0" / "run.json").read_text())
        assert stats["batch_stats_batches"] == "iid batches of 2"  # batch statistics over a microbatch

        # a second call runs nothing and rebuilds the same report
        markers = sorted(out.glob("runs/**/run.json"))
        stamps = [m.stat().st_mtime_ns for m in markers]
        again = run_cli("reproduce", "--quick", "-o", out, "--json")
        assert again.code == 0, again.err
        assert json.loads(again.out)["ran"] == 0
        assert [m.stat().st_mtime_ns for m in markers] == stamps
        # ... and a run made with another learning rate is not mixed in
        other = run_cli("reproduce", "--quick", "-o", out, "--lr", "0.05")
        assert (
            other.code != 0
            and "was run with lr 0.02" in other.err
            and len(other.err.strip().splitlines()) == 1
        )
    finally:
        torch.set_num_threads(threads)
