"""The renorm layer against Algorithm 1 and its invariants (GUIDE section 1).

The reference is written independently in numpy from the paper: the forward of Algorithm 1 and the
explicit backward formulas of section 3 (dl/dxhat, dl/dsigma_B, dl/dmu_B, dl/dx, dl/dgamma, dl/dbeta),
not autograd of the layer's own code.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from brn_cli.nn.layer import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    BatchRenormNd,
    batch_renorm,
)
from brn_cli.nn.norms import collect_telemetry

INF = float("inf")
LAYERS = {2: BatchRenorm1d, 3: BatchRenorm1d, 4: BatchRenorm2d, 5: BatchRenorm3d}
NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def paper_step(x, dy, gamma, beta, mu, sigma, *, eps, momentum, rmax, dmax):
    """One training step of Algorithm 1 with the paper's backward formulas, per channel, in numpy.

    x, dy: [N, C, ...]; gamma, beta, mu, sigma: [C]. Returns y, dx, dgamma, dbeta, new mu, new sigma
    and the unclipped r, d.
    """
    c = x.shape[1]
    xc = np.moveaxis(x, 1, 0).reshape(c, -1)  # [C, m]
    dyc = np.moveaxis(dy, 1, 0).reshape(c, -1)
    m = xc.shape[1]
    mu_b = xc.mean(axis=1)
    sigma_b = np.sqrt(eps + ((xc - mu_b[:, None]) ** 2).mean(axis=1))
    r_raw = sigma_b / sigma
    d_raw = (mu_b - mu) / sigma
    r = np.clip(r_raw, 1.0 / rmax, rmax)
    d = np.clip(d_raw, -dmax, dmax)
    xhat = (xc - mu_b[:, None]) / sigma_b[:, None] * r[:, None] + d[:, None]
    y = gamma[:, None] * xhat + beta[:, None]
    # Section 3, r and d constant:
    dxhat = dyc * gamma[:, None]
    dsigma_b = (dxhat * (xc - mu_b[:, None])).sum(axis=1) * (-r / sigma_b**2)
    dmu_b = dxhat.sum(axis=1) * (-r / sigma_b)
    dx = (
        dxhat * (r / sigma_b)[:, None]
        + dsigma_b[:, None] * (xc - mu_b[:, None]) / (m * sigma_b[:, None])
        + dmu_b[:, None] / m
    )
    dgamma = (dyc * xhat).sum(axis=1)
    dbeta = dyc.sum(axis=1)
    new_mu = mu + momentum * (mu_b - mu)
    new_sigma = sigma + momentum * (sigma_b - sigma)

    def back(t):
        rest = x.shape[:1] + x.shape[2:]
        return np.moveaxis(t.reshape(c, *rest), 0, 1)

    return back(y), back(dx), dgamma, dbeta, new_mu, new_sigma, r_raw, d_raw


def _random_layer(cls, c, *, seed, dtype=torch.float64, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    layer = cls(c, dtype=dtype, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
        layer.bias.copy_(torch.randn(c, generator=gen))
        layer.running_mean.copy_(torch.randn(c, generator=gen))
        layer.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.2)
    return layer


def _batch(shape, *, seed, dtype=torch.float64):
    """Per-channel shifted and scaled data, so batch statistics differ from the moving averages."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    view = (1, c) + (1,) * (len(shape) - 2)
    scale = (torch.rand(c, generator=gen) * 2.5 + 0.3).view(view)
    shift = torch.randn(c, generator=gen).view(view) * 2
    return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype)


