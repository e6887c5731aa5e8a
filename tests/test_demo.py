"""`brn demo`: a shortened run of the whole flow end to end, and its refusals.

The shortened run is far too short to compare batchnorm with renorm (docs/results.md has the measured full
run); it checks that every stage ran and produced what the table reports: finite accuracies, verified ONNX
files whose onnxruntime accuracy equals the PyTorch inference accuracy, both runs' curves in one PNG.
"""

from __future__ import annotations

import json
import math

import pytest

from brn_cli.errors import BrnError


@pytest.mark.slow
def test_demo_cli_shortened_end_to_end(run_cli, tmp_path):
    import torch

    out = tmp_path / "demo"
    threads_before = torch.get_num_threads()
    try:
        res = run_cli(
            "demo", "--quick", "--pretrain-steps", "10", "--steps", "6", "--threads", "1", "-o", out
        )
    finally:
        torch.set_num_threads(threads_before)
    assert res.code == 0, res.err
    for name in (
        "bn_model.pt",
        "brn_model.pt",
        "batchnorm.onnx",
        "renorm.onnx",
        "curves.png",
        "summary.json",
        "batchnorm/metrics.jsonl",
        "renorm/last.pt",
    ):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threads"] == 1
    assert summary["convert"]["max_abs_diff"] <= 1e-5
    assert summary["inspect"]["norms"] == 9 and summary["inspect"]["foldable"] == 9
    runs = summary["runs"]
    assert set(runs) == {"batchnorm", "renorm"}
    assert runs["batchnorm"]["schedule"] == "off" and runs["renorm"]["schedule"] == "paper-scaled"
    for run in runs.values():
        assert run["steps"] == 6
        for key in ("inference_accuracy", "batch_stats_accuracy", "onnx_accuracy"):
            assert math.isfinite(run[key]) and 0.0 <= run[key] <= 1.0
        assert run["onnx_passed"] is True and run["onnx_max_abs"] < 1e-4
        assert run["folded"] == 9
        # the exported graph classifies the validation digits as the PyTorch eval model does
        assert run["onnx_accuracy"] == pytest.approx(run["inference_accuracy"], abs=2e-3)
    # renorm's schedule ended relaxed, batchnorm's did not (read from the runs' own metrics)
    last = [json.loads(x) for x in (out / "renorm" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in last if r["kind"] == "train"][-1]["rmax"] > 1.0
    last = [json.loads(x) for x in (out / "batchnorm" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rmax"] == 1.0 and r["dmax"] == 0.0 for r in last if r["kind"] == "train")
    # the table names both runs and the ONNX parity
    assert "inference accuracy" in res.out and "ONNX parity" in res.out and "renorm - batchnorm" in res.out

    # a second run into the same folder is refused without --force, and nothing is touched
    before = (out / "summary.json").stat().st_mtime_ns
    again = run_cli("demo", "--quick", "-o", out)
    assert again.code != 0
    assert len(again.err_lines) == 1 and "not empty" in again.err and "--force" in again.err
    assert (out / "summary.json").stat().st_mtime_ns == before


def test_demo_refuses_bad_options(tmp_path, run_cli):
    from brn_cli.recipes.demo import DemoConfig, run_demo

    with pytest.raises(BrnError, match="`steps`"):
        run_demo(DemoConfig(output=str(tmp_path / "a"), steps=0))
    with pytest.raises(BrnError, match="`sampler`"):
        run_demo(DemoConfig(output=str(tmp_path / "b"), sampler="clustered"))
    (tmp_path / "file").write_text("x")
    res = run_cli("demo", "-o", tmp_path / "file")
    assert res.code != 0 and "not a directory" in res.err and len(res.err_lines) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_set_threads_never_exceeds_available():
    import torch

    from brn_cli.nn.device import available_threads, set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(10_000) == available_threads() == torch.get_num_threads()
        assert set_threads(1) == 1 == torch.get_num_threads()
        with pytest.raises(BrnError):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_bench_cli_quick_layer_sweep_and_peer(run_cli, tmp_path):
    """`brn bench` measures both contenders side by side and reports ratios (not timed: no speed asserted)."""
    import torch

    threads = torch.get_num_threads()
    try:
        res = run_cli("bench", "--what", "layer,peer", "--quick", "--json", "-o", tmp_path / "b.json")
    finally:
        torch.set_num_threads(threads)
    assert res.code == 0, res.err
    results = json.loads((tmp_path / "b.json").read_text())
    assert json.loads(res.out) == results
    assert results["machine"]["threads"] == 1 and results["device"] == "cpu"
    layers = results["layer"]
    # 4-D shape: fp32/bf16 x NCHW/NHWC; 2-D shape: fp32/bf16 (no channels_last for 2-D)
    assert [(r["dtype"], r["channels_last"]) for r in layers] == [
        ("float32", False),
        ("float32", True),
        ("bfloat16", False),
        ("bfloat16", True),
        ("float32", False),
        ("bfloat16", False),
    ]
    for r in layers:
        assert all(v > 0 and math.isfinite(v) for v in r["ms"].values())
        assert all(v > 0 and math.isfinite(v) for v in r["ratio"].values())
        assert 0.0 < r["r_clip_frac"] < 1.0  # r and d were live and clipped in part of the channels
    peer = results["peer"]
    try:
        import torchrl  # noqa: F401
    except ImportError:
        assert peer["measured"] is False and "torchrl" in peer["reason"]
    else:
        assert peer["measured"] is True and peer["ratio_torchrl_over_brn"]["train"] > 0
    assert "not measured" in run_cli("bench", "--what", "peer", "--quick").out or peer["measured"]
    bad = run_cli("bench", "--what", "gpu-magic")
    assert bad.code != 0 and "--what" in bad.err and len(bad.err_lines) == 1
