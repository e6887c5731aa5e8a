"""The per-channel parts of a renorm training step as Triton kernels (CUDA; Triton's interpreter on CPU).

Forward: batch statistics in; 1 / sigma_B, r and d (clipped), BatchNorm's weight' = gamma * r and
bias' = gamma * d + beta, the telemetry rows (r, d unclipped and clipped) and the moving-average update
out, in one launch over the channels, where the eager path needs about ten operations (kernel launches).
Backward: from BatchNorm's gradients for weight' and bias', dgamma = r * dweight' + d * dbias' and dbeta,
cast to the weight's dtype, in one launch (the eager path: two operations plus casts).
Registered with ``torch.library.triton_op``; the forward declares its writes to the running buffers and
the telemetry rows: an op that mutates its inputs is never recomputed, so r and d are never rebuilt from
updated buffers.

Importing this module needs triton (shipped with CUDA builds of torch); the layer imports it only when
it is about to use it, and falls back to the eager path when the import fails.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

__all__ = ["renorm_affine_grads", "renorm_channel_step"]

_BLOCK = 256


def _renorm_channel_kernel(
    mean_b_ptr,
    var_b_ptr,
    mu_ptr,
    var_ptr,
    gamma_ptr,
    beta_ptr,
    limits_ptr,
    invstd_ptr,
    w_ptr,
    b_ptr,
    r_ptr,
    d_ptr,
    rows_ptr,
    c,
    eps,
    momentum,
    var_max,
    HAS_AFFINE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < c
    mean_b = tl.load(mean_b_ptr + offs, mask=mask, other=0.0)
    var_b = tl.load(var_b_ptr + offs, mask=mask, other=1.0)
    dt = tl.float32
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(dt)
    var = tl.load(var_ptr + offs, mask=mask, other=1.0).to(dt)
    rmax = tl.load(limits_ptr).to(dt)
    dmax = tl.load(limits_ptr + 1).to(dt)
    # Correctly rounded, as torch's sqrt and division (tl.sqrt and / may approximate).
    sigma_b = tl.sqrt_rn(var_b + eps)
    sigma = tl.sqrt_rn(var + eps)
    invstd_b = tl.div_rn(1.0, sigma_b)
    r_raw = tl.div_rn(sigma_b, sigma)
    d_raw = tl.div_rn(mean_b - mu, sigma)
    # Clipping keeps NaN statistics NaN, as torch.clamp does.
    r = tl.minimum(
        tl.maximum(r_raw, 1.0 / rmax, propagate_nan=tl.PropagateNan.ALL),
        rmax,
        propagate_nan=tl.PropagateNan.ALL,
    )
    d = tl.minimum(
        tl.maximum(d_raw, -dmax, propagate_nan=tl.PropagateNan.ALL), dmax, propagate_nan=tl.PropagateNan.ALL
    )
    # (1 - a) * old + a * batch, for mu and sigma (not the variance), stored as var = sigma^2 - eps in
    # [0, largest finite value]: as the eager path (layer._per_channel_step).
    new_mu = mu * (1.0 - momentum) + mean_b * momentum
    new_sigma = sigma * (1.0 - momentum) + sigma_b * momentum
    new_var = new_sigma * new_sigma - eps
    new_var = tl.minimum(
        tl.maximum(new_var, 0.0, propagate_nan=tl.PropagateNan.ALL),
        var_max,
        propagate_nan=tl.PropagateNan.ALL,
    )
    if HAS_AFFINE:
        gamma = tl.load(gamma_ptr + offs, mask=mask, other=1.0).to(dt)
        beta = tl.load(beta_ptr + offs, mask=mask, other=0.0).to(dt)
        w = gamma * r
        b = beta + gamma * d
    else:
        w = r
        b = d
    tl.store(mu_ptr + offs, new_mu.to(mu_ptr.dtype.element_ty), mask=mask)
    tl.store(var_ptr + offs, new_var.to(var_ptr.dtype.element_ty), mask=mask)
    tl.store(invstd_ptr + offs, invstd_b, mask=mask)
    tl.store(w_ptr + offs, w, mask=mask)
    tl.store(b_ptr + offs, b, mask=mask)
    tl.store(r_ptr + offs, r, mask=mask)
    tl.store(d_ptr + offs, d, mask=mask)
    row_ty = rows_ptr.dtype.element_ty
    tl.store(rows_ptr + offs, r_raw.to(row_ty), mask=mask)
    tl.store(rows_ptr + c + offs, d_raw.to(row_ty), mask=mask)
    tl.store(rows_ptr + 2 * c + offs, r.to(row_ty), mask=mask)
    tl.store(rows_ptr + 3 * c + offs, d.to(row_ty), mask=mask)


def _renorm_affine_grads_kernel(gw_ptr, gb_ptr, r_ptr, d_ptr, dgamma_ptr, dbeta_ptr, c, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < c
    gw = tl.load(gw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gb = tl.load(gb_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0)
    # y = gamma * (r * xhat + d) + beta, and BatchNorm's backward gave gw = sum(g * xhat), gb = sum(g).
    dgamma = r * gw + d * gb
    tl.store(dgamma_ptr + offs, dgamma.to(dgamma_ptr.dtype.element_ty), mask=mask)
    tl.store(dbeta_ptr + offs, gb.to(dbeta_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=4)
def _kernel(interpret: bool, fn=_renorm_channel_kernel):
    # triton.jit picks compiled or interpreted (TRITON_INTERPRET) when it decorates: one per mode.
    return triton.jit(fn)


@torch.library.triton_op("brn::renorm_channel_step", mutates_args={"running_mean", "running_var", "rows"})
def renorm_channel_step(
    mean_b: Tensor,
    var_b: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    limits: Tensor,
    rows: Tensor,
    eps: float,
    momentum: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One launch: returns (1 / sigma_B, weight', bias', r, d) in the statistics dtype; updates
    running_mean / running_var and writes rows = (r unclipped, d unclipped, r, d) in place.

    mean_b, var_b: batch mean and biased variance in float32 (the kernel's arithmetic; float64 statistics
    stay on the eager path); the running buffers, weight and bias: C contiguous values of any float dtype;
    limits: [rmax, dmax] on the same device; rows: (4, C) contiguous.
    """
    if mean_b.dtype != torch.float32 or var_b.dtype != torch.float32:
        raise ValueError(
            f"renorm_channel_step takes float32 statistics, got {mean_b.dtype} and {var_b.dtype}"
        )
    c = mean_b.numel()
    invstd_b, w_eff, b_eff, r, d = (torch.empty_like(mean_b) for _ in range(5))
    affine = weight is not None and bias is not None
    kernel = torch.library.wrap_triton(_kernel(bool(knobs.runtime.interpret)))
    kernel[(triton.cdiv(c, _BLOCK),)](
        mean_b,
        var_b,
        running_mean,
        running_var,
        weight if affine else mean_b,  # not read without affine
        bias if affine else mean_b,
        limits,
        invstd_b,
        w_eff,
        b_eff,
        r,
        d,
        rows,
        c,
        eps,
        momentum,
        torch.finfo(running_var.dtype).max,
        HAS_AFFINE=affine,
        BLOCK=_BLOCK,
    )
    return invstd_b, w_eff, b_eff, r, d


@torch.library.triton_op("brn::renorm_affine_grads", mutates_args=())
def renorm_affine_grads(
    grad_w_eff: Tensor, grad_b_eff: Tensor, r: Tensor, d: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """One launch: (dgamma, dbeta) = (r * dweight' + d * dbias', dbias') in `dtype` (the weight's), from
    BatchNorm's gradients for weight' and bias' (any float dtype) and float32 r and d.

    dbeta is a copy when `dtype` is float32: returned anyway so that a half-precision module gets both
    gradients cast in the same launch.
    """
    if r.dtype != torch.float32 or d.dtype != torch.float32:
        raise ValueError(f"renorm_affine_grads takes float32 r and d, got {r.dtype} and {d.dtype}")
    c = r.numel()
    dgamma, dbeta = (torch.empty_like(r, dtype=dtype) for _ in range(2))
    kernel = torch.library.wrap_triton(_kernel(bool(knobs.runtime.interpret), _renorm_affine_grads_kernel))
    kernel[(triton.cdiv(c, _BLOCK),)](grad_w_eff, grad_b_eff, r, d, dgamma, dbeta, c, BLOCK=_BLOCK)
    return dgamma, dbeta