@pytest.mark.parametrize("shape", [(16, 6), (6, 5, 7), (4, 6, 5, 3), (3, 4, 3, 4, 2)])
def test_algorithm1_forward_backward_moving_averages_match_paper_float64(shape):
    layer = _random_layer(LAYERS[len(shape)], shape[1], seed=1, eps=1e-3)
    mu = layer.running_mean.numpy().copy()
    sigma = np.sqrt(layer.running_var.numpy() + layer.eps)
    # Limits and rate change between steps: each step must read the current attributes.
    settings = [(1.5, 0.3, 0.1), (1.0, 0.0, 0.2), (INF, INF, 0.5), (2.0, 1.0, 0.01), (1.2, INF, 0.3)]
    clipped_some = False
    for step, (rmax, dmax, momentum) in enumerate(settings):
        layer.rmax, layer.dmax, layer.momentum = rmax, dmax, momentum
        x = _batch(shape, seed=10 + step).requires_grad_(True)
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(20 + step), dtype=torch.float64)
        y = layer(x)
        dx, dgamma, dbeta = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)

        ref = paper_step(
            x.detach().numpy(),
            dy.numpy(),
            layer.weight.detach().numpy(),
            layer.bias.detach().numpy(),
            mu,
            sigma,
            eps=layer.eps,
            momentum=momentum,
            rmax=rmax,
            dmax=dmax,
        )
        y_ref, dx_ref, dgamma_ref, dbeta_ref, mu, sigma, r_raw, d_raw = ref
        if rmax not in (1.0, INF):
            clip_r = (r_raw > rmax) | (r_raw < 1 / rmax)
            clipped_some |= bool(clip_r.any() and not clip_r.all())
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dx.numpy(), dx_ref, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(dgamma.numpy(), dgamma_ref, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(dbeta.numpy(), dbeta_ref, rtol=1e-9, atol=1e-10)
        # Moving averages of mu and sigma (not the variance), stored as var = sigma^2 - eps.
        np.testing.assert_allclose(layer.running_mean.numpy(), mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_sigma.numpy(), sigma, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_var.numpy(), sigma**2 - layer.eps, rtol=1e-12, atol=1e-12)
    assert clipped_some, "the data must clip r in some channels and not in others for the test to bite"
    assert int(layer.num_batches_tracked) == len(settings)


def test_no_affine_matches_paper_with_unit_gamma():
    layer = BatchRenorm2d(3, affine=False, rmax=1.5, dmax=0.5, momentum=0.1, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([0.3, 2.0, 4.0]))
    mu, sigma = layer.running_mean.numpy().copy(), np.sqrt(layer.running_var.numpy() + layer.eps)
    x = _batch((5, 3, 4, 4), seed=3).requires_grad_(True)
    dy = torch.randn_like(x)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    ref = paper_step(
        x.detach().numpy(),
        dy.numpy(),
        np.ones(3),
        np.zeros(3),
        mu,
        sigma,
        eps=1e-5,
        momentum=0.1,
        rmax=1.5,
        dmax=0.5,
    )
    np.testing.assert_allclose(y.detach().numpy(), ref[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx.numpy(), ref[1], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(layer.running_sigma.numpy(), ref[5], rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 6, 7), (2, 5, 3, 4, 4)])
def test_rmax1_dmax0_is_batchnorm_forward_and_backward(shape, dtype):
    bn = NORMS[len(shape)](shape[1], momentum=0.1).to(dtype)
    brn = LAYERS[len(shape)](shape[1], momentum=0.1, rmax=1.0, dmax=0.0).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    brn.load_state_dict(bn.state_dict())
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for step in range(3):
        x = _batch(shape, seed=step, dtype=dtype)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = bn(xa), brn(xb)
        torch.testing.assert_close(yb, ya, **tol)
        dy = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, (xa, bn.weight, bn.bias), dy)
        gb = torch.autograd.grad(yb, (xb, brn.weight, brn.bias), dy)
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(b, a, **tol)
        # Means are averaged the same way; BN averages the unbiased variance, renorm sigma: not compared.
        torch.testing.assert_close(brn.running_mean, bn.running_mean, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unbounded_clipping_training_output_equals_eval_with_pre_step_stats(dtype):
    layer = _random_layer(BatchRenorm2d, 6, seed=4, dtype=dtype, rmax=INF, dmax=INF, momentum=0.3)
    before = copy.deepcopy(layer).eval()
    x = _batch((5, 6, 4, 4), seed=5, dtype=dtype)
    y_train = layer.train()(x)
    y_eval = before(x)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y_train, y_eval, **tol)
    assert not torch.allclose(layer.running_mean, before.running_mean)  # the step did update them


def test_per_channel_gradient_sums_to_zero():
    layer = _random_layer(BatchRenorm2d, 8, seed=6, dtype=torch.float32, rmax=3.0, dmax=5.0)
    x = _batch((6, 8, 5, 5), seed=7, dtype=torch.float32).requires_grad_(True)
    y = layer(x)
    dy = torch.randn_like(y) * 3 + 1  # non-zero mean: the projection has something to remove
    (dx,) = torch.autograd.grad(y, x, dy)
    per_channel = dx.sum(dim=(0, 2, 3))
    scale = dx.abs().sum(dim=(0, 2, 3))
    assert (per_channel.abs() <= 1e-5 * scale).all(), per_channel
    # The projection onto x holds approximately (exactly only for eps = 0).
    xc = x.detach() - x.detach().mean(dim=(0, 2, 3), keepdim=True)
    assert ((dx * xc).sum(dim=(0, 2, 3)).abs() <= 1e-2 * scale).all()


