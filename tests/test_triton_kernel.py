"""The fused per-channel Triton kernel against the eager path, on the CPU through Triton's interpreter.

The layer uses the kernel on CUDA; here the CPU is made a fused device type and TRITON_INTERPRET=1 runs
the same kernel code with numpy, so every comparison below exercises the kernel and the layer's wiring.
"""

from __future__ import annotations

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


def _train_three_steps(layer, shape, dtype, channels_last=False, device="cpu"):
    outs = []
    for step, (rmax, dmax) in enumerate([(1.5, 0.5), (3.0, 5.0), (1.0, 0.0)]):
        layer.rmax, layer.dmax = rmax, dmax
        gen = torch.Generator().manual_seed(step)
        x = (torch.randn(*shape, generator=gen) * 2 + 1).to(device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = layer(x)
        dy = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
        grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
        outs.append(
            (y.detach(), *grads, layer.running_mean.clone(), layer.running_var.clone(), layer.telemetry)
        )
    return outs


def _layer_pair(cls, c, dtype=torch.float32):
    eager = cls(c, momentum=0.2).to(dtype)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 2.0)
        eager.bias.normal_()
        eager.running_mean.normal_()
        eager.running_var.uniform_(0.2, 3.0)
    fused = cls(c, momentum=0.2).to(dtype)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


@pytest.mark.parametrize(
    ("shape", "dtype", "channels_last"),
    [
        ((64, 24), torch.float32, False),
        ((6, 8, 5, 5), torch.float32, False),
        ((6, 8, 5, 5), torch.float32, True),
        ((6, 8, 5, 5), torch.bfloat16, False),
        ((64, 24), torch.float16, False),
    ],
)
def test_layer_with_the_kernel_matches_the_eager_layer(monkeypatch, shape, dtype, channels_last):
    cls = BatchRenorm1d if len(shape) == 2 else BatchRenorm2d
    eager, fused = _layer_pair(cls, shape[1])
    expected = _train_three_steps(eager, shape, dtype, channels_last)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(layer_mod, "_FUSED_DEVICE_TYPES", frozenset({"cpu"}))
    assert fused._fused_step_applies(torch.zeros(shape, dtype=dtype))
    got = _train_three_steps(fused, shape, dtype, channels_last)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for step_expected, step_got in zip(expected, got, strict=True):
        for a, b in zip(step_expected, step_got, strict=True):
            torch.testing.assert_close(b, a, **tol)
    if channels_last:
        assert fused(torch.randn(shape).contiguous(memory_format=torch.channels_last)).is_contiguous(
            memory_format=torch.channels_last
        )


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


def test_fused_step_is_one_operation_for_the_per_channel_part(fused_on_cpu):
    """Fused-path targets: forward <= BatchNorm + 3 operations (one launch for the per-channel part)."""
    x = torch.randn(16, 32, 4, 4)
    bn = count_layer_step(nn.BatchNorm2d(32), x)
    fused = count_layer_step(BatchRenorm2d(32, rmax=3.0, dmax=5.0), x)
    assert fused.forward_ops.get("brn.renorm_channel_step") == 1
    assert fused.forward <= bn.forward + 3, fused.forward_ops
    assert fused.backward <= bn.backward + 2, fused.backward_ops


def test_paths_the_kernel_does_not_cover_fall_back_to_eager(fused_on_cpu):
    x = torch.randn(8, 6, 3, 3)
    micro = BatchRenorm2d(6, rmax=2.0, dmax=1.0)
    micro.microbatch = 4
    wide = BatchRenorm2d(6, rmax=2.0, dmax=1.0, dtype=torch.float64)
    for layer, inp in ((micro, x), (wide, x.double())):
        assert not layer._fused_step_applies(inp)
        assert "brn.renorm_channel_step" not in count_layer_step(layer, inp).forward_ops
    assert BatchRenorm2d(6)._fused_step_applies(x)
    assert not BatchRenorm2d(6)._fused_step_applies(x[:1, :, :1, :1])  # one value per channel: the error path


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
