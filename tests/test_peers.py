"""torchrl's BatchRenorm1d and sb3-contrib's BatchRenorm (CrossQ critics) convert to brn's layers: eval outputs
unchanged, state mapped (their variance is brn's running_var, sigma = sqrt(var + eps)), warm-up position read as
a schedule that a RenormScheduler continues at the step where each library opens its limits."""

from __future__ import annotations

import copy
import doctest
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import brn_cli
from brn_cli import BatchRenorm1d, BrnError, RenormScheduler, convert_batchnorm, peer_schedule
from brn_cli.nn.convert import apply_renorm_layout, plan_conversion
from brn_cli.nn.norms import is_peer_renorm, renorm_layer_settings

torchrl_modules = pytest.importorskip("torchrl.modules")
sb3_layers = pytest.importorskip("sb3_contrib.common.torch_layers")

LIBRARIES = ("torchrl", "sb3")


def peer_layer(library: str, features: int = 8, warmup_steps: int = 5, **kwargs) -> nn.Module:
    if library == "torchrl":
        return torchrl_modules.BatchRenorm1d(features, warmup_steps=warmup_steps, eps=1e-3, **kwargs)
    return sb3_layers.BatchRenorm1d(features, warmup_steps=warmup_steps, **kwargs)  # eps 1e-3 by default


def critic(library: str, warmup_steps: int = 5, **kwargs) -> nn.Sequential:
    """A CrossQ-style critic: Linear -> BatchRenorm -> ReLU -> Linear."""
    return nn.Sequential(
        nn.Linear(6, 8), peer_layer(library, 8, warmup_steps, **kwargs), nn.ReLU(), nn.Linear(8, 1)
    )


def sb3_critic() -> nn.Sequential:
    """Builder for `--arch test_peers:sb3_critic`."""
    return critic("sb3", warmup_steps=5)


def batch(gen: torch.Generator, n: int = 32) -> torch.Tensor:
    # Far from mean 0, variance 1, so that statistics mapped wrongly show in the outputs.
    return torch.randn(n, 6, generator=gen) * 3.0 + 2.0


