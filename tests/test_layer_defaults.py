"""Fresh renorm layers: BatchNorm by design until something opens the limits (warned once when nothing
does), and telemetry that reports the BatchNorm phase as such."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import brn_cli.nn.layer as layer_module
from brn_cli import BatchRenorm1d, RenormScheduler, collect_telemetry, convert_batchnorm


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(layer_module, "_limits_warning_given", False)


def _train_forward(model: nn.Module) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.train()(torch.randn(8, 4))
    return [w for w in seen if "nothing set its limits" in str(w.message)]


def test_a_fresh_layer_trains_as_batchnorm_and_says_so_once(fresh_warning):
    layer = BatchRenorm1d(4)
    assert (layer.rmax, layer.dmax) == (1.0, 0.0)
    first = _train_forward(layer)
    assert len(first) == 1 and "BatchRenorm1d trains as plain BatchNorm" in str(first[0].message)
    assert _train_forward(layer) == [] and _train_forward(BatchRenorm1d(4)) == []  # once per process


@pytest.mark.parametrize(
    "make",
    [
        lambda: BatchRenorm1d(4, rmax=1.0, dmax=0.0),  # BatchNorm on purpose
        lambda: BatchRenorm1d(4, rmax=3.0, dmax=5.0),
        lambda: RenormScheduler.warmup(nn.Sequential(BatchRenorm1d(4)), warmup_steps=10).model,
        lambda: copy.deepcopy(BatchRenorm1d(4, rmax=2.0)),
    ],
    ids=["explicit-batchnorm", "explicit-limits", "scheduler", "deepcopy"],
)
def test_chosen_limits_do_not_warn(make, fresh_warning):
    assert _train_forward(make()) == []


def test_a_converted_layer_nobody_schedules_warns_too(fresh_warning):
    model = convert_batchnorm(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    assert len(_train_forward(model)) == 1
    model = convert_batchnorm(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), rmax=3.0, dmax=5.0)
    assert _train_forward(model) == []


def test_telemetry_reports_the_batchnorm_phase_not_full_clipping():
    layer = BatchRenorm1d(6, rmax=1.0, dmax=0.0)
    layer.train()(torch.randn(16, 6) * 4 + 2)  # far from the fresh averages: every r and d "would" clip
    tele = layer.last_telemetry()
    assert tele.batchnorm_phase and tele.r_clip_frac == 0.0 and tele.d_clip_frac == 0.0
    assert tele.mean_abs_log_r > 1.0 and tele.mean_abs_d > 0.1  # the distance is still reported
    assert collect_telemetry(layer)["batchnorm_phase"] == 1.0

    layer.rmax, layer.dmax = 1.5, 0.5
    layer(torch.randn(16, 6) * 4 + 2)
    tele = layer.last_telemetry()
    assert not tele.batchnorm_phase and tele.r_clip_frac == 1.0 and tele.d_clip_frac > 0.0

    layer.rmax, layer.dmax = 1.0, 0.5  # r off, d live
    layer(torch.randn(16, 6) * 4 + 2)
    tele = layer.last_telemetry()
    assert not tele.batchnorm_phase and tele.r_clip_frac == 0.0 and tele.d_clip_frac > 0.0
