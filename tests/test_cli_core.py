"""`brn inspect` and `brn convert` through the real CLI entry point (brn_cli.cli.main).

Most runs are in-process (`run_cli` in conftest.py: same code path as the console script, without paying
for a fresh torch import); the malicious-pickle check also runs `python -m brn_cli` in a subprocess.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ARCH = ["--arch", "torchvision:shufflenet_v2_x0_5", "--arch-kwargs", '{"num_classes": 10}']
SHAPE = ["--input-shape", "2,3,64,64"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A plain state_dict file of a small torchvision model with non-trivial BatchNorm statistics."""
    from brn_cli.checkpoint import build_arch

    model = build_arch("torchvision:shufflenet_v2_x0_5", {"num_classes": 10})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    path = tmp_path_factory.mktemp("weights") / "shufflenet.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 1}, path)
    return path


def test_convert_then_inspect_without_arch(run_cli, weights, tmp_path):
    out = tmp_path / "out.pt"
    res = run_cli("convert", weights, "-o", out, *ARCH, *SHAPE, "--momentum", "0.05")
    assert res.code == 0, res.err
    assert "max |original - converted| = 0" in res.out
    assert "converted 56 of 56" in res.out
    assert out.exists()
    ckpt = torch.load(out, weights_only=True)
    assert {s["momentum"] for s in ckpt["renorm_layers"].values()} == {0.05}

    res = run_cli("inspect", out, "--json")  # arch and input shape come from the brn checkpoint
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["file_format"] == "brn" and report["arch"] == "torchvision:shufflenet_v2_x0_5"
    assert report["input_shape"] == [2, 3, 64, 64]
    assert len(report["norms"]) == 56
    first = report["norms"][0]
    assert first["name"] == "conv1.1" and first["type"] == "BatchRenorm2d" and first["channels"] == 24
    assert first["eps"] == 1e-5 and first["momentum"] == 0.05 and first["health"] == "ok"
    assert first["fold_into"] == "conv1.0"  # Conv -> BN pair found on the traced graph
    from brn_cli.checkpoint import build_arch

    n_params = sum(
        p.numel() for p in build_arch("torchvision:shufflenet_v2_x0_5", {"num_classes": 10}).parameters()
    )
    assert report["parameters"] == n_params

    # No overwrite without --force; with --force it goes through.
    before = out.read_bytes()
    res = run_cli("convert", weights, "-o", out, *ARCH, *SHAPE)
    assert res.code != 0 and len(res.err_lines) == 1 and "--force" in res.err
    assert out.read_bytes() == before
    res = run_cli("convert", weights, "-o", out, *ARCH, *SHAPE, "--force", "--momentum", "0.1")
    assert res.code == 0, res.err
    assert {s["momentum"] for s in torch.load(out, weights_only=True)["renorm_layers"].values()} == {0.1}


def test_convert_json_include_exclude_and_dry_run(run_cli, weights, tmp_path):
    out = tmp_path / "sel.pt"
    res = run_cli(
        "convert",
        weights,
        "-o",
        out,
        *ARCH,
        *SHAPE,
        "--include",
        "stage2.*",
        "--exclude",
        "*.branch1.*",
        "--json",
    )
    assert res.code == 0, res.err
    result = json.loads(res.out)
    converted = [d["name"] for d in result["layers"] if d["action"] == "convert"]
    assert converted and all(n.startswith("stage2.") and ".branch1." not in n for n in converted)
    reasons = {d["reason"] for d in result["layers"] if d["action"] == "skip"}
    assert reasons == {"not matched by --include", "matched by --exclude"}
    assert result["max_abs_diff"] <= 1e-5 and result["output"] == str(out)
    assert set(torch.load(out, weights_only=True)["renorm_layers"]) == set(converted)

    dry = tmp_path / "dry.pt"
    res = run_cli("convert", weights, "-o", dry, *ARCH, "--dry-run")
    assert res.code == 0, res.err
    assert "would convert 56 of 56" in res.out
    assert not dry.exists() and sorted(os.listdir(tmp_path)) == ["sel.pt"]


