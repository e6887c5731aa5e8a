"""brn in the user's own training loop: the public API, the schedule position in the user's checkpoint, safe
defaults (refusal, the opening warning), calibration from any iterable, nested outputs, and the code blocks
of README.md's Library section and docs/own-loop.md."""

from __future__ import annotations

import doctest
import inspect
import io
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import brn_cli
from brn_cli import BatchRenorm1d, BrnError, RenormOpeningWarning, RenormScheduler
from brn_cli.nn.outputs import flat_outputs

REPO = Path(__file__).resolve().parents[1]

# The names an own loop needs (GUIDE section 9), each with a docstring example run below.
OWN_LOOP_NAMES = [
    "RenormScheduler",
    "calibrate",
    "flat_outputs",
    "LabelBatchSampler",
    "set_microbatch",
    "set_renorm_limits",
    "export_state_dict",
]


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of a markdown file."""
    text = path.read_text(encoding="utf-8")
    return [
        (text[: m.start()].count("\n") + 2, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)
    ]


def _run_block(code: str, where: str) -> None:
    exec(compile(code, where, "exec"), {"__name__": "__main__"})


# ---------------------------------------------------------------------------------------------------------
# Public API


def test_every_public_name_resolves_and_the_own_loop_names_are_there():
    for name in brn_cli.__all__:
        assert getattr(brn_cli, name) is not None, name
    for name in (
        "convert_batchnorm",
        "RenormScheduler",
        "calibrate",
        "LabelBatchSampler",
        "set_microbatch",
        "set_renorm_limits",
        "configure_stats_sync",
        "collect_telemetry",
        "fold_model",
        "export_onnx_checked",
        "verify_onnx",
        "export_state_dict",
    ):
        assert name in brn_cli.__all__, name
    from brn_cli.evaluation.calibrate import calibrate_inputs

    assert brn_cli.calibrate is calibrate_inputs  # the form that takes any iterable


@pytest.mark.parametrize("name", OWN_LOOP_NAMES)
def test_docstring_examples_run(name):
    obj = getattr(brn_cli, name)
    finder = doctest.DocTestFinder()
    tests = [t for t in finder.find(obj, name, globs={}) if t.examples]
    assert tests, f"{name} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0


# ---------------------------------------------------------------------------------------------------------
# The schedule position travels in the user's checkpoint (model + optimizer state_dicts only)


def _critic(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), BatchRenorm1d(12, momentum=0.1), nn.ReLU(), nn.Linear(12, 1))


def _build(seed: int):
    model = _critic(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RenormOpeningWarning)
        scheduler = RenormScheduler.from_specs(model, "2:1,8:3", "2:0,10:5", optimizer=optimizer)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, first: int, last: int) -> list[tuple[float, float]]:
    """Steps first..last-1 on batches fixed by the step number; the limits each step trained with."""
    used = []
    for step in range(first, last):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
        used.append((model[1].rmax, model[1].dmax))
        loss = (model(x) - x[:, :1]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RenormOpeningWarning)
            optimizer.step()
    return used


def _save_and_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("scheduler_first", [True, False], ids=["scheduler-then-load", "load-then-scheduler"])
def test_resume_from_model_and_optimizer_state_dicts_continues_the_schedule_exactly(scheduler_first):
    model, optimizer, scheduler = _build(0)
    straight = _train(model, optimizer, scheduler, 0, 12)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, scheduler = _build(0)
    before = _train(model, optimizer, scheduler, 0, 5)
    checkpoint = _save_and_load({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    if scheduler_first:  # the usual order: build everything, then load
        model, optimizer, scheduler = _build(1)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    else:
        model = _critic(1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler = RenormScheduler.from_specs(model, "2:1,8:3", "2:0,10:5", optimizer=optimizer)
    assert scheduler.step == 5
    after = _train(model, optimizer, scheduler, 5, 12)

    assert before + after == straight
    assert straight[-1] == (3.0, 5.0) and straight[0] == (1.0, 0.0)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_the_position_adds_no_key_to_the_model_state_dict():
    model, optimizer, scheduler = _build(0)
    _train(model, optimizer, scheduler, 0, 3)
    plain = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 1))
    plain.load_state_dict(model.state_dict(), strict=True)
    assert optimizer.state_dict()["param_groups"][0]["brn_renorm_step"] == 3


def test_an_optimizer_state_without_a_position_is_reported_at_the_next_step():
    model = _critic(0)
    bare = torch.optim.Adam(model.parameters(), lr=1e-2)  # trained without a scheduler
    model(torch.randn(8, 6)).sum().backward()
    bare.step()
    saved = _save_and_load(bare.state_dict())

    model, optimizer, scheduler = _build(0)
    optimizer.load_state_dict(saved)
    model(torch.randn(8, 6)).sum().backward()
    with pytest.warns(UserWarning, match="carried no schedule position"):
        optimizer.step()

    # brn's own runs restore the scheduler's state right after the optimizer's: no warning then.
    model, optimizer, scheduler = _build(0)
    optimizer.load_state_dict(saved)
    scheduler.load_state_dict({**scheduler.state_dict(), "step": 7})
    model(torch.randn(8, 6)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", RenormOpeningWarning)
        optimizer.step()
    assert scheduler.step == 8 and optimizer.param_groups[0]["brn_renorm_step"] == 8

    # Attaching to an optimizer that has stepped but carries no position is reported the same way.
    model = _critic(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(saved)
    RenormScheduler.from_preset(model, "off", optimizer=optimizer)
    model(torch.randn(8, 6)).sum().backward()
    with pytest.warns(UserWarning, match="carried no schedule position"):
        optimizer.step()


# ---------------------------------------------------------------------------------------------------------
# Warm-up form, refusal, the opening warning


def test_warmup_is_batchnorm_for_w_steps_then_the_limits():
    model = _critic(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scheduler = RenormScheduler.warmup(model, optimizer, warmup_steps=3)
    used = _train(model, optimizer, scheduler, 0, 5)
    assert used == [(1.0, 0.0)] * 3 + [(3.0, 5.0)] * 2
    assert RenormScheduler.warmup(model, warmup_steps=0, rmax=2.0, dmax=1.0).values(0) == (2.0, 1.0)
    with pytest.raises(BrnError) as err:
        RenormScheduler.warmup(model, warmup_steps=-1)
    assert err.value.param == "warmup_steps"
    with pytest.raises(BrnError, match="rmax must be >= 1"):
        RenormScheduler.warmup(model, warmup_steps=5, rmax=0.5)


def test_the_scheduler_refuses_a_model_without_renorm_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(BrnError, match=r"Sequential\) has no Batch Renorm layers.*convert_batchnorm") as err:
        RenormScheduler.from_preset(model, "paper", optimizer=optimizer)
    assert err.value.param == "model"
    assert not optimizer._optimizer_step_post_hooks  # nothing attached


def _far_batches(step: int) -> torch.Tensor:
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(step)) * 20 + 30


def test_opening_the_limits_far_from_the_batch_statistics_warns_once_naming_the_layer():
    model = _critic(0)  # fresh moving averages (mean 0, var 1); inputs far from them
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    RenormScheduler.from_specs(model, "1:1,2:3", "1:0,2:5", optimizer=optimizer)
    caught = []
    for step in range(4):
        model(_far_batches(step)).mean().backward()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            optimizer.step()
        caught += [w for w in seen if issubclass(w.category, RenormOpeningWarning)]
    assert len(caught) == 1
    assert "layer 1's moving averages are far" in str(caught[0].message)


def test_no_opening_warning_after_calibration():
    model = _critic(0)
    brn_cli.calibrate(model, [_far_batches(s) for s in range(8)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    RenormScheduler.from_specs(model, "1:1,2:3", "1:0,2:5", optimizer=optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RenormOpeningWarning)
        for step in range(4):
            model(_far_batches(step)).mean().backward()
            optimizer.step()


# ---------------------------------------------------------------------------------------------------------
# Calibration from any iterable of inputs


def _exact_linear_stats(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        h = model[0](x).double()
    return h.mean(0), h.var(0, unbiased=False)


def test_calibrate_takes_a_shuffling_loader_with_labels_and_a_plain_iterator():
    torch.manual_seed(0)
    x = torch.randn(48, 6) * 3 + 2
    data = TensorDataset(x, torch.randint(0, 3, (48,)))
    shuffling = DataLoader(data, batch_size=8, shuffle=True)
    from brn_cli.evaluation.calibrate import calibrate as calibrate_replaying

    model = _critic(0)
    with pytest.raises(BrnError, match="different batches on a second pass"):
        calibrate_replaying(model, shuffling, num_batches=6)  # why the public form reads the data once

    shifts = brn_cli.calibrate(model, shuffling)  # every batch, read once
    mean, var = _exact_linear_stats(model, x)
    assert shifts[0].name == "1" and shifts[0].examples == 48
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-5, atol=1e-5)
    assert model.training  # flags restored

    model = _critic(0)
    brn_cli.calibrate(model, iter([x[:24], x[24:]]), num_batches=1)  # only the first batch
    mean, _ = _exact_linear_stats(model, x[:24])
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-5, atol=1e-5)

    with pytest.raises(BrnError, match="calibration input 0 is a dict") as err:
        brn_cli.calibrate(model, [{"x": x}])
    assert err.value.param == "inputs"
    with pytest.raises(BrnError, match="data is empty"):
        brn_cli.calibrate(model, [])


# ---------------------------------------------------------------------------------------------------------
# Nested outputs


def test_flat_outputs_reads_any_nesting_in_a_deterministic_order():
    a, b, c, d, e = (torch.full((1,), float(i)) for i in range(5))
    detector_like = [{"boxes": a, "labels": b, "scores": None}, {"boxes": c, "extra": {"k": [d, (e, 3)]}}]
    assert [float(t) for t in flat_outputs(detector_like)] == [0, 1, 2, 3, 4]
    leaves = torch.utils._pytree.tree_leaves(detector_like)  # torch.onnx flattens outputs in this order
    assert flat_outputs(detector_like) == [t for t in leaves if isinstance(t, torch.Tensor)]
    assert flat_outputs(("text", 1, None)) == []
    assert flat_outputs(a) == [a]


class _NestedOut(nn.Module):
    """Returns a list of dicts whose tensors all depend on a norm, like a detector's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn(self.conv(x))
        return [{"boxes": h[:, :2], "aux": {"scores": [h.mean((2, 3))]}} for _ in range(2)]