def test_state_dict_round_trip_with_batchnorm():
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3)
        bn.num_batches_tracked.fill_(7)
    x = torch.randn(3, 5, 4, 4) * 2
    brn = BatchRenorm2d(5)
    brn.load_state_dict(bn.state_dict())  # strict: same keys
    assert set(brn.state_dict()) == set(bn.state_dict())
    torch.testing.assert_close(brn.eval()(x), bn.eval()(x), rtol=0, atol=0)
    assert int(brn.num_batches_tracked) == 7

    # Train the renorm layer (live clipping), then load its state into a fresh nn.BatchNorm2d.
    brn.rmax, brn.dmax = 3.0, 5.0
    brn.train()
    for step in range(3):
        brn(_batch((4, 5, 4, 4), seed=step, dtype=torch.float32))
    back = nn.BatchNorm2d(5)
    back.load_state_dict(brn.state_dict())
    torch.testing.assert_close(back.eval()(x), brn.eval()(x), rtol=0, atol=0)
    # ... which is gamma * (x - mu) / sigma + beta with sigma = sqrt(running_var + eps), no second eps.
    view = (1, 5, 1, 1)
    manual = brn.weight.view(view) * (x - brn.running_mean.view(view)) / brn.running_sigma.view(
        view
    ) + brn.bias.view(view)
    torch.testing.assert_close(brn(x), manual, rtol=1e-5, atol=1e-5)


def test_old_batchnorm_checkpoint_without_num_batches_tracked_loads():
    state = nn.BatchNorm2d(4).state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # what a pre-0.4.1 BatchNorm checkpoint says about itself
    layer = BatchRenorm2d(4)
    layer.load_state_dict(state)  # strict
    assert int(layer.num_batches_tracked) == 0
    plain = dict(state)  # no metadata at all
    BatchRenorm2d(4).load_state_dict(plain)


def test_telemetry_matches_hand_computation():
    c = 8
    layer = BatchRenorm2d(c, rmax=1.5, dmax=0.5, dtype=torch.float64)
    assert layer.last_telemetry() is None and collect_telemetry(layer) == {}
    x = _batch((6, c, 5, 5), seed=8)
    mu = layer.running_mean.clone()
    sigma = layer.running_sigma.clone()
    layer(x)
    mu_b = x.mean(dim=(0, 2, 3))
    sigma_b = torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + layer.eps)
    r_raw, d_raw = sigma_b / sigma, (mu_b - mu) / sigma
    expected = (
        float(((r_raw > 1.5) | (r_raw < 1 / 1.5)).double().mean()),
        float((d_raw.abs() > 0.5).double().mean()),
        float(r_raw.log().abs().mean()),
        float(d_raw.abs().mean()),
    )
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1, "the data must clip some channels, not all"
    got = layer.last_telemetry()
    assert got is not None
    np.testing.assert_allclose(
        [got.r_clip_frac, got.d_clip_frac, got.mean_abs_log_r, got.mean_abs_d], expected, rtol=1e-6
    )
    # Eval forwards leave the last training step's telemetry alone; a second layer averages in.
    layer.eval()(x)
    assert layer.last_telemetry() == got
    other = BatchRenorm2d(c, rmax=INF, dmax=INF, dtype=torch.float64)
    other(x)
    avg = collect_telemetry(nn.Sequential(layer, other))
    assert avg["r_clip_frac"] == pytest.approx(expected[0] / 2)
    assert avg["mean_abs_d"] == pytest.approx((expected[3] + other.last_telemetry().mean_abs_d) / 2)

    # Telemetry lives in a (non-persistent) buffer: code that saves and restores buffers around an
    # extra forward gets the original step's telemetry back.
    saved = {n: t.clone() for n, t in layer.named_buffers()}
    layer.train()(x * 3)
    assert layer.last_telemetry() != got
    for n, t in layer.named_buffers():
        t.copy_(saved[n])
    assert layer.last_telemetry() == got
    assert "_telemetry_rd" not in layer.state_dict()

    # The functional form fills a caller's tensor.
    slots = torch.full((4,), float("nan"))
    batch_renorm(
        x,
        mu.clone(),
        sigma.clone() ** 2 - 1e-5,
        training=True,
        rmax=1.5,
        dmax=0.5,
        telemetry=slots,
    )
    np.testing.assert_allclose(slots.tolist(), expected, rtol=1e-5)