def train(model: nn.Module, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = batch(gen).to(dtype)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def counter(layer: nn.Module) -> torch.Tensor:
    return layer.num_batches_tracked if hasattr(layer, "num_batches_tracked") else layer.steps


def renormalizes(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer`'s next training step uses its moving averages (the limits are open), observed: the
    training output changes when the moving mean does. `layer` itself is left alone."""
    a, b = copy.deepcopy(layer).train(), copy.deepcopy(layer).train()
    mean = b.running_mean if hasattr(b, "running_mean") else b.ra_mean
    with torch.no_grad():
        mean.add_(1.0)
        return not torch.allclose(a(x), b(x))


# ---------------------------------------------------------------------------------------------------------
# Eval function and state


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("library", LIBRARIES)
def test_eval_outputs_are_unchanged_by_conversion(library, dtype, tol):
    torch.manual_seed(0)
    model = critic(library).to(dtype)
    train(model, 8)
    model.eval()
    x = batch(torch.Generator().manual_seed(1), 64).to(dtype)
    with torch.no_grad():
        before = model(x)
        convert_batchnorm(model)
        after = model(x)
    assert type(model[1]) is BatchRenorm1d and model[1].running_var.dtype == dtype
    # Relative to the outputs' scale: the two compute one expression with different kernels.
    torch.testing.assert_close(after, before, rtol=tol, atol=tol * float(before.abs().max()))


def test_sb3_without_affine_converts_without_affine():
    torch.manual_seed(0)
    model = critic("sb3", affine=False)
    train(model, 6)
    model.eval()
    x = batch(torch.Generator().manual_seed(1), 64)
    with torch.no_grad():
        before = model(x)
        convert_batchnorm(model)
        after = model(x)
    assert model[1].affine is False and model[1].weight is None
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6 * float(before.abs().max()))


@pytest.mark.parametrize("library", LIBRARIES)
def test_state_is_mapped(library):
    torch.manual_seed(0)
    model = critic(library, momentum=0.05)
    train(model, 7)
    peer = model[1]
    mean, var = (peer.running_mean, peer.running_var) if library == "torchrl" else (peer.ra_mean, peer.ra_var)
    gamma = peer.weight if library == "torchrl" else peer.scale
    peer.bias.requires_grad_(False)
    expected = {
        k: v.clone() for k, v in (("mean", mean), ("var", var), ("gamma", gamma), ("beta", peer.bias))
    }
    convert_batchnorm(model)
    layer = model[1]
    assert torch.equal(layer.running_mean, expected["mean"])
    # Their stored variance is brn's running_var: sigma = sqrt(var + eps) with their eps.
    assert torch.equal(layer.running_var, expected["var"])
    torch.testing.assert_close(layer.running_sigma, (expected["var"] + 1e-3).sqrt())
    assert layer.eps == 1e-3 and layer.momentum == 0.05  # their momentum, not convert_batchnorm's 0.01
    assert torch.equal(layer.weight, expected["gamma"]) and torch.equal(layer.bias, expected["beta"])
    assert layer.weight.requires_grad and not layer.bias.requires_grad
    assert int(layer.num_batches_tracked) == 7 and layer.training
    assert not any(is_peer_renorm(m) for m in model.modules())


def test_converted_state_dict_loads_strictly():
    torch.manual_seed(0)
    model = critic("sb3")
    train(model, 4)
    convert_batchnorm(model)
    state = model.state_dict()
    assert {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(state)
    fresh = convert_batchnorm(critic("sb3"))
    fresh.load_state_dict(state, strict=True)
    plain = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, eps=1e-3), nn.ReLU(), nn.Linear(8, 1))
    plain.load_state_dict(state, strict=True)
    # brn's own checkpoint layout, re-applied on a freshly built peer architecture
    rebuilt = apply_renorm_layout(critic("sb3"), renorm_layer_settings(model))
    rebuilt.load_state_dict(state, strict=True)
    x = batch(torch.Generator().manual_seed(1))
    for other in (fresh, plain, rebuilt):
        torch.testing.assert_close(other.eval()(x), model.eval()(x))


def test_peers_false_keeps_them_and_says_so():
    model = critic("torchrl")
    (decision,) = plan_conversion(model, peers=False)
    assert decision.action == "skip" and "`peers=True`" in decision.reason
    assert decision.source_type == "torchrl.BatchRenorm1d"
    convert_batchnorm(model, peers=False)
    assert is_peer_renorm(model[1])


# ---------------------------------------------------------------------------------------------------------
# Warm-up position


@pytest.mark.parametrize("library, brn_warmup", [("torchrl", 5), ("sb3", 6)])
def test_the_schedule_opens_where_the_library_does(library, brn_warmup):
    """At every counter value around the switch, the converted layer's scheduler opens the limits exactly when
    the library's own next step renormalizes (torchrl: counter >= W; sb3-contrib: counter > W)."""
    torch.manual_seed(0)
    model = critic(library, warmup_steps=5)
    train(model, 3)
    h = model[0](batch(torch.Generator().manual_seed(2)))
    seen = []
    for step in range(2, 9):
        counter(model[1]).fill_(step)
        position = peer_schedule(model)
        assert (position.start_step, position.warmup_steps) == (step, brn_warmup)
        converted = convert_batchnorm(copy.deepcopy(model))
        sched = RenormScheduler.from_specs(converted, **position.scheduler_kwargs())
        opens = sched.values() != (1.0, 0.0)
        assert opens == renormalizes(model[1], h) == position.limits_open, step
        assert (converted[1].rmax, converted[1].dmax) == sched.values()
        seen.append(opens)
    assert seen == [s >= brn_warmup for s in range(2, 9)]


@pytest.mark.parametrize("step", [3, 4, 5, 6, 7])
def test_torchrl_training_step_is_the_same_after_conversion(step):
    """Converted at any point of the warm-up (and up to 2W), the next training step of brn's layer is
    torchrl's: same output, same moving mean."""
    torch.manual_seed(0)
    layer = peer_layer("torchrl", warmup_steps=5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        layer(torch.randn(32, 8, generator=gen) * 2 + 1)
    layer.num_batches_tracked.fill_(step)
    position = peer_schedule(layer)
    converted = convert_batchnorm(copy.deepcopy(layer))
    RenormScheduler.from_specs(nn.Sequential(converted), **position.scheduler_kwargs())
    x = torch.randn(32, 8, generator=gen) * 4 - 1  # far from the averages: r and d clip once open
    torch.testing.assert_close(converted(x), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(converted.running_mean, layer.running_mean)
    assert (converted.rmax > 1.0) == (step >= 5)


# 16 steps at momentum 0.01 leave the averages short of the batch statistics: the scheduler says so when the
# limits open, which is not what this test is about.
@pytest.mark.filterwarnings("ignore::brn_cli.RenormOpeningWarning")
def test_a_mid_warmup_conversion_continues_the_schedule():
    """docs/own-loop.md's recipe: read the position, convert, continue with a scheduler on the optimizer; the
    limits open at the step the sb3-contrib layer would have opened them (a shadow copy keeps counting)."""
    torch.manual_seed(0)
    model = critic("sb3", warmup_steps=10)
    train(model, 6)
    shadow = copy.deepcopy(model[1])
    position = brn_cli.peer_schedule(model)
    assert (position.start_step, position.limits()) == (6, (1.0, 0.0))
    convert_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = RenormScheduler.from_specs(model, optimizer=optimizer, **position.scheduler_kwargs())
    gen = torch.Generator().manual_seed(3)
    opened_at = None
    for step in range(6, 14):
        x = batch(gen)
        with torch.no_grad():
            h = model[0](x)
        shadow_opens = renormalizes(shadow, h)
        shadow.train()(h)  # the library's layer counts this step too
        assert (model[1].rmax > 1.0) == shadow_opens, step
        if shadow_opens and opened_at is None:
            opened_at = step
        loss = (model(x) - x[:, :1]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert opened_at == 11 and scheduler.step == 14  # sb3-contrib: BatchNorm while steps <= warmup_steps
    assert (model[1].rmax, model[1].dmax) == (3.0, 5.0)


def test_after_the_warmup_the_converted_layer_keeps_the_limits_without_a_scheduler():
    torch.manual_seed(0)
    model = critic("torchrl", warmup_steps=2, max_r=2.0, max_d=4.0)
    train(model, 4)
    convert_batchnorm(model)
    assert (model[1].rmax, model[1].dmax) == (2.0, 4.0)


def test_torchrl_smooth_reads_as_a_ramp():
    layer = peer_layer("torchrl", warmup_steps=10, smooth=True)
    layer.num_batches_tracked.fill_(4)
    position = peer_schedule(layer)
    assert position.ramp and position.rmax_spec == "0:1,10:3" and position.dmax_spec == "0:0,10:5"
    assert position.limits() == pytest.approx((1.8, 2.0))


def test_no_warmup():
    layer = peer_layer("torchrl", warmup_steps=0)
    assert peer_schedule(layer).scheduler_kwargs() == {"rmax_spec": "3", "dmax_spec": "5", "start_step": 0}
    assert peer_schedule(peer_layer("sb3", warmup_steps=0)).warmup_steps == 1  # sb3 opens once steps > 0


def test_torchrl_counter_is_not_clamped_so_r_and_d_grow_past_twice_the_warmup():
    """What docs/own-loop.md says of torchrl (0.14): its warm-up factor counter // W keeps growing, so at 2W
    it applies r' = 1 + 2 (r - 1) and d' = 2 d; brn's converted layer keeps the paper's clipping."""
    torch.manual_seed(0)
    layer = peer_layer("torchrl", features=4, warmup_steps=3)
    layer.weight.data.fill_(1.0)
    x = torch.randn(16, 4) * 3 + 2

    def normalized(step: int) -> torch.Tensor:
        probe = copy.deepcopy(layer)
        probe.num_batches_tracked.fill_(step)
        with torch.no_grad():
            return probe(x)

    z0, z1, z2 = normalized(0), normalized(3), normalized(6)
    torch.testing.assert_close(z2, 2 * z1 - z0, rtol=1e-5, atol=1e-5)
    layer.num_batches_tracked.fill_(6)
    assert peer_schedule(layer).limits() == (3.0, 5.0)


# ---------------------------------------------------------------------------------------------------------
# Refusals, docstrings, CLI


def test_peer_schedule_refuses_a_model_without_peers_or_with_two_positions():
    with pytest.raises(BrnError, match="no torchrl or sb3-contrib"):
        peer_schedule(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    model = nn.Sequential(peer_layer("sb3"), peer_layer("sb3"))
    model[1].steps.fill_(3)
    with pytest.raises(BrnError, match="different warm-up positions"):
        peer_schedule(model)


def test_a_subclass_overriding_forward_is_skipped():
    class Custom(sb3_layers.BatchRenorm1d):
        def forward(self, x):
            return super().forward(x) * 2

    (decision,) = plan_conversion(nn.Sequential(Custom(4)))
    assert decision.action == "skip" and "overrides forward()" in decision.reason


@pytest.mark.parametrize(
    "name", ["peer_schedule", "PeerSchedule", "RenormScheduler.from_checkpoint", "nn.peers.peer_record"]
)
def test_docstring_examples_run(name):
    obj = brn_cli
    for part in name.split("."):
        obj = getattr(obj, part) if part != "nn" else importlib.import_module("brn_cli.nn")
    tests = [t for t in doctest.DocTestFinder().find(obj, name, globs={}) if t.examples]
    assert tests
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0


def test_inspect_and_convert_list_them(run_cli, tmp_path):
    torch.manual_seed(0)
    model = sb3_critic()
    train(model, 3)
    source = tmp_path / "critic.pt"
    torch.save(model.state_dict(), source)
    res = run_cli("inspect", source, "--arch", "test_peers:sb3_critic", "--json")
    assert res.code == 0, res.err
    (norm,) = json.loads(res.out)["norms"]
    # Read as sb3-contrib stores it (ra_mean / ra_var), and not run through by the graph tracer (which would
    # count a step and replace its buffers).
    assert norm["type"] == "sb3_contrib.BatchRenorm1d" and norm["health"] == "ok"
    assert norm["on_convert"] == "BatchRenorm1d, warm-up step 3 of 6: BatchNorm, then rmax 3, dmax 5"
    out = tmp_path / "brn.pt"
    res = run_cli("convert", source, "-o", out, "--arch", "test_peers:sb3_critic")
    assert res.code == 0, res.err
    assert "torchrl / sb3-contrib" in res.out
    converted = brn_cli.load_checkpoint(out, arch="test_peers:sb3_critic").model
    x = batch(torch.Generator().manual_seed(1))
    torch.testing.assert_close(converted.eval()(x), model.eval()(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The position in a converted checkpoint: recorded by brn convert, shown by inspect, continued by a scheduler


def torchrl_critic() -> nn.Sequential:
    """Builder for `--arch test_peers:torchrl_critic`."""
    return critic("torchrl", warmup_steps=5)


def classifier(library: str) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), peer_layer(library, 8, warmup_steps=5), nn.ReLU(), nn.Linear(8, 2))


def torchrl_classifier() -> nn.Sequential:
    """Builder for `--arch test_peers:torchrl_classifier` (two classes, for brn finetune)."""
    return classifier("torchrl")


ARCHS = {"torchrl": "test_peers:torchrl_critic", "sb3": "test_peers:sb3_critic"}
BUILDERS = {"torchrl": torchrl_critic, "sb3": sb3_critic}


def saved_mid_warmup(tmp_path, library: str, steps: int = 3) -> tuple[nn.Sequential, object]:
    torch.manual_seed(0)
    model = BUILDERS[library]()
    train(model, steps)
    source = tmp_path / f"{library}.pt"
    torch.save(model.state_dict(), source)
    return model, source


@pytest.mark.filterwarnings("ignore::brn_cli.RenormOpeningWarning")
@pytest.mark.parametrize("library, opens_at", [("torchrl", 5), ("sb3", 6)])
def test_convert_records_the_position_and_from_checkpoint_continues_it(run_cli, tmp_path, library, opens_at):
    """brn convert of a critic at step 3 of its warm-up records the position; a scheduler rebuilt from the
    checkpoint opens the limits at the step where the library's own layer (a shadow copy that keeps
    counting) starts renormalizing: torchrl at counter W = 5, sb3-contrib at counter W + 1 = 6."""
    model, source = saved_mid_warmup(tmp_path, library)
    out = tmp_path / "brn.pt"
    res = run_cli("convert", source, "-o", out, "--arch", ARCHS[library])
    assert res.code == 0, res.err
    assert "recorded in the checkpoint" in res.out
    (entry,) = torch.load(out, weights_only=True)["peer_schedule"]["positions"]
    expected = {"layers": ["1"], "start_step": 3, "warmup_steps": opens_at, "rmax": 3.0, "dmax": 5.0}
    assert {k: entry[k] for k in expected} == expected and entry["ramp"] is False
    assert entry["library"] == ("torchrl" if library == "torchrl" else "sb3-contrib")

    res = run_cli("inspect", out, "--json", "--arch", ARCHS[library])
    assert res.code == 0, res.err
    (shown,) = json.loads(res.out)["peer_warmup"]
    assert shown["description"] == f"warm-up step 3 of {opens_at}: BatchNorm, then rmax 3, dmax 5"
    res = run_cli("inspect", out, "--arch", ARCHS[library])
    assert f"warm-up when converted (layers 1): warm-up step 3 of {opens_at}" in " ".join(res.out.split())

    ckpt = brn_cli.load_checkpoint(out, arch=ARCHS[library])
    converted = ckpt.model.train()
    optimizer = torch.optim.Adam(converted.parameters(), lr=1e-3)
    scheduler = RenormScheduler.from_checkpoint(ckpt, optimizer=optimizer)
    shadow = copy.deepcopy(model[1]).train()
    gen, opened_at = torch.Generator().manual_seed(3), None
    for step in range(3, 9):
        x = batch(gen)
        with torch.no_grad():
            h = model[0](x)
        shadow_opens = renormalizes(shadow, h)
        shadow(h)  # the library's layer counts this step too
        assert (converted[1].rmax > 1.0) == shadow_opens, step
        if shadow_opens and opened_at is None:
            opened_at = step
        loss = (converted(x) - x[:, :1]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert opened_at == opens_at and scheduler.step == 9
    assert (converted[1].rmax, converted[1].dmax) == (3.0, 5.0)


def test_a_checkpoint_without_a_record_or_with_a_damaged_one_says_so(run_cli, tmp_path):
    torch.manual_seed(0)
    plain = brn_cli.save_brn_checkpoint(
        convert_batchnorm(torchrl_critic()), tmp_path / "plain.pt", arch_spec=ARCHS["torchrl"]
    )
    with pytest.raises(BrnError, match="plain.pt: no torchrl / sb3-contrib warm-up position is recorded"):
        RenormScheduler.from_checkpoint(brn_cli.load_checkpoint(plain, arch=ARCHS["torchrl"]))
    position = {"layers": ["1"], "library": "torchrl", "start_step": -2, "warmup_steps": 5}
    damaged = brn_cli.save_brn_checkpoint(
        convert_batchnorm(torchrl_critic()),
        tmp_path / "damaged.pt",
        arch_spec=ARCHS["torchrl"],
        peer_schedule={"positions": [{**position, "rmax": 3.0, "dmax": 5.0, "ramp": False}]},
    )
    res = run_cli("inspect", damaged, "--arch", ARCHS["torchrl"])
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err
    assert "damaged.pt: damaged brn checkpoint: 'peer_schedule'" in res.err and "whole numbers" in res.err


def test_parts_at_different_positions_are_recorded_apart_and_continued_by_part():
    """A CrossQ actor and critic count their steps apart: the record keeps both, and a scheduler continues
    the part it is asked for."""
    from brn_cli.nn.peers import peer_record, recorded_peer_schedule
    from brn_cli.storage.checkpoint import LoadedCheckpoint

    model = nn.ModuleDict(
        {"actor": critic("sb3", warmup_steps=5), "critic": critic("torchrl", warmup_steps=5)}
    )
    train(model["actor"], 1)
    train(model["critic"], 4)
    record = peer_record(model)
    assert [(e["layers"], e["start_step"]) for e in record["positions"]] == [
        (["actor.1"], 1),
        (["critic.1"], 4),
    ]
    assert recorded_peer_schedule(record, "critic").start_step == 4
    assert peer_record(model, ["critic.1"])["positions"][0]["layers"] == ["critic.1"]
    convert_batchnorm(model)
    ckpt = LoadedCheckpoint(model, Path("ac.pt"), "brn", [], peer_schedule=record)
    with pytest.raises(
        BrnError, match=r"ac.pt: .*different warm-up positions .*actor.1: warm-up step 1 of 6"
    ):
        RenormScheduler.from_checkpoint(ckpt)
    sched = RenormScheduler.from_checkpoint(ckpt, part="critic")
    assert sched.step == 4 and sched.values(5) == (3.0, 5.0) and sched.model is model["critic"]


@pytest.mark.parametrize(
    "position",
    [
        brn_cli.PeerSchedule(start_step=3, warmup_steps=5, rmax=3.0, dmax=5.0),
        brn_cli.PeerSchedule(start_step=4, warmup_steps=5, rmax=2.0, dmax=4.0),
        brn_cli.PeerSchedule(start_step=7, warmup_steps=5, rmax=3.0, dmax=5.0),
        brn_cli.PeerSchedule(start_step=4, warmup_steps=10, rmax=3.0, dmax=5.0, ramp=True),
        brn_cli.PeerSchedule(start_step=0, warmup_steps=0, rmax=3.0, dmax=5.0),
    ],
)
def test_remaining_specs_count_the_same_schedule_from_zero(position):
    """What brn finetune is told to pass: a schedule from step 0 with the limits the position's would have."""
    model = nn.Sequential(BatchRenorm1d(2))
    continued = RenormScheduler.from_specs(model, **position.scheduler_kwargs())
    rmax, dmax = position.remaining_specs()
    restarted = RenormScheduler.from_specs(model, rmax, dmax)
    for k in range(15):
        assert restarted.values(k) == pytest.approx(continued.values(position.start_step + k)), k
    assert brn_cli.PeerSchedule.from_dict(position.to_dict()) == position


@pytest.mark.filterwarnings("ignore::brn_cli.RenormOpeningWarning")
def test_finetune_says_once_that_it_does_not_continue_the_position_and_how_to(run_cli, tmp_path):
    """brn finetune runs its own schedule over its own steps: on a checkpoint recording a peer warm-up it says
    so in one note, with the flags that would continue it; given those, the limits open at the step where
    torchrl's layer would have (its counter at W = 5: the run's third step, from step 3 of 5)."""
    torch.manual_seed(0)
    model = torchrl_classifier()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(32, 6, generator=gen))
    source, converted = tmp_path / "critic.pt", tmp_path / "brn.pt"
    torch.save(model.state_dict(), source)
    x = torch.randn(64, 6, generator=gen)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=x.numpy(), y_train=(x[:, 0] > 0).long().numpy())
    arch = ["--arch", "test_peers:torchrl_classifier"]
    assert run_cli("convert", source, "-o", converted, *arch).code == 0
    continuing = "--rmax-schedule 1:1,2:3 --dmax-schedule 1:0,2:5"

    def finetune(checkpoint, run: str, *extra: str):
        args = [checkpoint, "--data", data, "-o", tmp_path / run, *arch, "--steps", "3", "--batch-size", "16"]
        res = run_cli("finetune", *args, "--log-every", "1", *extra)
        assert res.code == 0, res.err
        notes = [line for line in res.err.splitlines() if line.startswith("note:")]
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        phases = [r["batchnorm_phase"] for r in records if r["kind"] == "train"]
        return notes, phases, torch.load(tmp_path / run / "last.pt", weights_only=True)

    for checkpoint, run in ((converted, "own"), (source, "raw")):  # a raw torchrl model converts on the fly
        (note,), _, last = finetune(checkpoint, run)
        assert f"{checkpoint.name} records a torchrl warm-up position (warm-up step 3 of 5" in note
        assert "does not continue it" in note and note.endswith(f"to continue it, {continuing}")
        assert "peer_schedule" not in last  # this run's schedule replaced the position
    notes, phases, _ = finetune(converted, "continued", *continuing.split())
    assert notes == [] and phases == [1.0, 1.0, 0.0]
