"""The progress protocol: what long library calls report, and the one Rich renderer of it."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from rich.console import Console
from torch import nn

from brn_cli.cli.progress import RichProgress, progress_if, stage_counter
from brn_cli.errors import BrnError
from brn_cli.progress import NullProgress, Progress


class Recorder:
    """A Progress that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        self.calls.append(("start", label, total, done))

    def update(self, done: int, info: str = "") -> None:
        self.calls.append(("update", done, info))

    def stop(self) -> None:
        self.calls.append(("stop",))


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=160, color_system=None), buf


def test_renderers_fit_the_protocol(monkeypatch):
    assert isinstance(RichProgress(), Progress)
    assert isinstance(NullProgress(), Progress)
    assert isinstance(Recorder(), Progress)
    assert progress_if(False) is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress_if(True) is None  # a bar would leave its last frame in a log file
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    shown = progress_if(True, transient=False, elapsed=True)
    assert isinstance(shown, RichProgress) and not shown.transient and shown.elapsed


def test_rich_progress_shows_label_count_and_the_last_info():
    console, buf = _console()
    bar = RichProgress(transient=False, console=console)
    bar.start("finetune [bold]", 10, done=2)
    bar.update(5, info="loss 0.3 [red]acc[/red]")
    bar.update(7)  # no info: the last one stays
    bar.stop()
    final = [line for line in buf.getvalue().splitlines() if "7/10" in line][-1]  # the last frame
    assert "finetune [bold]" in final  # labels and info are text, never markup
    assert "loss 0.3 [red]acc[/red]" in final


def test_rich_progress_runs_tasks_one_after_another():
    console, buf = _console()
    bar = RichProgress(transient=False, console=console)
    for label in ("evaluate (inference)", "evaluate (batch-stats)"):
        bar.start(label, 3)
        bar.update(3)
        bar.stop()
    out = buf.getvalue()
    assert "evaluate (inference)" in out and "evaluate (batch-stats)" in out
    bar.update(1)  # after stop: ignored, not an error


def test_stage_counter_counts_stages_and_shows_each():
    rec = Recorder()
    step = stage_counter(rec)
    step("folding")
    step("exporting")
    assert rec.calls == [("update", 1, "folding"), ("update", 2, "exporting")]


def _loader(n_batches=3, batch=4):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 3, 5, 5, generator=g), torch.zeros(batch, dtype=torch.long))
        for _ in range(n_batches)
    ]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))


def test_evaluate_reports_each_batch_and_stops():
    from brn_cli.evaluation.evaluate import evaluate

    rec = Recorder()
    evaluate(_model(), _loader(), progress=rec)
    assert rec.calls == [
        ("start", "evaluate (inference)", 3, 0),
        ("update", 1, ""),
        ("update", 2, ""),
        ("update", 3, ""),
        ("stop",),
    ]


def test_evaluate_stops_the_progress_when_it_fails():
    from brn_cli.evaluation.evaluate import evaluate

    rec = Recorder()
    bad = [(torch.randn(4, 3, 5, 5), torch.full((4,), 7, dtype=torch.long))]  # label 7 of 2 outputs
    with pytest.raises(BrnError, match="out of range"):
        evaluate(_model(), bad, progress=rec)
    assert rec.calls[0][0] == "start" and rec.calls[-1] == ("stop",)


def test_calibrate_reports_every_batch_of_every_layer():
    from brn_cli.evaluation.calibrate import calibrate

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    rec = Recorder()
    calibrate(model, _loader(), num_batches=3, progress=rec)
    assert rec.calls[0] == ("start", "calibrate", 6, 0)  # 2 layers x 3 batches
    assert [c[1] for c in rec.calls[1:-1]] == [1, 2, 3, 4, 5, 6]
    assert rec.calls[-1] == ("stop",)


def test_pretrain_reports_every_tenth_step_with_the_loss():
    from brn_cli.recipes.pretrain import load_sample_data, pretrain_batchnorm

    rec = Recorder()
    _, metrics = pretrain_batchnorm("mlp", steps=25, batch_size=16, data=load_sample_data(), progress=rec)
    assert rec.calls[0] == ("start", "pretrain mlp", 25, 0)
    updates = [c for c in rec.calls if c[0] == "update"]
    assert [u[1] for u in updates] == [10, 20, 25]
    assert updates[-1][2] == f"loss {metrics['final_batch_loss']:.3f}"
    assert rec.calls[-1] == ("stop",)
