r"""Batch Renormalization layers (Ioffe, NIPS 2017, Algorithm 1).

Per channel (axis 1), statistics over every other axis, in training mode::

    mu_B    = mean(x)
    sigma_B = sqrt(eps + mean((x - mu_B)^2))        # biased, eps inside the sqrt
    r = stop_grad(clip(sigma_B / sigma, 1/rmax, rmax))
    d = stop_grad(clip((mu_B - mu) / sigma, -dmax, dmax))
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
    mu    <- mu    + momentum * (mu_B - mu)         # momentum is the paper's alpha
    sigma <- sigma + momentum * (sigma_B - sigma)   # sigma is averaged, not the variance

and in inference mode ``y = gamma * (x - mu) / sigma + beta``.

State layout is nn.BatchNorm's (``weight, bias, running_mean, running_var, num_batches_tracked``) with
``sigma = sqrt(running_var + eps)``; after each step ``running_var = max(sigma_new^2 - eps, 0)``. So a
BatchNorm state_dict loads here unchanged, a renorm state_dict loads into nn.BatchNorm with the same
inference function, and folding is exactly BatchNorm folding.

Edge cases, decided against nn.BatchNorm:

* ``eps`` must be finite and > 0: sigma_B divides, and a constant channel would give 0/0. (nn.BatchNorm
  accepts eps <= 0 when built and raises once it trains.)
* Running statistics that hold NaN or inf, or a negative running_var, are refused when loaded
  (``load_state_dict`` names the layer). A training step updates sigma as
  ``(1 - momentum) * sigma + momentum * sigma_B`` (defined when either is inf, where
  ``sigma + momentum * (sigma_B - sigma)`` is inf - inf = NaN) and stores running_var clamped to
  [0, largest finite value of its dtype]. So a batch whose variance overflows saturates running_var
  instead of making it inf, and a running_var written as inf into the buffer acts as sigma = inf for one
  step (r = 1/rmax, d = 0, finite outputs) and is then stored saturated. Finite inputs never leave NaN or
  inf in the buffers; NaN or inf inputs give NaN statistics as in BatchNorm.
* An empty batch (any axis of size 0) gives an empty output, zero gradients for gamma and beta, and
  leaves the moving averages alone; ``num_batches_tracked`` still counts it (as nn.BatchNorm).

Speed: with r and d constant, ``y = BN_train(x; weight=gamma*r, bias=gamma*d+beta)`` holds for the output
and for every gradient, so the training step reuses the framework's batch-norm kernels (statistics,
elementwise, backward) inside one autograd.Function and costs what BatchNorm costs. The per-channel work
(r, d, clipping, moving averages, affine terms) is a few foreach operations over the C-sized vectors, and on
CUDA one Triton kernel (:mod:`brn_cli.nn.triton_renorm`).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brn_cli.errors import BrnError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "TELEMETRY_FIELDS",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "BatchRenormAct",
    "BatchRenormNd",
    "RenormTelemetry",
    "batch_renorm",
    "describe_bad_running_stats",
]

# Telemetry slots, computed from per-channel vectors only (no extra pass over the activations).
TELEMETRY_FIELDS = ("r_clip_frac", "d_clip_frac", "mean_abs_log_r", "mean_abs_d", "batchnorm_phase")


@dataclass(frozen=True)
class RenormTelemetry:
    """What the last training step of one layer did, from the unclipped per-channel r and d.

    r_clip_frac / d_clip_frac: fraction of channels whose r (resp. d) hit its limit; 0 while that limit
    holds r at 1 (rmax = 1) or d at 0 (dmax = 0): the BatchNorm phase, where nothing renorm uses is clipped.
    mean_abs_log_r / mean_abs_d: how far the batch statistics were from the moving averages.
    batchnorm_phase: the step ran as plain BatchNorm (rmax = 1 and dmax = 0).
    """

    r_clip_frac: float
    d_clip_frac: float
    mean_abs_log_r: float
    mean_abs_d: float
    batchnorm_phase: bool = False


# ----------------------------------------------------------------------------------------------
# Functional core
# ----------------------------------------------------------------------------------------------


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of `x`, always in float32 or wider.

    Uses the kernel nn.BatchNorm uses for its own statistics (one read of `x`, any memory format).
    """
    stat_dtype = _stat_dtype(x.dtype)
    if x.dtype == stat_dtype:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    else:
        # Half-precision input: passing fp32 running buffers selects the mixed-precision kernel, which
        # accumulates and returns fp32 statistics. The outputs do not depend on what the buffers hold
        # (momentum 0), so they are scratch, kept between steps.
        scratch_mean, scratch_var = _scratch_buffers(x, stat_dtype)
        mean, var = torch.batch_norm_update_stats(x, scratch_mean, scratch_var, 0.0)
    return _as(mean, stat_dtype), _as(var, stat_dtype)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float32 for half-precision inputs, else the input's own."""
    # The common dtypes by lookup: torch.promote_types is a dispatched operation, one more per step.
    known = _STAT_DTYPES.get(dtype)
    return known if known is not None else torch.promote_types(dtype, torch.float32)


_STAT_DTYPES = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Tensor.to costs a few microseconds even when it is a no-op; the hot path skips it.
    return t if t.dtype == dtype else t.to(dtype)


Limit = float | Tensor  # a float, or a 0-dim tensor under torch.compile (see BatchRenormNd._limits)


