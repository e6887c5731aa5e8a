"""Library functions that hold what the command line used to decide itself: the conversion check
(`convert_checked`, `plan_checked`), the preprocessing a checkpoint recorded (`preprocessing_for`) and the
data-spec checks load_data makes before it reads anything (`check_data_spec`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from brn_cli.errors import BrnError, VerificationError
from brn_cli.nn.convert import convert_checked, plan_checked
from brn_cli.nn.layer import BatchRenorm1d


class TypeSensitive(nn.Module):
    """Doubles its output while its norm is a torch BatchNorm: a model whose eval outputs conversion changes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        y = self.bn(self.fc(x))
        return 2 * y if type(self.bn) is nn.BatchNorm1d else y


def type_sensitive() -> nn.Module:
    torch.manual_seed(0)
    return TypeSensitive()


def test_convert_checked_converts_and_reports_the_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model[1].running_mean.uniform_(-1, 1)
    checked = convert_checked(model, momentum=0.1)
    assert isinstance(checked.model[1], BatchRenorm1d) and checked.model[1].momentum == 0.1
    assert checked.input_shape == [2, 4]  # inferred from the first Linear
    assert checked.max_abs_diff == 0.0
    given = convert_checked(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), input_shape=(5, 4))
    assert given.input_shape == [5, 4]


def test_convert_checked_refuses_changed_outputs_and_unknown_shapes():
    with pytest.raises(VerificationError, match=r"conversion changed eval outputs by .* \(expected 0\)"):
        convert_checked(type_sensitive(), input_shape=[2, 4])
    with pytest.raises(BrnError, match="cannot infer an input shape") as caught:
        convert_checked(nn.Sequential(nn.BatchNorm2d(3)))
    assert caught.value.param == "input_shape"
    with pytest.raises(BrnError, match=r"does not run on input shape \[2, 5\]") as caught:
        convert_checked(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), input_shape=[2, 5])
    assert caught.value.param == "input_shape"


def test_brn_convert_writes_nothing_when_the_check_fails(tmp_path, run_cli):
    torch.save(type_sensitive().state_dict(), tmp_path / "bn.pt")
    out = tmp_path / "brn.pt"
    result = run_cli(
        "convert",
        tmp_path / "bn.pt",
        "--arch",
        "test_cli_library:type_sensitive",
        "-o",
        out,
        "--input-shape",
        "2,4",
    )
    assert result.code == 1, result.err
    assert len(result.err_lines) == 1, result.err
    assert result.err_lines[0].startswith("brn: error: conversion changed eval outputs by ")
    assert result.err_lines[0].endswith("(expected 0); nothing written")
    assert not out.exists()


def test_plan_checked_names_the_source_and_lets_a_dry_run_see_skips():
    with pytest.raises(BrnError, match="^net.pt: the model has no BatchNorm layers"):
        plan_checked(nn.Linear(2, 2), source="net.pt")
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(BrnError, match=r"no layer converted: all 1 skipped \(matched by `exclude`\)"):
        plan_checked(model, exclude=["1"])
    (decision,) = plan_checked(model, exclude=["1"], require_conversion=False)
    assert decision.action == "skip" and decision.reason == "matched by `exclude`"
    model[1].running_var.fill_(float("nan"))
    with pytest.raises(BrnError, match="^1: "):  # even a dry run refuses unusable statistics
        plan_checked(model, require_conversion=False)


def test_preprocessing_for_takes_what_the_checkpoint_recorded_unless_given(tmp_path):
    from brn_cli.data.specs import preprocessing_for

    recorded = {"normalize": "0.5,0.25", "image_size": 12, "resize_size": 14}
    (tmp_path / "images").mkdir()
    options, notes = preprocessing_for(recorded, tmp_path / "images")
    assert options == {"normalize": "0.5,0.25", "image_size": 12, "resize_size": 14}
    assert [param for param, _ in notes] == ["normalize", "image_size"]
    assert notes[1][1] == "images resized to 14 and center-cropped to 12"
    # Arrays keep their size; "none" switches the recorded normalization off, and says nothing.
    options, notes = preprocessing_for(recorded, tmp_path / "data.npz", normalize="none")
    assert options == {"normalize": None, "image_size": None, "resize_size": None} and notes == []
    assert preprocessing_for({}, tmp_path / "images", image_size=8) == (
        {"normalize": None, "image_size": 8, "resize_size": None},
        [],
    )


def test_check_data_spec_reads_nothing_and_names_the_parameter(tmp_path):
    from brn_cli.data.specs import check_data_spec

    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 2), np.float32), y_train=np.zeros(4, np.int64))
    (tmp_path / "images").mkdir()
    assert check_data_spec(tmp_path / "d.npz") == "npz"
    assert check_data_spec(tmp_path / "images", image_size=8, channels=1) == "folder"
    assert check_data_spec("somepackage.data:make") == "callable"  # not imported
    for spec, kwargs, param in [
        (tmp_path / "gone.npz", {}, "data"),
        (tmp_path / "gone", {}, "data"),
        (tmp_path / "d.npz", {"image_size": 8}, "image_size"),
        (tmp_path / "d.npz", {"channels": 3}, "channels"),
        (tmp_path / "d.npz", {"val_split": 1.5}, "val_split"),
        (tmp_path / "d.npz", {"augment": "twirl"}, "augment"),
    ]:
        with pytest.raises(BrnError) as caught:
            check_data_spec(spec, **kwargs)
        assert caught.value.param == param, (spec, kwargs, str(caught.value))