def test_bf16_autocast_keeps_statistics_fp32_and_finite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchRenorm2d(8, rmax=3.0, dmax=5.0))
    x = torch.randn(4, 3, 8, 8) * 40  # large activations: a bf16/fp16 variance would be coarse or overflow
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
    norm = model[1]
    assert norm.running_mean.dtype == torch.float32 and norm.running_var.dtype == torch.float32
    assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # Statistics of the bf16 conv output, accumulated in fp32, match a float64 computation.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](x)
    assert h.dtype == torch.bfloat16
    probe = BatchRenorm2d(8, momentum=1.0)
    probe(h)
    ref_var = h.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(probe.running_var.double(), ref_var, rtol=1e-4, atol=1e-3)


def test_fp16_input_with_variance_beyond_fp16_range():
    x = (torch.randn(8, 4, 6, 6) * 400).half()  # variance ~1.6e5 > fp16 max 65504
    layer = BatchRenorm2d(4, momentum=1.0, rmax=3.0, dmax=5.0)
    y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert layer.running_var.dtype == torch.float32 and torch.isfinite(layer.running_var).all()
    torch.testing.assert_close(
        layer.running_var.double(), x.double().var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=0
    )


def test_channels_last_keeps_memory_format_and_values():
    a = _random_layer(BatchRenorm2d, 6, seed=9, dtype=torch.float32, rmax=2.0, dmax=1.0)
    b = copy.deepcopy(a)
    x = _batch((4, 6, 5, 5), seed=10, dtype=torch.float32)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x_nc = x.clone().requires_grad_(True)
    y_cl, y_nc = a(x_cl), b(x_nc)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y_nc)
    dy = torch.randn_like(y_nc)
    (g_cl,) = torch.autograd.grad(y_cl, x_cl, dy.contiguous(memory_format=torch.channels_last))
    (g_nc,) = torch.autograd.grad(y_nc, x_nc, dy)
    torch.testing.assert_close(g_cl, g_nc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.running_var, b.running_var)
    assert a.eval()(x_cl).is_contiguous(memory_format=torch.channels_last)


def test_microbatch_groups_use_their_own_statistics():
    k, groups = 2, 3
    layer = _random_layer(BatchRenorm2d, 4, seed=11, rmax=1.5, dmax=0.5, momentum=0.2)
    singles = [copy.deepcopy(layer) for _ in range(groups)]
    layer.microbatch = k
    x = _batch((k * groups, 4, 3, 3), seed=12).requires_grad_(True)
    dy = torch.randn_like(x)
    y = layer(x)
    dx, dgamma = torch.autograd.grad(y, (x, layer.weight), dy)
    total_dgamma = torch.zeros_like(dgamma)
    for g, single in enumerate(singles):
        part = slice(g * k, (g + 1) * k)
        xg = x.detach()[part].clone().requires_grad_(True)
        yg = single(xg)
        torch.testing.assert_close(y[part], yg, rtol=1e-10, atol=1e-10)
        dxg, dgamma_g = torch.autograd.grad(yg, (xg, single.weight), dy[part])
        torch.testing.assert_close(dx[part], dxg, rtol=1e-9, atol=1e-10)
        total_dgamma += dgamma_g
    torch.testing.assert_close(dgamma, total_dgamma, rtol=1e-9, atol=1e-10)
    # One moving-average step towards the mean over groups of mu_B and of sigma_B.
    pre = _random_layer(BatchRenorm2d, 4, seed=11)
    mu_bs = torch.stack([x.detach()[g * k : (g + 1) * k].mean(dim=(0, 2, 3)) for g in range(groups)])
    sigma_bs = torch.stack(
        [
            torch.sqrt(x.detach()[g * k : (g + 1) * k].var(dim=(0, 2, 3), unbiased=False) + 1e-5)
            for g in range(groups)
        ]
    )
    expect_mu = pre.running_mean + 0.2 * (mu_bs.mean(0) - pre.running_mean)
    expect_sigma = pre.running_sigma + 0.2 * (sigma_bs.mean(0) - pre.running_sigma)
    torch.testing.assert_close(layer.running_mean, expect_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_sigma, expect_sigma, rtol=1e-12, atol=1e-12)
    # Telemetry: a channel counts as clipped when any of its groups was.
    r_raw = sigma_bs / pre.running_sigma
    d_raw = (mu_bs - pre.running_mean) / pre.running_sigma
    tele = layer.last_telemetry()
    assert tele.r_clip_frac == float(((r_raw > 1.5) | (r_raw < 1 / 1.5)).any(0).double().mean())
    assert tele.d_clip_frac == float((d_raw.abs() > 0.5).any(0).double().mean())
    layer.microbatch = 4
    with pytest.raises(ValueError, match="microbatches"):
        layer(x.detach())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="4D"):
        BatchRenorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchRenorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="rmax"):  # checked when set, before any step
        BatchRenorm2d(3, rmax=0.5)
    with pytest.raises(ValueError, match="rmax"):  # the functional form checks at the call
        batch_renorm(torch.randn(2, 3), torch.zeros(3), torch.ones(3), training=True, rmax=0.5)
    BatchRenorm1d(3).eval()(torch.randn(1, 3))  # inference on a single example is fine


