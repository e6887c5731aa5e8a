"""Schedules: parsing, presets, round trips, and that only optimizer steps advance them."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from brn_cli.errors import BrnError
from brn_cli.nn.layer import BatchRenorm1d
from brn_cli.train.schedule import (
    RenormScheduler,
    Schedule,
    format_schedule,
    parse_schedule,
    plot_schedules,
    preset_schedules,
)


def test_paper_preset_values_at_key_steps():
    rmax = parse_schedule("paper", kind="rmax")
    dmax = parse_schedule("paper", kind="dmax")
    assert [rmax(s) for s in (0, 5000, 22500, 40000, 10**6)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert [dmax(s) for s in (0, 5000, 15000, 25000, 10**6)] == [0.0, 0.0, 2.5, 5.0, 5.0]


def test_paper_scaled_and_off_presets():
    rmax, dmax = preset_schedules("paper-scaled", total_steps=13000)  # 1/10 of the paper's 130k run
    assert rmax.knots == [(500, 1.0), (4000, 3.0)]
    assert dmax.knots == [(500, 0.0), (2500, 5.0)]
    assert rmax(2250) == pytest.approx(2.0) and dmax(1500) == pytest.approx(2.5)
    off_r, off_d = preset_schedules("off")
    assert {off_r(s) for s in (0, 1, 10**9)} == {1.0} and {off_d(s) for s in (0, 10**9)} == {0.0}
    with pytest.raises(BrnError, match="total number of steps"):
        parse_schedule("paper-scaled", kind="rmax")


def test_constant_suffixes_and_inf():
    assert parse_schedule("3", kind="rmax")(12345) == 3.0
    s = parse_schedule("1k:1,2.5k:2,1M:inf", kind="rmax")
    assert s.knots == [(1000, 1.0), (2500, 2.0), (1_000_000, math.inf)]
    assert s(1750) == pytest.approx(1.5) and s(2500) == 2.0 and s(3000) == math.inf


@pytest.mark.parametrize(
    ("spec", "kind", "message"),
    [
        ("fast", "rmax", "unknown rmax schedule"),
        ("5k:1,4k:3", "rmax", "steps must increase"),
        ("5k:1,5k:3", "rmax", "steps must increase"),
        ("0:0.5", "rmax", "rmax must be >= 1"),
        ("0:-1", "dmax", "dmax must be >= 0"),
        ("5x:1", "rmax", "not a step count"),
        ("1.5:2", "rmax", "whole number"),
        ("0:nan", "dmax", "NaN"),
        ("0:1:2", "rmax", "not STEP:VALUE"),
        ("", "rmax", "empty"),
    ],
)
def test_bad_specs(spec, kind, message):
    with pytest.raises(BrnError, match=message):
        parse_schedule(spec, kind=kind)


knot_lists = st.lists(
    st.tuples(st.integers(0, 10**7), st.floats(1.0, 1e3, allow_nan=False, allow_infinity=False)),
    min_size=1,
    max_size=6,
    unique_by=lambda kv: kv[0],
).map(sorted)


@settings(max_examples=60, deadline=None)
@given(knots=knot_lists, probes=st.lists(st.integers(-100, 2 * 10**7), min_size=1, max_size=20))
def test_round_trip_exact_knots_monotone_segments_flat_outside(knots, probes):
    sched = Schedule(knots, "rmax")
    again = parse_schedule(format_schedule(sched), kind="rmax")
    assert again.knots == sched.knots
    for p in probes:
        assert again(p) == sched(p)
    for s, v in knots:  # exact at knots
        assert sched(s) == v
    assert sched(knots[0][0] - 1) == knots[0][1] and sched(knots[-1][0] + 10**6) == knots[-1][1]
    for (s0, v0), (s1, v1) in zip(knots, knots[1:], strict=False):
        steps = sorted({s0, s1, *(s0 + (s1 - s0) * i // 7 for i in range(8))})
        vals = [sched(s) for s in steps]
        lo, hi = min(v0, v1), max(v0, v1)
        assert all(lo <= v <= hi for v in vals)
        pairs = list(zip(vals, vals[1:], strict=False))
        assert all(a <= b for a, b in pairs) if v1 >= v0 else all(a >= b for a, b in pairs)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), BatchRenorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def test_only_optimizer_steps_advance_the_schedule():
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = RenormScheduler(
        model, parse_schedule("0:1,4:3", kind="rmax"), parse_schedule("0:0,4:2", kind="dmax"), optimizer=opt
    )
    layer = model[1]
    assert sched.step == 0 and (layer.rmax, layer.dmax) == (1.0, 0.0)
    x = torch.randn(8, 4)
    for _ in range(3):  # forward passes, eval passes and accumulated backwards: no step
        model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    assert sched.step == 0 and layer.rmax == 1.0
    opt.step()  # one optimizer step after three accumulated forwards
    assert sched.step == 1 and (layer.rmax, layer.dmax) == (1.5, 0.5)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert sched.step == 2 and layer.rmax == 2.0

    # Saved with the run and restored on resume, on a fresh model and optimizer.
    state = sched.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored_state = torch.load(buf, weights_only=True)
    model2 = _model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    sched2 = RenormScheduler(
        model2, parse_schedule("off", kind="rmax"), parse_schedule("off", kind="dmax"), optimizer=opt2
    )
    sched2.load_state_dict(restored_state)
    assert sched2.step == 2 and model2[1].rmax == 2.0 and model2[1].dmax == 1.0
    model2(x).sum().backward()
    opt2.step()
    assert sched2.step == 3 and model2[1].rmax == 2.5


def test_plot_is_written_atomically_and_not_overwritten(tmp_path):
    path = tmp_path / "s.png"
    rmax, dmax = preset_schedules("paper")
    plot_schedules([rmax, dmax], 50000, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = path.read_bytes()
    with pytest.raises(BrnError, match="already exists"):
        plot_schedules([rmax], 10, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]  # no temporary left behind
