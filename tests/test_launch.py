"""`brn finetune --nproc N`: a mistake the processes would each find is one line from the parent, before
torchrun starts (not N copies of it followed by torchrun's ChildFailedError report)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ARCH = "test_launch:tiny_mlp"


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def files(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    np.savez(tmp_path / "data.npz", x_train=x.numpy(), y_train=y.numpy())
    torch.save(tiny_mlp().state_dict(), tmp_path / "bn.pt")
    return tmp_path


@pytest.fixture
def no_torchrun(monkeypatch):
    """Fail the test if the launcher starts a process."""
    from brn_cli.train import launch

    def refuse(*args, **kwargs):
        raise AssertionError(f"torchrun was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(launch.subprocess, "Popen", refuse)


def _recorded_run(folder: Path, **recorded) -> Path:
    """A run folder whose last.pt records these settings (all a resume reads before it loads the model)."""
    from brn_cli.train.finetune import FinetuneConfig

    folder.mkdir()
    config = FinetuneConfig(checkpoint="bn.pt", data="data.npz", output=str(folder), steps=4, **recorded)
    torch.save({"training": {"config": config.to_dict(), "step": 2, "world_size": 1}}, folder / "last.pt")
    return folder


def _finetune(files: Path, *extra: str) -> list[str]:
    return ["finetune", files / "bn.pt", "-o", files / "run", "--arch", ARCH, "--device", "cpu", *extra]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing data", "brn: error: --data {files}/missing.npz: no such file"),
        ("missing checkpoint", "brn: error: {files}/nothing.pt: no such file"),
        ("no length", "brn: error: say how long to train"),
        ("bad sampler", "brn: error: --sampler"),
    ],
)
def test_an_nproc_mistake_is_one_line_before_torchrun_starts(case, expected, files, run_cli, no_torchrun):
    args = {
        "missing data": _finetune(files, "--data", files / "missing.npz", "--steps", "2"),
        "missing checkpoint": [
            "finetune",
            files / "nothing.pt",
            "--data",
            files / "data.npz",
            "-o",
            files / "run",
            "--arch",
            ARCH,
            "--steps",
            "2",
        ],  # fmt: skip
        "no length": _finetune(files, "--data", files / "data.npz"),
        "bad sampler": _finetune(files, "--data", files / "data.npz", "--steps", "2", "--sampler", "odd"),
    }[case]
    result = run_cli(*args, "--nproc", "2")
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1, result.err
    assert result.err_lines[0].startswith(expected.format(files=files)), result.err
    assert not (files / "run").exists()


def test_an_nproc_resume_that_needs_arch_is_one_line_before_torchrun_starts(tmp_path, run_cli, no_torchrun):
    run = _recorded_run(tmp_path / "run", arch="somepackage.models:net")
    result = run_cli("finetune", "--resume", run, "--nproc", "2", "--device", "cpu")
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1, result.err
    assert "records arch 'somepackage.models:net'" in result.err and "--arch" in result.err, result.err


def test_an_nproc_resume_whose_global_batch_does_not_split_is_one_line(tmp_path, run_cli, no_torchrun):
    run = _recorded_run(tmp_path / "run", arch="torchvision:resnet18", batch_size=3)
    result = run_cli("finetune", "--resume", run, "--nproc", "2", "--device", "cpu")
    assert result.code == 2, result.err
    assert result.err_lines == [
        "brn: error: --resume: the run's global batch 3 does not split over 2 processes"
    ]


def test_an_nproc_resume_with_a_per_process_batch_of_one_is_one_line(tmp_path, run_cli, no_torchrun):
    run = _recorded_run(tmp_path / "run", arch="torchvision:resnet18", batch_size=2)
    result = run_cli("finetune", "--resume", run, "--nproc", "2", "--device", "cpu")
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1 and "batch" in result.err and ">= 2" in result.err, result.err


def test_check_launch_is_the_library_pre_flight(files):
    from brn_cli.errors import BrnError
    from brn_cli.train.finetune import FinetuneConfig
    from brn_cli.train.launch import check_launch

    config = FinetuneConfig(
        checkpoint=str(files / "bn.pt"), data=str(files / "data.npz"), output=str(files / "run"), steps=2,
        arch=ARCH,
    )  # fmt: skip
    check_launch(config, 2)  # a good config passes, and nothing is written
    assert not (files / "run").exists()
    with pytest.raises(BrnError, match="`nproc` must be >= 1"):
        check_launch(config, 0)
    with pytest.raises(BrnError, match="no such file") as caught:
        check_launch(FinetuneConfig(**{**config.to_dict(), "data": str(files / "gone.npz")}), 2)
    assert caught.value.param == "data"


@pytest.mark.slow
def test_an_nproc_mistake_from_the_console_is_one_line_and_no_traceback(files):
    """The real console script, as a user runs it: no torchrun report, no rank messages."""
    cmd = [sys.executable, "-m", "brn_cli", *map(str, _finetune(files, "--data", files / "gone.npz",
                                                                "--steps", "2", "--nproc", "2"))]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines == [f"brn: error: --data {files / 'gone.npz'}: no such file"], proc.stderr
