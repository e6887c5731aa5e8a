"""The runnable recipes in examples/ (docs/own-loop.md, "Recipes"), each run as a user runs it, on tiny inputs
on the CPU, and the CrossQ critic part of `brn bench`.

Each script is a subprocess (a fresh interpreter, as `python examples/x.py` is) and each test checks what it
printed or wrote, not only its exit status."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def run_example(name: str, *args: str, cwd: Path, launcher: tuple[str, ...] = (), timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, *launcher, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1))


@pytest.mark.slow
def test_rl_critic_is_batchnorm_during_the_warmup_then_opens_the_limits_without_a_warning(tmp_path):
    args = ("--steps", "402", "--warmup", "400", "--hidden", "32", "--batch", "64", "--log-every", "200")
    proc = run_example("rl_critic.py", *args, cwd=tmp_path)
    limits = re.findall(r"update\s+(\d+)\s+rmax (\S+) dmax (\S+)", proc.stdout)
    assert limits == [("0", "1", "0"), ("200", "1", "0"), ("400", "3", "5"), ("401", "3", "5")]
    assert "after 402 updates: rmax 3, dmax 5 (BatchNorm for the first 400)" in proc.stdout
    assert math.isfinite(number(r"final critic loss (\S+) \(finite\)", proc.stdout))
    assert "RenormOpeningWarning" not in proc.stderr  # the moving averages settled during the warm-up


@pytest.mark.slow
def test_metric_learning_recall_at_1_on_unseen_classes_beats_chance_and_raw_inputs(tmp_path):
    out = run_example("metric_learning.py", "--steps", "200", cwd=tmp_path).stdout
    raw = number(r"raw inputs ([\d.]+)", out)
    recall = number(r"after 200 steps \(rmax 3, dmax 5\): recall@1 ([\d.]+)", out)
    chance = number(r"\(chance ([\d.]+)\)", out)
    assert recall > 3 * chance and recall > raw + 0.1, out


@pytest.mark.slow
def test_segmentation_trains_at_batch_2_calibrates_and_exports_a_verified_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "seg.onnx"
    args = ("--steps", "4", "--image-size", "64", "--images", "8", "--output", str(out))
    stdout = run_example("segmentation.py", *args, cwd=tmp_path).stdout
    assert "step    4  rmax 3.00 dmax 5.00" in stdout
    assert number(r"calibrated (\d+) layers", stdout) == 53  # every norm of DeepLabV3-MobileNetV3
    assert re.search(r"ONNX verified: \d+ checks.*53 norms folded, 0 BatchNormalization nodes", stdout)
    graph = onnx.load(str(out)).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]


@pytest.mark.slow
def test_detection_converts_frozen_norms_trains_and_exports_a_verified_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "det.onnx"
    args = ("--backbone", "resnet18", "--steps", "3", "--image-size", "64", "--score-thresh", "0")
    stdout = run_example("detection.py", *args, "--output", str(out), cwd=tmp_path).stdout
    # torchvision's trainable_layers=3: the stem and layer1 (5 norms) stay frozen, 15 become renorm.
    assert "15 frozen norms -> Batch Renorm; 5 stay frozen" in stdout
    assert "step   3  rmax 3.00 dmax 5.00" in stdout
    found = [
        int(n) for n in re.search(r"detections on two synthetic images: \[(\d+), (\d+)\]", stdout).groups()
    ]
    assert min(found) > 0  # verification compared real boxes, not two empty outputs
    assert re.search(r"ONNX verified: \d+ checks", stdout) and f"wrote {out}" in stdout
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["image_0", "image_1"]


@pytest.mark.slow
def test_ddp_own_loop_runs_as_one_process(tmp_path):
    out = run_example("ddp_own_loop.py", "--steps", "25", cwd=tmp_path).stdout
    assert "1 process(es), 2 renorm layers with global statistics" in out
    assert "after 25 steps: rmax 3, dmax 5" in out


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_own_loop_under_torchrun_keeps_the_moving_averages_equal_on_every_rank(tmp_path):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    out = run_example("ddp_own_loop.py", "--steps", "25", cwd=tmp_path, launcher=launcher).stdout
    assert out.count("process(es)") == 1  # only rank 0 prints
    assert "2 process(es), 2 renorm layers with global statistics" in out
    assert "after 25 steps: rmax 3, dmax 5" in out
    assert "moving averages across ranks: max difference 0\n" in out


def test_the_recipes_section_names_scripts_that_exist_and_every_script_here():
    text = (REPO / "docs" / "own-loop.md").read_text(encoding="utf-8")
    section = text[text.index("## Recipes") :]
    named = set(re.findall(r"examples/(\w+\.py)", section))
    assert {
        "detection.py",
        "segmentation.py",
        "metric_learning.py",
        "rl_critic.py",
        "ddp_own_loop.py",
    } <= named
    assert all((EXAMPLES / name).is_file() for name in named), named


# ---------------------------------------------------------------------------------------------------------
# `brn bench --what crossq`: measured side by side, ratio printed (no speed asserted)


@pytest.mark.slow
def test_bench_crossq_part_reports_the_renorm_over_batchnorm_ratio(run_cli, tmp_path):
    res = run_cli("bench", "--what", "crossq", "--quick", "--json", "-o", tmp_path / "b.json")
    assert res.code == 0, res.err
    (row,) = json.loads(res.out)["crossq"]
    assert row["renorm_layers"] == 6  # 2 critics x (input + 2 hidden) norms, all renorm at rmax 3 / dmax 5
    assert (row["batch"], row["hidden"], row["critics"]) == (256, [256, 256], 2)
    assert row["ratio"] > 0 and row["ms"]["batchnorm"] > 0 and row["ms"]["renorm"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["crossq"][0]["ratio"] == row["ratio"]

    table = run_cli("bench", "--what", "crossq", "--quick").out
    printed = re.search(
        r"\| 2 critics, 23-256-256-1, batch 256 \(cpu, 1 thread\) \| \S+ \| \S+ \| (\S+) \|", table
    )
    assert printed and float(printed.group(1)) > 0, table