def test_the_conversion_check_compares_tensors_deep_in_nested_outputs():
    from brn_cli.nn.convert import max_eval_difference

    torch.manual_seed(0)
    original = _NestedOut().eval()
    original.bn.running_mean.uniform_(-1, 1)
    converted = brn_cli.convert_batchnorm(_copy(original))
    assert max_eval_difference(original, converted, [2, 3, 5, 5]) == 0.0
    with torch.no_grad():
        converted.bn.running_mean[3] += 1.0  # changes only channels past the "boxes" slice
    assert max_eval_difference(original, converted, [2, 3, 5, 5]) > 0.1


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# ---------------------------------------------------------------------------------------------------------
# The documents' code


def test_readme_library_block_runs_as_written(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Library") : text.index("\n## ", text.index("## Library") + 1)]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert blocks and "RenormScheduler" in blocks[0]
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        _run_block(code, "README.md (Library)")


@pytest.mark.parametrize(
    "line,code", _python_blocks(REPO / "docs" / "own-loop.md"), ids=lambda v: str(v)[:12]
)
def test_own_loop_doc_blocks_run_as_written(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run_block(code, f"docs/own-loop.md:{line}")


def test_scheduler_warnings_point_at_the_users_optimizer_step():
    """The scheduler runs from an optimizer hook; its warnings must name the user's line, not brn's or torch's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    brn_cli.convert_batchnorm(model)
    with torch.no_grad():
        model[1].running_mean.fill_(50.0)  # far from any batch: the opening warning fires
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    RenormScheduler.from_specs(model, "0:3", "0:5", optimizer=optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(16, 4)).sum().backward()
        step_line = inspect.currentframe().f_lineno + 1
        optimizer.step()
    opening = [w for w in caught if issubclass(w.category, RenormOpeningWarning)]
    assert len(opening) == 1
    assert (opening[0].filename, opening[0].lineno) == (__file__, step_line)