def test_not_a_batchnorm_subclass_so_sync_bn_conversion_leaves_it_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchRenorm2d(4, rmax=2.0))
    assert not isinstance(model[1], nn.modules.batchnorm._BatchNorm)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], BatchRenormNd) and converted[1].rmax == 2.0


def test_eval_is_gamma_x_minus_mu_over_sigma_plus_beta_float64():
    layer = _random_layer(BatchRenorm3d, 3, seed=13).eval()
    x = _batch((2, 3, 2, 3, 3), seed=14)
    view = (1, 3, 1, 1, 1)
    sigma = torch.sqrt(layer.running_var + layer.eps)
    manual = layer.weight.view(view) * (x - layer.running_mean.view(view)) / sigma.view(
        view
    ) + layer.bias.view(view)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), manual, rtol=1e-12, atol=1e-12)


def test_bench_layer_reports_ratios_with_live_clipping():
    from brn_cli.recipes.bench import LAYER_TARGETS, bench_layer

    res = bench_layer((4, 6, 5, 5), reps=3, warmup=1)
    assert res["shape"] == [4, 6, 5, 5] and res["threads"] == torch.get_num_threads()
    assert res["r_clip_frac"] == 0.5 and res["d_clip_frac"] == 0.5  # half the channels far from the batch
    assert set(res["ratio"]) == set(LAYER_TARGETS) and all(v > 0 for v in res["ratio"].values())
    assert res["pass"] == {k: res["ratio"][k] <= LAYER_TARGETS[k] for k in LAYER_TARGETS}
    assert all(v > 0 for v in res["ms"].values())


def test_limits_are_validated_when_set():
    layer = BatchRenorm2d(4)
    with pytest.raises(ValueError, match="rmax"):
        layer.rmax = 0.5
    with pytest.raises(ValueError, match="dmax"):
        layer.dmax = -1.0
    with pytest.raises(ValueError, match="rmax"):
        BatchRenorm2d(4, rmax=float("nan"))
    layer.rmax, layer.dmax = float("inf"), 2.5
    assert (layer.rmax, layer.dmax) == (float("inf"), 2.5)
    assert "_limits" not in layer.state_dict()