def _clip_r(r: Tensor, rmax: Limit) -> Tensor:
    if isinstance(rmax, Tensor):
        return torch.clamp(r, torch.reciprocal(rmax), rmax)
    return r.clamp(1.0 / rmax, rmax) if rmax != math.inf else r


def _clip_d(d: Tensor, dmax: Limit) -> Tensor:
    if isinstance(dmax, Tensor):
        return torch.clamp(d, -dmax, dmax)
    return d.clamp(-dmax, dmax) if dmax != math.inf else d


def _sync_stats(mean: Tensor, var: Tensor, count: int, process_group) -> tuple[Tensor, Tensor]:
    """Combine per-rank (mean, biased var, count) into global ones with one all_reduce of sums."""
    import torch.distributed as dist

    packed = torch.cat(
        [
            (mean.double() * count),
            (var.double() + mean.double() ** 2) * count,
            torch.tensor([float(count)], device=mean.device, dtype=torch.float64),
        ]
    )
    dist.all_reduce(packed, group=process_group)
    c = mean.numel()
    total = packed[-1]
    g_mean = packed[:c] / total
    g_var = (packed[c : 2 * c] / total - g_mean**2).clamp_min(0.0)
    return g_mean.to(mean.dtype), g_var.to(var.dtype)


def _telemetry_values(rd: Tensor) -> Tensor:
    """(r clip fraction, d clip fraction, mean |log r|, mean |d|, BatchNorm phase) from the per-channel
    rows (r unclipped, d unclipped, r clipped, d clipped) of one step.

    A channel's r (d) hit its limit exactly when clipping changed it, except while the limit pins every
    channel's r to 1 (rmax = 1) or d to 0 (dmax = 0): renorm is off there, and calling every channel
    "clipped" would read as a saturated schedule. Per-channel vectors only: no pass over the activations.
    NaN rows (no step yet) give NaN statistics.
    """
    rd = rd.detach().float()
    r_off = (rd[2] == 1.0).all()
    d_off = (rd[3] == 0.0).all()
    zero = rd.new_zeros(())
    return torch.stack(
        [
            torch.where(r_off, zero, (rd[2] != rd[0]).float().mean()),
            torch.where(d_off, zero, (rd[3] != rd[1]).float().mean()),
            rd[0].log().abs().mean(),
            rd[1].abs().mean(),
            (r_off & d_off).float(),
        ]
    )