def test_inspect_state_dict_reports_unhealthy_statistics(run_cli, weights, tmp_path):
    state = torch.load(weights, weights_only=True)["state_dict"]
    state["module.conv1.1.running_var"][:3] = float("nan")
    state["module.stage2.0.branch1.1.running_var"][0] = -1.0
    state["module.stage2.0.branch1.3.running_mean"][:2] = float("inf")
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    res = run_cli("inspect", bad, *ARCH, *SHAPE, "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["file_format"] == "state_dict"
    health = {n["name"]: n["health"] for n in report["norms"]}
    assert health["conv1.1"] == "3 NaN in running_var"
    assert health["stage2.0.branch1.1"] == "1 negative running_var"
    assert health["stage2.0.branch1.3"] == "2 inf in running_mean"
    assert sum(h == "ok" for h in health.values()) == 53
    res = run_cli("inspect", bad, *ARCH, *SHAPE)  # the table view
    assert res.code == 0 and "3 with unhealthy running statistics" in res.out


class Payload:
    """Unpickling this calls open(marker, 'w'): the file's existence proves the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_inputs(tmp_path: Path, weights: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI args after 'convert', a word the one error line must contain)."""
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pt"
    data = weights.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(random.Random(0).randbytes(4096))
    text = tmp_path / "notes.bin"
    text.write_text("this is not a checkpoint\n")
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    no_bn = tmp_path / "linear.pt"
    torch.save(nn.Linear(4, 2).state_dict(), no_bn)
    fake_st = tmp_path / "fake.safetensors"
    fake_st.write_bytes(random.Random(1).randbytes(64))
    lin_arch = ["--arch", "torch.nn:Linear", "--arch-kwargs", '{"in_features": 4, "out_features": 2}']
    return {
        "missing": ([str(tmp_path / "nope.pt")], "no such file"),
        "empty": ([str(empty)], "empty"),
        "truncated": ([str(truncated)], "not a readable"),
        "random": ([str(random_bytes)], "not a"),
        "text": ([str(text)], "not a"),
        "not-a-checkpoint": ([str(listing)], "list"),
        "bad-safetensors": ([str(fake_st), *ARCH], "safetensors"),
        "directory": ([str(tmp_path)], "directory"),
        "arch-mismatch": ([str(weights), "--arch", "torchvision:resnet18"], "do not match"),
        "no-arch": ([str(weights)], "--arch"),
        "bad-arch-kwargs": (
            [str(weights), "--arch", "torchvision:resnet18", "--arch-kwargs", "{oops"],
            "JSON",
        ),
        "no-batchnorm": ([str(no_bn), *lin_arch], "no BatchNorm"),
        "bad-input-shape": ([str(weights), *ARCH, "--input-shape", "2,5,9"], "input shape"),
        "bad-momentum": ([str(weights), *ARCH, "--momentum", "1.5"], "momentum"),
    }


def test_each_bad_input_gives_one_line_and_no_output(run_cli, weights, tmp_path):
    cases = _bad_inputs(tmp_path, weights)
    out = tmp_path / "out" / "converted.pt"
    out.parent.mkdir()
    for name, (args, word) in cases.items():
        res = run_cli("convert", *args, "-o", out)
        assert res.code != 0, name
        assert len(res.err_lines) == 1, (name, res.err)
        assert res.err.startswith("brn: error: "), (name, res.err)
        assert word.lower() in res.err.lower(), (name, res.err)
        assert "Traceback" not in res.err + res.out, name
        assert list(out.parent.iterdir()) == [], name  # no output, no temporary left behind
    # inspect shares the loader: one line too.
    res = run_cli("inspect", str(tmp_path / "random.pt"))
    assert res.code != 0 and len(res.err_lines) == 1 and "Traceback" not in res.err


def test_debug_shows_the_exception(run_cli, tmp_path):
    from brn_cli.cli import main
    from brn_cli.errors import BrnError

    with pytest.raises(BrnError, match="no such file"):
        main(["convert", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o.pt"), "--debug"])


def test_malicious_pickle_does_not_run(run_cli, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(marker)}, evil)
    out = tmp_path / "out.pt"

    res = run_cli("convert", evil, "-o", out, *ARCH)
    assert res.code != 0 and len(res.err_lines) == 1 and "--trust-pickle" in res.err
    assert "io.open" in res.err  # names what it would have imported
    assert not marker.exists() and not out.exists()

    # The real console path, in a fresh interpreter.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "brn_cli", "inspect", str(evil)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "--trust-pickle" in proc.stderr
    assert not marker.exists()

    # Control: with --trust-pickle the payload does run (so the checks above could have failed).
    res = run_cli("convert", evil, "-o", out, *ARCH, "--trust-pickle")
    assert marker.exists()
    assert res.code != 0 and not out.exists()