@pytest.mark.slow
def test_compiled_training_follows_a_changing_schedule_without_recompiling():
    """torch.compile must read rmax/dmax at every step (not bake them in) and not recompile per value."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    eager = BatchRenorm2d(6, momentum=0.3)
    with torch.no_grad():  # moving averages far from the batches, so r and d are clipped for real
        eager.running_mean.fill_(1.0)
        eager.running_var.fill_(4.0)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer)
    clipped = []
    for step in range(5):
        x = torch.randn(8, 6, 5, 5)
        for layer in (eager, compiled_layer):
            layer.rmax, layer.dmax = 1.0 + 0.25 * step, 0.3 * step
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(a), compiled(b)
        (ya * torch.arange(ya.numel()).view_as(ya).sin()).sum().backward()
        (yb * torch.arange(yb.numel()).view_as(yb).sin()).sum().backward()
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled_layer.running_var, eager.running_var)
        clipped.append(eager.last_telemetry().r_clip_frac + eager.last_telemetry().d_clip_frac)
    assert max(clipped[1:]) > 0  # the limits did bind while relaxed, not only at rmax=1, dmax=0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


# ----------------------------------------------------------------------------------------------
# Non-finite statistics, eps, empty batches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("buffer", "values", "words"),
    [
        ("running_var", [INF, INF, INF, 1.0], "running_var holds inf in 3 channels"),
        ("running_var", [float("nan"), 1.0, 1.0, 1.0], "running_var holds NaN in 1 channel"),
        ("running_var", [-0.5, -2.0, 1.0, 1.0], "running_var is negative in 2 channels"),
        ("running_mean", [0.0, -INF, float("nan"), 0.0], "running_mean holds NaN in 1 channel and inf"),
    ],
)
def test_loading_non_finite_or_negative_running_stats_is_refused_naming_the_layer(buffer, values, words):
    from brn_cli.errors import BrnError

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU(), BatchRenorm2d(4)))
    state = model.state_dict()
    state[f"1.1.{buffer}"] = torch.tensor(values)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BrnError, match=rf"^1\.1: {words}") as info:
        model.load_state_dict(state)
    assert "\n" not in str(info.value)
    for key, value in model.state_dict().items():  # refused before anything was copied into the layer
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    # A layer loaded on its own is named by its type; healthy statistics load as before.
    with pytest.raises(BrnError, match=rf"^BatchRenorm2d: {words}"):
        BatchRenorm2d(4).load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("1.1.")})
    state[f"1.1.{buffer}"] = torch.tensor([0.0, 0.5, 2.0, 0.0])
    model.load_state_dict(state)
    assert model[1][1].running_mean.tolist() == state["1.1.running_mean"].tolist()


@pytest.mark.parametrize("bad", [0.0, -1e-5, float("nan"), INF])
def test_eps_must_be_finite_and_positive(bad):
    with pytest.raises(ValueError, match="eps"):
        BatchRenorm2d(3, eps=bad)
    layer = BatchRenorm2d(3, eps=1e-3)
    with pytest.raises(ValueError, match="eps"):
        layer.eps = bad
    assert layer.eps == 1e-3
    with pytest.raises(ValueError, match="eps"):  # the functional form checks at the call
        batch_renorm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, eps=bad)
    # nn.BatchNorm refuses eps <= 0 too, but only once it trains; renorm refuses it up front since
    # sigma_B = sqrt(var_B + eps) divides and a constant channel would give 0/0.
    if bad <= 0:
        with pytest.raises(ValueError, match="eps"):
            nn.BatchNorm2d(3, eps=bad)(torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize(("rmax", "dmax"), [(1.0, 0.0), (3.0, 5.0), (INF, INF)])
def test_running_var_written_as_inf_behaves_as_sigma_inf_and_recovers(rmax, dmax):
    """Loading refuses an infinite running_var; one written into the buffer directly gives Algorithm 1 with
    sigma = inf for that step (r = 1/rmax, d = 0: finite outputs), then running_var saturated at the largest
    finite value; the update sigma + a * (sigma_B - sigma) made it NaN (inf - inf)."""
    layer = BatchRenorm2d(3, rmax=rmax, dmax=dmax, momentum=0.1, dtype=torch.float64)
    with torch.no_grad():
        layer.running_var[:2] = INF
    x = _batch((8, 3, 4, 4), seed=3).requires_grad_(True)
    y = layer(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.running_var).all() and torch.isfinite(layer.running_mean).all()
    # r and d of the inf channels: sigma_B / inf = 0 clipped to 1/rmax, (mu_B - mu) / inf = 0.
    r_raw, d_raw, r, d = layer._telemetry_rd
    assert r[:2].tolist() == [1 / rmax] * 2 and d[:2].tolist() == [0.0, 0.0]
    assert layer.running_var[:2].tolist() == [torch.finfo(torch.float64).max] * 2
    xd = x.detach()
    mu_b, var_b = xd.mean(dim=(0, 2, 3)), xd.var(dim=(0, 2, 3), unbiased=False)
    sigma_b = torch.sqrt(var_b + layer.eps)
    expected = (xd - mu_b.view(1, 3, 1, 1)) / sigma_b.view(1, 3, 1, 1) / rmax
    torch.testing.assert_close(y[:, :2].detach(), expected[:, :2], rtol=1e-12, atol=1e-12)
    for _ in range(3):  # later steps: still finite, and eval too
        layer(_batch((8, 3, 4, 4), seed=4))
    assert torch.isfinite(layer.running_var).all()
    assert torch.isfinite(layer.eval()(xd)).all()


@pytest.mark.parametrize(
    ("dtype", "momentum"),
    [(torch.float32, 0.1), (torch.float32, 0.6), (torch.float32, 1.0), (torch.float16, 1.0)],
)
def test_finite_inputs_never_make_the_moving_averages_non_finite(dtype, momentum):
    """A batch whose variance overflows (finite inputs around 1e20 in float32) saturates running_var at the
    dtype's largest finite value instead of inf (the next step then made it NaN: inf - inf)."""
    layer = BatchRenorm2d(3, momentum=momentum).to(dtype)
    bn = nn.BatchNorm2d(3, momentum=momentum).to(dtype)
    big = 1e20 if dtype == torch.float32 else 1e3  # fp16 buffers: a variance above 65504 overflows them
    seeds = iter(range(100))
    for scale in (big, big, 1.0, big, 1.0):
        x = (_batch((8, 3, 4, 4), seed=next(seeds), dtype=torch.float32) * scale).to(dtype)
        assert torch.isfinite(x).all()
        y = layer(x)
        assert torch.isfinite(layer.running_var).all() and torch.isfinite(layer.running_mean).all()
        assert torch.isfinite(y).all()
        if scale == big:  # saturated, not inf
            assert float(layer.running_var.max()) == torch.finfo(dtype).max
        if dtype == torch.float32:  # rmax=1, dmax=0 is batchnorm's output even when the variance overflows
            torch.testing.assert_close(y, bn(x), rtol=1e-5, atol=1e-5)
    layer.rmax, layer.dmax = 3.0, 5.0
    y = layer((_batch((8, 3, 4, 4), seed=50, dtype=torch.float32) * big).to(dtype))
    assert torch.isfinite(y).all() and torch.isfinite(layer.running_var).all()