def _statistics_and_update(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    momentum: float,
    rmax: Limit,
    dmax: Limit,
    process_group=None,
    average_stats: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-channel part of a training step, without gradient: the batch statistics, r and d, and the
    moving-average update of running_mean / running_var (in place).

    Returns (mu_B, var_B, 1 / sigma_B, r unclipped, d unclipped, r, d), all in the statistics dtype (fp32
    or wider).
    """
    with torch.no_grad():
        mean_b, var_b = _batch_stats(x)
        if process_group is not None and not average_stats:
            mean_b, var_b = _sync_stats(mean_b, var_b, x.numel() // x.shape[1], process_group)
        averaging_group = process_group if average_stats else None
        return _per_channel_step(
            mean_b, var_b, running_mean, running_var, eps, momentum, rmax, dmax, averaging_group
        )


def _per_channel_step(
    mean_b: Tensor,
    var_b: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    momentum: float,
    rmax: Limit,
    dmax: Limit,
    averaging_group=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """From the batch statistics: 1 / sigma_B, r and d (unclipped and clipped), and the moving averages.

    Every line works on several C-sized vectors at once (torch._foreach_* operations: one dispatch on a
    CPU, one kernel launch on a GPU), so the whole step is 8 operations whatever C is. `averaging_group`
    averages the update of the moving averages over its ranks (average_stats).
    """
    stat_dtype = mean_b.dtype
    # The buffers themselves when they have the statistics dtype (updated in place), else fp32 copies
    # written back at the end (a half-precision module).
    mu = _as(running_mean, stat_dtype)
    var = _as(running_var, stat_dtype)
    neg_eps = _neg_eps_and_zeros(mean_b, eps)[0]
    var_b_eps, var_eps, diff = torch._foreach_sub([var_b, var, mean_b], [neg_eps, neg_eps, mu])
    # pow 0.5 and -0.5 are sqrt and rsqrt (torch special-cases these exponents).
    sigma_b, sigma, invstd_b = torch._foreach_pow([var_b_eps, var_eps, var_b_eps], [0.5, 0.5, -0.5])
    # r and d twice: unclipped for telemetry, and copies clipped in place below.
    r_raw, d_raw, r, d = torch._foreach_div([sigma_b, diff, sigma_b, diff], [sigma] * 4)
    upd_mean, upd_sigma = mean_b, sigma_b
    if averaging_group is not None:
        upd_mean, upd_sigma = _average_over_ranks(mean_b, sigma_b, averaging_group)
    # Moving averages of mu and sigma (not the variance) as (1 - a) * old + a * batch: the form of
    # Algorithm 1's update that stays defined when sigma or sigma_B is inf (old + a * (batch - old) is
    # inf - inf = NaN there). sigma is not needed after r and d: updated in place.
    torch._foreach_mul_([mu, sigma], 1.0 - momentum)
    torch._foreach_add_([mu, sigma], [upd_mean, upd_sigma], alpha=momentum)
    # Stored as BatchNorm's running_var = sigma^2 - eps, never below 0 (sigma >= sqrt(eps) except by
    # rounding) and saturating at the largest finite value: a batch whose variance overflows
    # (sigma_B = inf) leaves it finite.
    torch.addcmul(neg_eps, sigma, sigma, out=var)
    _clip_in_place(r, d, var, rmax, dmax, torch.finfo(running_var.dtype).max)
    if mu is not running_mean:
        running_mean.copy_(mu)
    if var is not running_var:
        running_var.copy_(var)
    return mean_b, var_b, invstd_b, r_raw, d_raw, r, d


def _clip_in_place(r: Tensor, d: Tensor, var: Tensor, rmax: Limit, dmax: Limit, var_max: float) -> None:
    """r to [1/rmax, rmax], d to [-dmax, dmax], var to [0, var_max]; two operations for float limits."""
    if isinstance(rmax, Tensor) or isinstance(dmax, Tensor):  # 0-dim tensors under torch.compile
        r.clamp_(torch.reciprocal(torch.as_tensor(rmax)), rmax)
        d.clamp_(-dmax, dmax)
        var.clamp_(0.0, var_max)
        return
    torch._foreach_clamp_min_([r, d, var], [1.0 / rmax, -dmax, 0.0])
    torch._foreach_clamp_max_([r, d, var], [rmax, dmax, var_max])


def _average_over_ranks(mean_b: Tensor, sigma_b: Tensor, process_group) -> tuple[Tensor, Tensor]:
    """The mean over the group's ranks of each rank's mu_B and sigma_B (one all_reduce, in float64)."""
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    packed = torch.cat([mean_b, sigma_b]).double() / world
    dist.all_reduce(packed, group=process_group)
    c = mean_b.numel()
    return packed[:c].to(mean_b.dtype), packed[c:].to(sigma_b.dtype)


def _neg_eps_and_zeros(like: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """C-sized constants -eps and 0 (dtype and device of `like`), read only. They let one foreach
    operation add eps to two vectors while subtracting the moving mean from a third, and give
    w' = 0 + gamma * r in the same operation as b' = beta + gamma * d."""
    if not _cacheable(like):
        return _new_neg_eps_and_zeros(like.numel(), like.dtype, like.device, eps)
    return _cached_neg_eps_and_zeros(like.numel(), like.dtype, like.device, eps)


def _new_neg_eps_and_zeros(c: int, dtype: torch.dtype, device: torch.device, eps: float):
    rows = torch.tensor([-eps, 0.0], dtype=dtype, device=device).view(2, 1)
    return tuple(rows.expand(2, c).contiguous().unbind(0))


_cached_neg_eps_and_zeros = functools.lru_cache(maxsize=512)(_new_neg_eps_and_zeros)


def _scratch_buffers(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Two tensors of x's channel count for a kernel to write values nobody reads, kept between steps
    (one pair per (C, dtype, device))."""
    if not _cacheable(x):
        return _new_scratch_buffers(x.shape[1], dtype, x.device)
    return _cached_scratch_buffers(x.shape[1], dtype, x.device)


def _new_scratch_buffers(c: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.zeros(c, dtype=dtype, device=device), torch.ones(c, dtype=dtype, device=device)


_cached_scratch_buffers = functools.lru_cache(maxsize=512)(_new_scratch_buffers)


def _cacheable(like: Tensor) -> bool:
    """Whether constants built for `like` may be kept for later steps: not for fake, functional or meta
    tensors (tracing, torch.compile: dynamo cannot trace the inference-mode query), nor inside inference
    mode (inference tensors)."""
    if torch.compiler.is_compiling():
        return False
    return type(like) is Tensor and not like.is_meta and not torch.is_inference_mode_enabled()


# Under torch.compile the per-channel step is plain ops that inductor fuses, except one opaque read of the
# running buffers. Written with the buffers read directly, the AOT partitioner may recompute r and d in the
# backward from running_mean / running_var *after* the in-place update, which silently gives wrong gradients
# (pytorch/pytorch#197039). r and d are computed from this op's copy instead: the partitioner does not recompute
# a custom op (none is on its recomputable allowlist; only torch._functorch.config.aggressive_recomputation
# lifts that), so it saves the copy or r and d, and the backward sees the values the forward used.
@torch.library.custom_op("brn::running_snapshot", mutates_args=())
def _running_snapshot(running_mean: Tensor, running_var: Tensor) -> Tensor:
    return torch.stack([running_mean, running_var])


@_running_snapshot.register_fake
def _(running_mean, running_var):
    return running_mean.new_empty((2, *running_mean.shape))


def _compiled_statistics_and_update(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    momentum: float,
    rmax: Tensor,
    dmax: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_statistics_and_update` written for inductor, same values: plain ops (it fuses them with the
    statistics reduction and the normalization; the foreach forms would run as eager fallbacks), r and d
    from a snapshot of the moving averages, and the update stored into the buffers (in-place stores)."""
    with torch.no_grad():
        stat_dtype = _stat_dtype(x.dtype)
        var_b, mean_b = torch.var_mean(_as(x, stat_dtype), _reduce_dims(x), correction=0)
        mu, var = _as(_running_snapshot(running_mean, running_var), stat_dtype).unbind(0)
        sigma_b, sigma, invstd_b = torch.sqrt(var_b + eps), torch.sqrt(var + eps), torch.rsqrt(var_b + eps)
        r_raw, d_raw = sigma_b / sigma, (mean_b - mu) / sigma
        # (1 - a) * old + a * batch, as the eager step: defined when sigma or sigma_B is inf.
        new_mu = mu * (1.0 - momentum) + mean_b * momentum
        new_sigma = sigma * (1.0 - momentum) + sigma_b * momentum
        new_var = (new_sigma * new_sigma - eps).clamp(0.0, torch.finfo(running_var.dtype).max)
        running_mean.copy_(new_mu)
        running_var.copy_(new_var)
    return mean_b, var_b, invstd_b, r_raw, d_raw, _clip_r(r_raw, rmax), _clip_d(d_raw, dmax)


def _renorm_train_step(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    momentum: float,
    rmax: Limit,
    dmax: Limit,
    sink: list | None,
    process_group,
    average_stats: bool,
) -> Tensor:
    """Training step of Algorithm 1 on top of the native batch-norm kernels.

    The statistics, r, d and the moving-average update are per-channel work done without gradient
    (r and d are constants for backprop by definition); :class:`_BatchRenormFn` then applies the
    normalization and owns the backward. `sink`, if a list, receives the per-channel
    (r unclipped, d unclipped, r, d) for telemetry.
    """
    if not torch.compiler.is_compiling():
        stats = _statistics_and_update(
            x, running_mean, running_var, eps, momentum, rmax, dmax, process_group, average_stats
        )
    elif process_group is None and isinstance(rmax, Tensor) and isinstance(dmax, Tensor):
        stats = _compiled_statistics_and_update(
            x.detach(), running_mean, running_var, eps, momentum, rmax, dmax
        )
    else:  # collectives cannot be compiled here: this part runs eagerly (a graph break, but exact)
        stats = torch.compiler.disable(_statistics_and_update)(
            x.detach(), running_mean, running_var, eps, momentum, rmax, dmax, process_group, average_stats
        )
    mean_b, var_b, invstd_b, r_raw, d_raw, r, d = stats
    if sink is not None:
        sink[:] = [r_raw, d_raw, r, d]
    global_stats = process_group is not None and not average_stats
    return _BatchRenormFn.apply(
        x,
        weight,
        bias,
        mean_b,
        var_b,
        invstd_b,
        r,
        d,
        eps,
        process_group if global_stats else None,
        x.numel() // x.shape[1],
    )


# Device types whose training steps run the per-channel part as one Triton kernel (when triton imports).
# Opt-in (BRN_FUSED_KERNEL=1) until the kernel has run on a real GPU: so far only Triton's CPU interpreter
# has checked it against the eager path.
_FUSED_DEVICE_TYPES = frozenset({"cuda"}) if os.environ.get("BRN_FUSED_KERNEL") == "1" else frozenset()


@functools.cache
def _fused_channel_step():
    """brn_cli.nn.triton_renorm.renorm_channel_step, or None where triton cannot be imported."""
    try:
        from brn_cli.nn.triton_renorm import renorm_channel_step
    except ImportError:
        return None
    return renorm_channel_step


@functools.cache
def _fused_affine_grads():
    """brn_cli.nn.triton_renorm.renorm_affine_grads (the fused backward; imports wherever the forward did)."""
    from brn_cli.nn.triton_renorm import renorm_affine_grads

    return renorm_affine_grads


def _fused_train_step(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    momentum: float,
    limits: Tensor,
    telemetry_rows: Tensor,
) -> Tensor:
    """:func:`_renorm_train_step` with the per-channel part (r, d, affine terms, moving averages and the
    telemetry rows, written into `telemetry_rows`) in one kernel launch, and the backward's dgamma in
    another (passing w_eff and b_eff marks the step fused); no process group."""
    with torch.no_grad():
        mean_b, var_b = _batch_stats(x)
        invstd_b, w_eff, b_eff, r, d = _fused_channel_step()(
            mean_b, var_b, running_mean, running_var, weight, bias, limits, telemetry_rows, eps, momentum
        )
    count = x.numel() // x.shape[1]
    return _BatchRenormFn.apply(
        x, weight, bias, mean_b, var_b, invstd_b, r, d, eps, None, count, w_eff, b_eff
    )


class _BatchRenormFn(torch.autograd.Function):
    """y = gamma * ((x - mu_B) / sigma_B * r + d) + beta with the batch statistics and r, d given.

    That is BatchNorm with weight' = gamma * r and bias' = gamma * d + beta, so the forward is the
    inference-mode elementwise kernel fed (mu_B, var_B) and the backward is BatchNorm's own backward kernel,
    which accounts for mu_B and sigma_B depending on x; r and d get no gradient.
    `process_group` (global statistics only) makes the backward sums global too.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean_b: Tensor,
        var_b: Tensor,
        invstd_b: Tensor,
        r: Tensor,
        d: Tensor,
        eps: float,
        process_group,
        count: int,
        w_eff: Tensor | None = None,
        b_eff: Tensor | None = None,
    ) -> Tensor:
        # Given w_eff and b_eff, the fused kernel computed them, and the backward uses its twin.
        ctx.fused = w_eff is not None and b_eff is not None
        if not ctx.fused:
            w_eff, b_eff = _affine_terms(weight, bias, r, d)
        # The elementwise kernel of inference-mode batch norm, fed the batch statistics:
        # (x - mean_b) / sqrt(var_b + eps) * w_eff + b_eff. On a CPU, native_batch_norm directly (what
        # torch.batch_norm calls there, less one allocation); elsewhere torch.batch_norm picks cuDNN.
        if x.device.type == "cpu":
            y = torch.native_batch_norm(x, w_eff, b_eff, mean_b, var_b, False, 0.0, eps)[0]
        else:
            y = torch.batch_norm(
                x, w_eff, b_eff, mean_b, var_b, False, 0.0, eps, torch.backends.cudnn.enabled
            )
        ctx.save_for_backward(x, w_eff, mean_b, invstd_b, r, d)
        ctx.eps = eps
        ctx.has_weight = weight is not None
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.process_group = process_group
        ctx.count = count
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, w_eff, mean_b, invstd_b, r, d = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        if ctx.process_group is None:
            grad_x, grad_w_eff, grad_b_eff = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, w_eff, None, None, mean_b, invstd_b, True, ctx.eps, [need_x, True, True]
            )
        else:
            grad_x, grad_w_eff, grad_b_eff = _synced_backward(
                grad_out, x, w_eff, mean_b, invstd_b, ctx.count, ctx.process_group, need_x
            )
        grad_weight = grad_bias = None
        # y = gamma * (r * xhat + d) + beta  =>  dgamma = r * sum(g*xhat) + d * sum(g),  dbeta = sum(g)
        # One launch, casts to the weight dtype included; the kernel has no derivative, so a backward
        # that builds a graph (create_graph=True: double backward) takes the differentiable ops.
        if ctx.fused and ctx.has_weight and need_w and not torch.is_grad_enabled():
            grad_weight, grad_bias = _fused_affine_grads()(grad_w_eff, grad_b_eff, r, d, ctx.weight_dtype)
            grad_bias = grad_bias if ctx.has_bias and need_b else None
        else:
            if ctx.has_weight and need_w:
                gw, gb = _as(grad_w_eff, r.dtype), _as(grad_b_eff, r.dtype)
                grad_weight = _as(torch.addcmul(d * gb, r, gw), ctx.weight_dtype)
            if ctx.has_bias and need_b:
                grad_bias = _as(grad_b_eff, ctx.weight_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None, None


def _affine_terms(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """BatchNorm's weight' = gamma * r and bias' = gamma * d + beta, in the statistics dtype."""
    if weight is None:
        return r, (d if bias is None else d + _as(bias, d.dtype))
    gamma = _as(weight, r.dtype)
    if bias is None:
        return gamma * r, gamma * d
    beta = _as(bias, r.dtype)
    if torch.compiler.is_compiling():  # inductor fuses these itself
        return gamma * r, torch.addcmul(beta, gamma, d)
    zeros = _neg_eps_and_zeros(r, 0.0)[1]
    w_eff, b_eff = torch._foreach_addcmul([zeros, beta], [gamma, gamma], [r, d])
    return w_eff, b_eff


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _synced_backward(grad_out, x, w_eff, mean_b, invstd_b, count, process_group, need_x):
    """Batch-norm backward with global statistics: all_reduce of the two per-channel sums (as SyncBN)."""
    import torch.distributed as dist

    dims = _reduce_dims(x)
    g32 = grad_out.to(mean_b.dtype)
    xmu = x.to(mean_b.dtype) - _channel_view(mean_b, x)
    sum_dy = g32.sum(dims)
    sum_dy_xmu = (g32 * xmu).sum(dims)
    grad_w_eff = sum_dy_xmu * invstd_b  # local: DDP averages parameter gradients itself
    grad_b_eff = sum_dy.clone()
    grad_x = None
    if need_x:
        packed = torch.cat(
            [sum_dy, sum_dy_xmu, torch.tensor([float(count)], device=x.device, dtype=sum_dy.dtype)]
        )
        dist.all_reduce(packed, group=process_group)
        c = sum_dy.numel()
        n = packed[-1]
        mean_dy = packed[:c] / n
        mean_dy_xmu = packed[c : 2 * c] / n
        grad_x = (
            g32 - _channel_view(mean_dy, x) - xmu * _channel_view(invstd_b**2 * mean_dy_xmu, x)
        ) * _channel_view(invstd_b * w_eff, x)
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_w_eff, grad_b_eff


def _microbatch_renorm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    momentum: float,
    rmax: Limit,
    dmax: Limit,
    microbatch: int,
    sink: list | None,
    process_group=None,
) -> Tensor:
    """Algorithm 1 applied to each group of `microbatch` consecutive examples (the paper's section 4.2).

    Each group is normalized with its own statistics and its own r, d; the moving averages take one step
    towards the mean of the groups' mu_B and sigma_B (over every rank's groups when `process_group` is
    given, so the moving averages stay identical on all ranks). Written with generic ops (autograd through mu_B and
    sigma_B, r and d detached) since this is a study setting rather than the hot path.
    """
    n, c = x.shape[0], x.shape[1]
    if n % microbatch:
        raise ValueError(f"batch of {n} does not split into microbatches of {microbatch}")
    groups = n // microbatch
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    xg = x.to(stat_dtype).reshape(groups, microbatch, c, -1)
    var_b, mean_b = torch.var_mean(xg, dim=(1, 3), unbiased=False, keepdim=True)  # [G,1,C,1]
    sigma_b = torch.sqrt(var_b + eps)
    mu = running_mean.to(stat_dtype).view(1, 1, c, 1)
    sigma = torch.sqrt(running_var.to(stat_dtype) + eps).view(1, 1, c, 1)
    with torch.no_grad():
        r_raw = sigma_b / sigma
        d_raw = (mean_b - mu) / sigma
        r = _clip_r(r_raw, rmax)
        d = _clip_d(d_raw, dmax)
    y = (xg - mean_b) / sigma_b * r + d
    if weight is not None:
        y = y * weight.to(stat_dtype).view(1, 1, c, 1)
    if bias is not None:
        y = y + bias.to(stat_dtype).view(1, 1, c, 1)
    with torch.no_grad():
        if sink is not None:
            # Per channel, the group furthest from the moving averages (the limits are symmetric in
            # log r and in d, so a channel clipped in any group is clipped in this one).
            r_ext = r_raw.flatten(1).gather(0, r_raw.log().abs().flatten(1).argmax(0, keepdim=True))[0]
            d_ext = d_raw.flatten(1).gather(0, d_raw.abs().flatten(1).argmax(0, keepdim=True))[0]
            r_ext_c = _clip_r(r_ext, rmax)
            d_ext_c = _clip_d(d_ext, dmax)
            sink[:] = [r_ext, d_ext, r_ext_c, d_ext_c]
        upd_mean, upd_sigma = mean_b.mean(0).flatten(), sigma_b.mean(0).flatten()
        if process_group is not None:
            import torch.distributed as dist

            packed = torch.cat([upd_mean, upd_sigma]).double() / dist.get_world_size(process_group)
            dist.all_reduce(packed, group=process_group)
            upd_mean, upd_sigma = packed[:c].to(stat_dtype), packed[c:].to(stat_dtype)
        new_mu = running_mean.to(stat_dtype) + momentum * (upd_mean - running_mean.to(stat_dtype))
        sig = sigma.flatten()
        new_sigma = (1.0 - momentum) * sig + momentum * upd_sigma  # as in _statistics_and_update
        running_mean.copy_(new_mu)
        running_var.copy_((new_sigma * new_sigma - eps).clamp(0.0, torch.finfo(running_var.dtype).max))
    return y.reshape(x.shape).to(x.dtype)


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = False,
    momentum: float = 0.01,
    eps: float = 1e-5,
    rmax: float = 1.0,
    dmax: float = 0.0,
    microbatch: int | None = None,
    telemetry: Tensor | None = None,
    process_group: ProcessGroup | None = None,
    average_stats: bool = False,
) -> Tensor:
    """Functional Batch Renormalization (see the module docstring for the math).

    In training mode `running_mean` and `running_var` are updated in place (var = sigma^2 - eps layout).
    `telemetry`, if given, is a float tensor of 4 or 5 slots filled with (r clip fraction, d clip fraction,
    mean |log r|, mean |d|[, 1.0 in the BatchNorm phase rmax = 1, dmax = 0]). `process_group` makes the batch statistics global over the group
    (`average_stats=False`) or keeps them per rank and averages only the moving-average update
    (`average_stats=True`). `eps` must be finite and > 0.
    """
    _check_eps(eps)
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    sink: list | None = [] if telemetry is not None else None
    y = _batch_renorm_train(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        momentum,
        eps,
        rmax,
        dmax,
        microbatch,
        sink,
        process_group,
        average_stats,
    )
    if telemetry is not None:
        if sink:
            telemetry.copy_(_telemetry_values(torch.stack(sink))[: telemetry.numel()])
        else:  # an empty batch has no r or d
            telemetry.fill_(math.nan)
    return y


def _check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")


def _check_limits(rmax: float, dmax: float) -> None:
    if not rmax >= 1.0:
        raise ValueError(f"rmax must be >= 1, got {rmax}")
    if not dmax >= 0.0:
        raise ValueError(f"dmax must be >= 0, got {dmax}")


def _batch_renorm_train(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    rmax: Limit,
    dmax: Limit,
    microbatch: int | None,
    sink: list | None,
    process_group,
    average_stats: bool,
) -> Tensor:
    """The training step; `sink`, if a list, receives per-channel (r unclipped, d unclipped, r, d)."""
    if not isinstance(rmax, Tensor):  # tensor limits come from a module, which checked them when set
        _check_limits(rmax, dmax)
    if x.numel() == 0 and process_group is None:
        # As nn.BatchNorm: an empty output whose backward gives gamma and beta zero gradients, and moving
        # averages left alone. (With a process group the collectives must still run on every rank.)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if x.shape[0] * (x.numel() // max(x.shape[0] * x.shape[1], 1)) <= 1 and process_group is None:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(x.shape)}"
        )
    if microbatch is not None and microbatch < x.shape[0]:
        # Reads and then updates the running buffers with plain ops: under torch.compile it runs eagerly, for
        # the reason given at _running_snapshot.
        microbatch_fn = (
            torch.compiler.disable(_microbatch_renorm)
            if torch.compiler.is_compiling()
            else _microbatch_renorm
        )
        return microbatch_fn(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            eps,
            momentum,
            rmax,
            dmax,
            microbatch,
            sink,
            process_group,
        )
    return _renorm_train_step(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        eps,
        momentum,
        rmax,
        dmax,
        sink,
        process_group,
        average_stats,
    )


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class BatchRenormNd(nn.Module):
    """Batch Renormalization over channel axis 1, with nn.BatchNorm's state layout.

    Args:
        num_features: C, the channel count.
        eps: added to the variance inside the sqrt (as nn.BatchNorm).
        momentum: rate of the moving averages of mu and sigma (the paper's alpha; PyTorch convention,
            new = old + momentum * (batch - old)). The paper uses 0.01.
        rmax, dmax: clipping limits for r in [1/rmax, rmax] and d in [-dmax, dmax]. Plain attributes, read
            at every training step, so a schedule can change them between steps. ``float('inf')`` means no
            clipping; rmax=1, dmax=0 is exactly BatchNorm.

    **A fresh layer is plain BatchNorm (rmax 1, dmax 0) until something opens its limits**, on purpose:
    its moving averages start at mean 0, variance 1, and opening the limits while they are far from the
    batch statistics makes r and d large corrections that blow the loss up (the paper's warning). Open
    them with a :class:`~brn_cli.train.schedule.RenormScheduler` (``RenormScheduler.warmup(model,
    optimizer, warmup_steps=W)`` is CrossQ's BatchNorm-then-rmax 3 / dmax 5), ``set_renorm_limits``, or the
    `rmax` / `dmax` arguments. The first training forward of a layer whose limits nothing set warns once
    (per process); pass ``rmax=1.0, dmax=0.0`` to train as BatchNorm on purpose.
        affine: learnable gamma (weight) and beta (bias).

    Attributes beyond nn.BatchNorm's: ``microbatch`` (normalize groups of that many examples separately in
    training), ``process_group`` / ``average_stats`` (distributed statistics), and ``telemetry`` (the last
    training step's 4 numbers as a tensor; :meth:`last_telemetry` gives them as a dataclass). A step only
    stores its per-channel r and d (one op); the summary is computed when read.
    """

    _version = 2
    _expected_dim: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        rmax: float | None = None,
        dmax: float | None = None,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self._eps = math.nan
        self.eps = eps
        self.momentum = momentum
        # rmax and dmax read as floats, and are mirrored in this 2-element tensor that the forward reads
        # under torch.compile, so a schedule changing them every step never invalidates a compiled graph.
        self.register_buffer(
            "_limits", torch.tensor([1.0, 0.0], device=device, dtype=torch.float32), persistent=False
        )
        self._rmax = self._dmax = math.nan
        self.rmax = 1.0 if rmax is None else rmax
        self.dmax = 0.0 if dmax is None else dmax
        # Limits nobody chose warn at the first training forward (the setters mark them chosen).
        self._limits_chosen = rmax is not None or dmax is not None
        self.affine = affine
        self.track_running_stats = True  # renorm needs them; kept for code that checks nn.BatchNorm's API
        self.microbatch: int | None = None
        self.process_group = None
        self.average_stats = False
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked",
            torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
        )
        # Telemetry is scratch, not state: kept out of the state_dict. A step stores its per-channel
        # (r unclipped, d unclipped, r, d) here in one op; the 4 summary numbers are computed when read.
        # Being a buffer, it follows .to(), DDP's buffer broadcast, and code that saves/restores buffers.
        self.register_buffer(
            "_telemetry_rd", torch.full((4, num_features), float("nan"), **factory), persistent=False
        )
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def __deepcopy__(self, memo: dict) -> BatchRenormNd:
        # A process group is a communicator handle, not state, and cannot be copied: copies share it.
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def __setstate__(self, state: dict) -> None:
        if "eps" in state:  # pickled before eps became a checked property
            state["_eps"] = state.pop("eps")
        state.setdefault("_limits_chosen", True)  # pickled before the fresh-layer warning
        super().__setstate__(state)

    @property
    def eps(self) -> float:
        """Added to the variance inside the sqrt; finite and > 0 (sigma_B divides)."""
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        value = float(value)
        _check_eps(value)
        self._eps = value

    @property
    def rmax(self) -> float:
        """r is clipped to [1/rmax, rmax]; 1 is batchnorm, inf no clipping. Read at every training step."""
        return self._rmax

    @rmax.setter
    def rmax(self, value: float) -> None:
        value = float(value)
        _check_limits(value, 0.0)
        self._limits_chosen = True
        if value != self._rmax:
            self._rmax = value
            with torch.no_grad():
                self._limits[0] = value

    @property
    def dmax(self) -> float:
        """d is clipped to [-dmax, dmax]; 0 is batchnorm, inf no clipping. Read at every training step."""
        return self._dmax

    @dmax.setter
    def dmax(self, value: float) -> None:
        value = float(value)
        _check_limits(1.0, value)
        self._limits_chosen = True
        if value != self._dmax:
            self._dmax = value
            with torch.no_grad():
                self._limits[1] = value

    @property
    def running_sigma(self) -> Tensor:
        """sigma = sqrt(running_var + eps), the moving standard deviation of Algorithm 1."""
        return torch.sqrt(self.running_var + self.eps)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2 or (self._expected_dim and x.dim() not in self._expected_dim):
            wanted = " or ".join(map(str, self._expected_dim)) or ">= 2"
            raise ValueError(f"{type(self).__name__} expects {wanted}D input, got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        self.num_batches_tracked.add_(1)
        compiling = torch.compiler.is_compiling()
        if not self._limits_chosen and not compiling:
            _warn_limits_never_set(self)
        if self._fused_step_applies(x):
            return _fused_train_step(
                x,
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                self.eps,
                self.momentum,
                self._limits,
                self._telemetry_rd,
            )
        # Read now: a schedule may change them between steps. Compiled code reads the tensor mirror instead
        # of the floats, which dynamo would bake into the graph as constants (one recompile per value).
        if compiling:
            rmax, dmax = self._limits[0], self._limits[1]
        else:
            rmax, dmax = self._rmax, self._dmax
        sink: list = []
        y = _batch_renorm_train(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            rmax,
            dmax,
            self.microbatch,
            sink,
            self.process_group,
            self.average_stats,
        )
        buf = self._telemetry_rd
        if not sink:  # an empty batch has no r or d
            buf.fill_(math.nan)
        elif buf.dtype == sink[0].dtype:
            torch.stack(sink, out=buf)
        else:  # e.g. a half-precision module: fp32 statistics
            buf.copy_(torch.stack(sink))
        return y

    def _fused_step_applies(self, x: Tensor) -> bool:
        """Whether this training step runs the per-channel part as one Triton kernel: on a device type in
        _FUSED_DEVICE_TYPES where triton imports, float32 statistics (float64 layers keep the eager path's
        float64 limits), eagerly (torch.compile keeps the custom op), and none of the paths the kernel does
        not cover: microbatches, a process group, a batch too small to normalize."""
        return (
            x.device.type in _FUSED_DEVICE_TYPES
            and _stat_dtype(x.dtype) == torch.float32
            and self.running_var.dtype != torch.float64
            and (self.microbatch is None or self.microbatch >= x.shape[0])
            and self.process_group is None
            and x.numel() > x.shape[1]  # more than one value per channel
            and not torch.compiler.is_compiling()
            and _fused_channel_step() is not None
        )

    @property
    def telemetry(self) -> Tensor:
        """The last training step's (r clip fraction, d clip fraction, mean |log r|, mean |d|); NaN before
        the first step. A tensor on the layer's device: reading it does not synchronise."""
        with torch.no_grad():
            return _telemetry_values(self._telemetry_rd)

    def last_telemetry(self) -> RenormTelemetry | None:
        """Telemetry of the last training forward, or None before the first one."""
        values = self.telemetry.tolist()
        if any(math.isnan(v) for v in values):
            return None
        return RenormTelemetry(*values[:4], batchnorm_phase=values[4] == 1.0)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, rmax={self.rmax}, "
            f"dmax={self.dmax}, affine={self.affine}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Old BatchNorm checkpoints (version < 2) have no num_batches_tracked, as nn.BatchNorm allows.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        # Checked before anything is copied: a renorm layer trains and infers from these.
        problem = describe_bad_running_stats(
            state_dict.get(prefix + "running_mean"), state_dict.get(prefix + "running_var")
        )
        if problem is not None:
            raise BrnError(
                f"{prefix[:-1] or type(self).__name__}: {problem}; refusing to load it into a renorm layer "
                "(recalibrate the BatchNorm source with brn calibrate and convert again)"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


_limits_warning_given = False


def _warn_limits_never_set(layer: BatchRenormNd) -> None:
    """Say once per process that a layer trains as BatchNorm because nothing set its limits."""
    global _limits_warning_given
    layer._limits_chosen = True  # checked once per layer
    if _limits_warning_given:
        return
    _limits_warning_given = True
    warnings.warn(
        f"{type(layer).__name__} trains as plain BatchNorm (rmax 1, dmax 0): nothing set its limits. Open "
        "them with brn_cli.RenormScheduler (e.g. RenormScheduler.warmup(model, optimizer, warmup_steps=W)) or "
        "brn_cli.set_renorm_limits; pass rmax=1.0, dmax=0.0 to the layer to train as BatchNorm on purpose",
        UserWarning,
        stacklevel=3,
    )


class BatchRenormAct(BatchRenormNd):
    """Batch Renormalization followed by dropout and an activation, as timm's BatchNormAct2d.

    The converted form of norms that carry their activation: ``act(drop(renorm(x)))``. `drop` and `act`
    are the original module's children, so the state_dict keys do not move.
    """

    def __init__(
        self, num_features: int, *args, drop: nn.Module | None = None, act: nn.Module | None = None, **kwargs
    ) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class BatchRenorm1d(BatchRenormNd):
    """Batch Renormalization over (N, C) or (N, C, L) input. See :class:`BatchRenormNd`."""

    _expected_dim = (2, 3)


class BatchRenorm2d(BatchRenormNd):
    """Batch Renormalization over (N, C, H, W) input. See :class:`BatchRenormNd`."""

    _expected_dim = (4,)


class BatchRenorm3d(BatchRenormNd):
    """Batch Renormalization over (N, C, D, H, W) input. See :class:`BatchRenormNd`."""

    _expected_dim = (5,)


def describe_bad_running_stats(running_mean: Tensor | None, running_var: Tensor | None) -> str | None:
    """What makes these running statistics unusable (NaN or inf anywhere, a negative variance), as
    ``"running_var holds inf in 3 channels"``, or None if nothing does. One host sync per tensor."""
    parts = []
    for label, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(t, Tensor) or t.is_meta or not t.is_floating_point():
            continue
        t = t.detach()
        finite = torch.isfinite(t)
        negative = (t < 0) & finite if label == "running_var" else torch.zeros_like(finite)
        nan, inf, neg = torch.stack([torch.isnan(t).sum(), torch.isinf(t).sum(), negative.sum()]).tolist()
        held = [f"{kind} in {_channels(n)}" for kind, n in (("NaN", nan), ("inf", inf)) if n]
        clauses = (["holds " + " and ".join(held)] if held else []) + (
            [f"is negative in {_channels(neg)}"] if neg else []
        )
        if clauses:
            parts.append(f"{label} {' and '.join(clauses)}")
    return ", ".join(parts) or None


def _channels(n: int) -> str:
    return f"{n} channel" if n == 1 else f"{n} channels"
