"""The fused per-channel Triton kernel against the eager path, on the CPU through Triton's interpreter.

The layer uses the kernel on CUDA; here the CPU is made a fused device type and TRITON_INTERPRET=1 runs
the same kernel code with numpy, so every comparison below exercises the kernel and the layer's wiring.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="the fused kernel needs triton (shipped with torch's CUDA builds)")

import brn_cli.nn.layer as layer_mod  # noqa: E402
from brn_cli.nn.layer import BatchRenorm1d, BatchRenorm2d  # noqa: E402
from brn_cli.nn.opcount import count_layer_step  # noqa: E402

INF = math.inf


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(layer_mod, "_FUSED_DEVICE_TYPES", frozenset({"cpu"}))


def _stats(c, seed):
    gen = torch.Generator().manual_seed(seed)
    mean_b = torch.randn(c, generator=gen) * 2
    var_b = torch.rand(c, generator=gen) * 3
    running_mean = torch.randn(c, generator=gen)
    running_var = torch.rand(c, generator=gen) * 2
    gamma, beta = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    return mean_b, var_b, running_mean, running_var, gamma, beta


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rmax", "dmax"), [(1.0, 0.0), (1.5, 0.25), (3.0, 5.0), (INF, INF)])
def test_kernel_matches_the_eager_per_channel_step(fused_on_cpu, rmax, dmax, buffer_dtype):
    from brn_cli.nn.triton_renorm import renorm_channel_step

    c, eps, momentum = 300, 1e-3, 0.1  # more channels than one block
    mean_b, var_b, mu, var, gamma, beta = _stats(c, seed=7)
    mu, var = mu.to(buffer_dtype), var.to(buffer_dtype)
    mu_eager, var_eager, mu_fused, var_fused = mu.clone(), var.clone(), mu.clone(), var.clone()
    _, _, invstd, r_raw, d_raw, r, d = layer_mod._per_channel_step(
        mean_b, var_b, mu_eager, var_eager, eps, momentum, rmax, dmax
    )
    w_eff, b_eff = layer_mod._affine_terms(gamma, beta, r, d)
    rows = torch.empty(4, c)
    limits = torch.tensor([rmax, dmax])
    got = renorm_channel_step(mean_b, var_b, mu_fused, var_fused, gamma, beta, limits, rows, eps, momentum)
    tol = {"rtol": 2e-6, "atol": 1e-7}
    for name, expected, actual in zip(
        ("1/sigma_B", "weight'", "bias'", "r", "d"), (invstd, w_eff, b_eff, r, d), got, strict=True
    ):
        torch.testing.assert_close(actual, expected, **tol, msg=name)
    torch.testing.assert_close(rows, torch.stack([r_raw, d_raw, r, d]), **tol)
    # Narrower buffers: the same fp32 values rounded once to the buffer dtype (within one unit in the last
    # place: the interpreter's conversion may round differently from torch's).
    ulp = torch.finfo(buffer_dtype).eps if buffer_dtype != torch.float32 else 0.0
    buffer_tol = {"rtol": max(tol["rtol"], ulp), "atol": tol["atol"]}
    torch.testing.assert_close(mu_fused.float(), mu_eager.float(), **buffer_tol)
    torch.testing.assert_close(var_fused.float(), var_eager.float(), **buffer_tol)
    if rmax == 1.0:
        assert (got[3] == 1).all() and (got[4] == 0).all()
    elif rmax != INF:
        clipped = (rows[0] != rows[2]).float().mean()
        assert 0 < clipped < 1, "some channels clipped, some not"


def test_kernel_without_affine_and_with_nan_or_inf_statistics(fused_on_cpu):
    from brn_cli.nn.triton_renorm import renorm_channel_step

    mean_b, var_b, mu, var, _, _ = _stats(5, seed=3)
    mean_b[0] = math.nan
    var[1] = INF  # sigma = inf for one step: r = 1/rmax, d = 0, running_var saturated
    rows = torch.empty(4, 5)
    _, w, b, r, d = renorm_channel_step(
        mean_b, var_b, mu, var, None, None, torch.tensor([2.0, 1.0]), rows, 1e-5, 0.1
    )
    assert math.isnan(d[0]) and math.isnan(mu[0])  # NaN statistics stay NaN, as in BatchNorm
    assert r[1] == 0.5 and d[1] == 0.0 and var[1] == torch.finfo(torch.float32).max
    torch.testing.assert_close(w, r, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(b, d, rtol=0, atol=0, equal_nan=True)


LIMITS_PER_STEP = [(1.5, 0.5), (3.0, 5.0), (1.0, 0.0)]


def _train_step(layer, shape, dtype, step, channels_last=False, device="cpu"):
    """Output, input and parameter gradients, moving averages and telemetry of training step `step`."""
    layer.rmax, layer.dmax = LIMITS_PER_STEP[step]
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    gen = torch.Generator().manual_seed(step)
    x = (torch.randn(*shape, generator=gen) * 2 + 1).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = layer(x)
    dy = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, (x, *params), dy)
    return (y.detach(), *grads, layer.running_mean.clone(), layer.running_var.clone(), layer.telemetry)


def _train_three_steps(layer, shape, dtype, channels_last=False, device="cpu"):
    return [_train_step(layer, shape, dtype, step, channels_last, device) for step in range(3)]


def _layer_pair(cls, c, dtype=torch.float32, affine=True):
    eager = cls(c, momentum=0.2, affine=affine).to(dtype)
    with torch.no_grad():
        if affine:
            eager.weight.uniform_(0.5, 2.0)
            eager.bias.normal_()
        eager.running_mean.normal_()
        eager.running_var.uniform_(0.2, 3.0)
    fused = cls(c, momentum=0.2, affine=affine).to(dtype)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _tolerance(dtype):
    """fp32 values: as close as two fp32 computations in a different order; values that went through a
    half-precision dtype: one rounding apart (Triton's interpreter may round a conversion the other way)."""
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    ulp = torch.finfo(dtype).eps
    return {"rtol": ulp, "atol": ulp}


# (input shape, input dtype, channels last, layer dtype, affine): low-precision activations into an fp32
# layer (autocast), a module converted as a whole, and layers without gamma and beta.
LAYER_CASES = [
    ((64, 24), torch.float32, False, torch.float32, True),
    ((6, 8, 5, 5), torch.float32, False, torch.float32, True),
    ((6, 8, 5, 5), torch.float32, True, torch.float32, True),
    ((6, 8, 5, 5), torch.bfloat16, False, torch.float32, True),
    ((64, 24), torch.float16, False, torch.float32, True),
    ((6, 8, 5, 5), torch.bfloat16, True, torch.bfloat16, True),
    ((64, 24), torch.float16, False, torch.float16, True),
    ((6, 8, 5, 5), torch.float32, True, torch.float32, False),
    ((64, 24), torch.bfloat16, False, torch.float32, False),
]


@pytest.mark.parametrize(("shape", "dtype", "channels_last", "layer_dtype", "affine"), LAYER_CASES)
def test_layer_with_the_kernel_matches_the_eager_layer(
    monkeypatch, shape, dtype, channels_last, layer_dtype, affine
):
    """Outputs, input and parameter gradients, moving averages and telemetry, step by step."""
    cls = BatchRenorm1d if len(shape) == 2 else BatchRenorm2d
    eager, fused = _layer_pair(cls, shape[1], layer_dtype, affine)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # A converted module keeps its buffers (running stats, telemetry rows) in its own dtype.
    tol = _tolerance if layer_dtype == torch.float32 else lambda _: _tolerance(layer_dtype)
    for step in range(3):
        monkeypatch.setattr(layer_mod, "_FUSED_DEVICE_TYPES", frozenset())
        expected = _train_step(eager, shape, dtype, step, channels_last)
        monkeypatch.setattr(layer_mod, "_FUSED_DEVICE_TYPES", frozenset({"cpu"}))
        assert fused._fused_step_applies(torch.zeros(shape, dtype=dtype))
        got = _train_step(fused, shape, dtype, step, channels_last)
        for a, b in zip(expected, got, strict=True):
            assert b.dtype == a.dtype
            torch.testing.assert_close(b, a, **tol(a.dtype))
        # Each step starts from the same state: Triton's interpreter truncates fp32 -> bf16 conversions
        # where torch (and the GPU) round to nearest, so a bf16 module's buffers drift an ulp a step.
        eager.load_state_dict(fused.state_dict())
    if channels_last:
        x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        assert fused(x).is_contiguous(memory_format=torch.channels_last)


def test_fused_layer_at_rmax1_dmax0_is_batchnorm(fused_on_cpu):
    bn = nn.BatchNorm2d(8, momentum=0.1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
    brn = BatchRenorm2d(8, momentum=0.1)
    brn.load_state_dict(bn.state_dict())
    for step in range(3):
        x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(step)) * 3 + 1
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = bn(xa), brn(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        dy = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, (xa, bn.weight, bn.bias), dy)
        gb = torch.autograd.grad(yb, (xb, brn.weight, brn.bias), dy)
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "layer_dtype", "channels_last", "affine"),
    [
        (torch.float32, torch.float32, False, True),
        (torch.bfloat16, torch.float32, False, True),
        (torch.float16, torch.float16, False, True),
        (torch.bfloat16, torch.bfloat16, True, True),
        (torch.float32, torch.float32, True, False),
    ],
)
def test_fused_step_is_one_operation_per_direction_for_the_per_channel_part(
    fused_on_cpu, dtype, layer_dtype, channels_last, affine
):
    """Fused-path targets against nn.BatchNorm of the same dtypes: forward <= BatchNorm + 3 operations,
    backward <= BatchNorm + 1 (one launch each for the per-channel part, casts to the weight dtype
    included)."""
    x = torch.randn(16, 32, 4, 4, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn = count_layer_step(nn.BatchNorm2d(32, affine=affine).to(layer_dtype), x)
    fused = count_layer_step(BatchRenorm2d(32, rmax=3.0, dmax=5.0, affine=affine).to(layer_dtype), x)
    assert fused.forward_ops.get("brn.renorm_channel_step") == 1
    assert fused.backward_ops.get("brn.renorm_affine_grads", 0) == int(affine)  # no gamma: no dgamma
    assert fused.forward <= bn.forward + 3, fused.forward_ops
    assert fused.backward <= bn.backward + 1, fused.backward_ops


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_affine_grads_kernel_matches_the_eager_backward(fused_on_cpu, weight_dtype, grad_dtype):
    from brn_cli.nn.triton_renorm import renorm_affine_grads

    c = 300  # more channels than one block
    gen = torch.Generator().manual_seed(5)
    gw, gb = (torch.randn(c, generator=gen).mul(10).to(grad_dtype) for _ in range(2))
    r = (torch.rand(c, generator=gen) * 2 + 0.5).clamp(1 / 1.5, 1.5)  # some clipped, as in training
    d = (torch.randn(c, generator=gen)).clamp(-0.5, 0.5)
    dgamma, dbeta = renorm_affine_grads(gw, gb, r, d, weight_dtype)
    expected = torch.addcmul(d * gb.float(), r, gw.float())  # the eager backward's formula
    assert dgamma.dtype == dbeta.dtype == weight_dtype
    # Triton's interpreter truncates fp32 -> bf16 where torch rounds to nearest: one unit apart.
    ulp = 0.0 if weight_dtype == torch.float32 else torch.finfo(weight_dtype).eps
    tol = {"rtol": max(2e-6, ulp), "atol": 1e-6}
    torch.testing.assert_close(dgamma.float(), expected.to(weight_dtype).float(), **tol)
    torch.testing.assert_close(dbeta.float(), gb.to(weight_dtype).float(), **tol)


def test_fused_backward_that_builds_a_graph_matches_the_eager_one(monkeypatch):
    """create_graph=True (a gradient penalty): the dgamma kernel has no derivative, so such a backward
    takes the differentiable ops, and the second-order gradients are the eager layer's."""
    eager, fused = _layer_pair(BatchRenorm1d, 5)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = []
    for layer, devices in ((eager, frozenset()), (fused, frozenset({"cpu"}))):
        monkeypatch.setattr(layer_mod, "_FUSED_DEVICE_TYPES", devices)
        layer.rmax, layer.dmax = 2.0, 1.0
        x = (torch.randn(16, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1).requires_grad_(True)
        gx, gw = torch.autograd.grad(layer(x).pow(2).sum(), (x, layer.weight), create_graph=True)
        (gx.pow(2).sum() + gw.sum()).backward()
        results.append((gx.detach(), gw.detach(), x.grad, layer.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_paths_the_kernel_does_not_cover_fall_back_to_eager(fused_on_cpu):
    x = torch.randn(8, 6, 3, 3)
    micro = BatchRenorm2d(6, rmax=2.0, dmax=1.0)
    micro.microbatch = 4
    wide = BatchRenorm2d(6, rmax=2.0, dmax=1.0, dtype=torch.float64)
    for layer, inp in ((micro, x), (wide, x.double())):
        assert not layer._fused_step_applies(inp)
        assert "brn.renorm_channel_step" not in count_layer_step(layer, inp).forward_ops
    assert BatchRenorm2d(6)._fused_step_applies(x)
    micro.microbatch = 8  # one group: the whole batch, as without microbatches
    assert micro._fused_step_applies(x)
    assert not BatchRenorm2d(6)._fused_step_applies(x[:1, :, :1, :1])  # one value per channel: the error path


def test_microbatch_and_process_group_layers_give_the_eager_results(monkeypatch, tmp_path):
    """With the fused path on, a layer with microbatches or a process group (global statistics, or
    averaged moving averages) takes the eager path: results bit for bit those of the eager layer, and
    neither kernel runs. A 1-process gloo group runs the collectives' code path."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        base = _layer_pair(BatchRenorm2d, 6)[0]

        def layers():
            micro, synced, averaged = (copy.deepcopy(base) for _ in range(3))
            micro.microbatch = 4
            synced.process_group = averaged.process_group = dist.group.WORLD
            averaged.average_stats = True
            return micro, synced, averaged

        shape = (8, 6, 3, 3)
        monkeypatch.setattr(layer_mod, "_FUSED_DEVICE_TYPES", frozenset())
        expected = [_train_three_steps(layer, shape, torch.float32) for layer in layers()]
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(layer_mod, "_FUSED_DEVICE_TYPES", frozenset({"cpu"}))
        for layer, layer_expected in zip(layers(), expected, strict=True):
            assert not layer._fused_step_applies(torch.zeros(shape))
            for step_expected, step_got in zip(
                layer_expected, _train_three_steps(layer, shape, torch.float32), strict=True
            ):
                for a, b in zip(step_expected, step_got, strict=True):
                    torch.testing.assert_close(b, a, rtol=0, atol=0)
            count = count_layer_step(layer, torch.randn(shape))
            assert "brn.renorm_channel_step" not in count.forward_ops
            assert "brn.renorm_affine_grads" not in count.backward_ops
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_on_cuda_matches_the_eager_path(monkeypatch):
    for shape, dtype in (((256, 512), torch.float32), ((8, 16, 14, 14), torch.bfloat16)):
        cls = BatchRenorm1d if len(shape) == 2 else BatchRenorm2d
        eager, fused = (m.cuda() for m in _layer_pair(cls, shape[1]))
        monkeypatch.setattr(layer_mod, "_FUSED_DEVICE_TYPES", frozenset({"cuda"}))
        assert fused._fused_step_applies(torch.zeros(shape, dtype=dtype, device="cuda"))
        got = _train_three_steps(fused, shape, dtype, device="cuda")
        monkeypatch.setattr(layer_mod, "_FUSED_DEVICE_TYPES", frozenset())
        expected = _train_three_steps(eager, shape, dtype, device="cuda")
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        for step_expected, step_got in zip(expected, got, strict=True):
            for a, b in zip(step_expected, step_got, strict=True):
                torch.testing.assert_close(b, a, **tol)


def test_a_fresh_layer_on_the_fused_path_warns_as_the_eager_one(fused_on_cpu, monkeypatch):
    """The warning that a fresh layer's limits were never opened does not depend on the path taken."""
    import warnings

    monkeypatch.setattr(layer_mod, "_limits_warning_given", False)
    layer = BatchRenorm1d(8).train()
    assert layer._fused_step_applies(torch.randn(16, 8))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        layer(torch.randn(16, 8))
    assert any("nothing set its limits" in str(w.message) for w in seen), [str(w.message) for w in seen]
