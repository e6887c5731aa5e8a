"""The training engine's seams: options declared once (config <-> `brn finetune`), the task given to the
engine (loss and metric), and TrainState (one state_dict for everything resume restores)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from test_finetune import tiny_cnn

from brn_cli.errors import BrnError
from brn_cli.samples import SAMPLE_DATA
from brn_cli.tasks import Classification
from brn_cli.train.config import FinetuneConfig, validate
from brn_cli.train.finetune import run_finetune

ARCH = "test_finetune:tiny_cnn"


def _command_options() -> dict[str, typing.Any]:
    import typer.main

    from brn_cli.cli.app import app

    return {p.name: p for p in typer.main.get_command(app).commands["finetune"].params}


def test_every_config_field_is_a_finetune_option_with_the_declared_default():
    options = _command_options()
    for f in dataclasses.fields(FinetuneConfig):
        if not f.metadata.get("cli", True):
            assert f.name not in options
            continue
        assert f.name in options, f"FinetuneConfig.{f.name} has no `brn finetune` option"
        if f.default is not dataclasses.MISSING:
            assert options[f.name].default == f.default, f.name
    # Fields declared without a shared option take their help from the declaration, flags rendered.
    assert options["batch_size"].opts == ["--batch-size"]
    assert options["batch_size"].help == FinetuneConfig.__dataclass_fields__["batch_size"].metadata["help"]
    assert options["dmax_schedule"].help == "As --rmax-schedule (default: the same preset)."
    assert options["compile"].opts == ["--compile"] and options["output"].opts == ["-o", "--output"]


@pytest.mark.parametrize(
    "change, param",
    [
        ({"batch_size": 1}, "batch_size"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"lr": float("nan")}, "lr"),
        ({"dist_timeout": 0.0}, "dist_timeout"),
        ({"microbatch": 5}, "microbatch"),
        ({"epochs": 1.0}, "epochs"),
        ({"log_every": 0}, "log_every"),
    ],
)
def test_validation_names_the_parameter(change, param):
    config = FinetuneConfig(checkpoint="m.pt", data="d.npz", output="run", steps=2, **change)
    with pytest.raises(BrnError) as info:
        validate(config)
    assert info.value.param == param and "--" not in str(info.value)


class _ScaledLoss(Classification):
    """Classification whose loss is scaled: the engine must train on, and log, the task's own loss."""

    def loss(self, output, target):
        return 3.0 * super().loss(output, target)


def test_the_engine_uses_the_task_it_is_given(tmp_path, one_thread):
    torch.manual_seed(0)
    checkpoint = tmp_path / "m.pt"
    torch.save(tiny_cnn().state_dict(), checkpoint)

    def run(name, task):
        config = FinetuneConfig(
            checkpoint=str(checkpoint),
            data=str(SAMPLE_DATA),
            output=str(tmp_path / name),
            arch=ARCH,
            steps=2,
            lr=1e-9,
            log_every=1,
        )
        return run_finetune(config, task=task).final

    plain, scaled = run("plain", None), run("scaled", _ScaledLoss())
    assert scaled["train_loss"] == pytest.approx(3.0 * plain["train_loss"], rel=1e-4)
    assert scaled["train_accuracy"] == plain["train_accuracy"]


def test_train_state_round_trips_every_piece(tmp_path, one_thread):
    """A TrainState loaded from another's state_dict gives back the same state_dict (the checkpoint's
    `training` entry), so resume restores every piece."""
    from brn_cli.train.trainer import Trainer

    torch.manual_seed(0)
    checkpoint = tmp_path / "m.pt"
    torch.save(tiny_cnn().state_dict(), checkpoint)
    import contextlib

    def trainer(name, steps):
        config = FinetuneConfig(
            checkpoint=str(checkpoint),
            data=str(SAMPLE_DATA),
            output=str(tmp_path / name),
            arch=ARCH,
            steps=steps,
            log_every=3,
        )
        held = contextlib.ExitStack()
        return held, Trainer(config, held=held)

    held_a, a = trainer("a", 5)
    with held_a:
        a.fit()
    held_b, b = trainer("b", 5)
    with held_b:
        b.state.load_state_dict(a.state.state_dict())
        saved, loaded = a.state.state_dict(), b.state.state_dict()
    for key in ("step", "epoch", "batch_index", "window", "best", "renorm_schedule", "lr_schedule"):
        assert loaded[key] == saved[key], key
    assert loaded["step"] == 5 and loaded["epoch"] == saved["epoch"]
    state_a, state_b = saved["optimizer"]["state"], loaded["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and all(
        torch.equal(state_a[k]["momentum_buffer"], state_b[k]["momentum_buffer"]) for k in state_a
    )
    assert torch.equal(saved["rng"]["torch"], loaded["rng"]["torch"])