def test_finite_inputs_keep_the_moving_averages_finite_with_microbatches():
    layer = BatchRenorm2d(3, momentum=0.6, rmax=3.0, dmax=5.0)
    layer.microbatch = 4
    for seed, scale in enumerate((1e20, 1e20, 1.0, 1e20, 1.0)):
        y = layer(_batch((8, 3, 4, 4), seed=seed, dtype=torch.float32) * scale)
        assert torch.isfinite(y).all() and torch.isfinite(layer.running_var).all()


EMPTY_SHAPES = [(0, 3), (0, 3, 7), (0, 3, 5, 5), (2, 3, 0, 4), (0, 3, 2, 2, 2)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_behaves_as_batchnorm(shape, training):
    layer = _random_layer(LAYERS[len(shape)], 3, seed=5, dtype=torch.float32, rmax=2.0, dmax=1.0)
    bn = NORMS[len(shape)](3)
    bn.load_state_dict(layer.state_dict())
    layer.train(training)
    bn.train(training)
    before = copy.deepcopy(layer.state_dict())
    xa = torch.randn(*shape, requires_grad=True)
    xb = xa.detach().clone().requires_grad_(True)
    ya, yb = layer(xa), bn(xb)
    assert ya.shape == yb.shape == torch.Size(shape)
    ya.sum().backward()
    yb.sum().backward()
    assert xa.grad.shape == xb.grad.shape
    torch.testing.assert_close(layer.weight.grad, bn.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, bn.bias.grad, rtol=0, atol=0)
    for key, value in before.items():  # statistics untouched; num_batches_tracked counts as BatchNorm's
        if key != "num_batches_tracked":
            torch.testing.assert_close(layer.state_dict()[key], value, rtol=0, atol=0)
    assert (
        int(layer.num_batches_tracked)
        == int(bn.num_batches_tracked)
        == int(before["num_batches_tracked"]) + training
    )
    assert layer.last_telemetry() is None  # an empty batch has no r or d


def test_empty_batch_with_microbatches_and_functional_telemetry():
    layer = BatchRenorm2d(3)
    layer.microbatch = 2
    assert layer(torch.randn(0, 3, 4, 4)).shape == (0, 3, 4, 4)
    slots = torch.zeros(4)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_renorm(torch.randn(0, 3), rm, rv, training=True, rmax=2.0, telemetry=slots)
    assert y.shape == (0, 3) and torch.isnan(slots).all()
    assert rm.tolist() == [0.0] * 3 and rv.tolist() == [1.0] * 3
    # Exactly one value per channel is still an error, as in nn.BatchNorm.
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchRenorm2d(3)(torch.randn(1, 3, 1, 1))
