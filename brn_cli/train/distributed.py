"""Several GPUs or machines: torchrun / DistributedDataParallel with consistent renorm statistics.

Batch renorm reads its moving averages (mu, sigma) inside the *training* forward, to compute
r = sigma_B / sigma and d = (mu_B - mu) / sigma. If the ranks of a data-parallel job held different moving
averages they would apply different corrections to the same kind of batch, and DDP's usual remedy
(``broadcast_buffers=True``: rank 0's buffers overwrite everyone else's before every forward) would throw
away every other rank's statistics. So brn keeps the averages identical on every rank *by construction* and
runs DDP with ``broadcast_buffers=False``:

``global`` (``stats_sync="global"``)
    mu_B and sigma_B are computed over the union of all ranks' minibatches with one all_reduce of the
    per-channel sums ``[n*mean, n*(var + mean^2), n]`` per layer in forward and one of
    ``[sum dy, sum dy*(x - mu_B), n]`` in backward (what SyncBatchNorm does). r, d, the outputs, the
    gradients and the moving averages are those of one process with the global batch.

``local`` (``stats_sync="local"``)
    Each rank normalizes its own minibatch (the paper's section 4 setup: 50 workers x 32 examples), and
    the moving-average step uses the mean over ranks of mu_B and sigma_B (one all_reduce per layer):
    ``mu <- mu + alpha * (mean_k mu_B^k - mu)``, same for sigma. Every rank computes the same update from
    the same reduced values, so the buffers stay identical.

This module holds the process-group plumbing (:func:`init_distributed`), the model setup
(:func:`configure_stats_sync`, :func:`wrap_model`), the consistency check run before every checkpoint
(:func:`check_buffers_equal`) and small collectives for metrics; the launcher that starts
``python -m torch.distributed.run`` on this machine is :mod:`brn_cli.train.launch`.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from brn_cli.errors import BrnError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn
    from torch.distributed import ProcessGroup

STATS_SYNC_MODES = ("global", "local")
DEFAULT_DIST_TIMEOUT_S = 300.0

# Messages the process-group backends use when a peer is gone or a collective/rendezvous timed out.
_PEER_FAILURE_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
    "remote worker",
    "nccl",
    "gloo",
    "socket",
)


def parse_stats_sync(text: str) -> str:
    """Validate a ``stats_sync`` value ("global" or "local")."""
    mode = text.strip().lower()
    if mode not in STATS_SYNC_MODES:
        raise BrnError(f"`stats_sync` must be 'global' or 'local', got {text!r}")
    return mode


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher setting the env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class DistContext:
    """Where this process sits in the job: rank, world size, device and backend.

    A single-process run is a context with ``world_size == 1`` and no process group, so the training code
    has one path for both cases.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S
    # Weak references to the layers configure_stats_sync gave the group: shutdown takes it back from them.
    grouped: list[weakref.ref] = field(default_factory=list, repr=False, compare=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates into the metrics files and writes checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            with peer_failures(self):
                dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Sum a short list of numbers over ranks (float64, one all_reduce). Identity on one process."""
        if not self.distributed:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        with peer_failures(self):
            dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        with peer_failures(self):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (e.g. a decision that only rank 0 can take)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        with peer_failures(self):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def _comm_device(self) -> str:
        return self.device if self.backend == "nccl" else "cpu"


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> DistContext:
    """Join the torchrun job described by the environment, or return a single-process context.

    Backend: NCCL when the device is a GPU, gloo on CPU. `timeout_s` bounds the rendezvous and every
    collective, so a rank that dies or never arrives ends the run with an error instead of a hang.
    """
    if timeout_s <= 0:
        raise BrnError(f"`dist_timeout` must be positive, got {timeout_s}")
    from brn_cli.nn.device import resolve_device

    if not launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext(device=str(resolve_device(device, local_rank=0)), timeout_s=timeout_s)

    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.strip().lower().startswith("cuda:"):
        raise BrnError(
            f"`device` {device} under torchrun would put every rank on one GPU; use `device=cuda` (or auto): "
            "each process takes the GPU of its LOCAL_RANK (restrict with CUDA_VISIBLE_DEVICES)"
        )
    dev = str(resolve_device(device, local_rank=local_rank))
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))
    # DistributedDataParallel imports torch._dynamo; imported while a group exists, it keeps references to
    # that group, so destroy_process_group (shutdown) no longer ends the gloo worker threads. They would then
    # live into interpreter exit, where one still holding a finished collective's tensors needs the GIL and
    # aborts the process ("terminate called without an active exception"). Imported first, nothing pins it.
    import torch._dynamo  # noqa: F401

    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend=backend, timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world
            )
        except Exception as exc:  # DistStoreError, DistNetworkError, RuntimeError from the backend
            raise BrnError(
                f"rank {rank}: could not join the {world}-process group within {timeout_s:g}s "
                f"({_backend_reason(exc)}); check that every rank started and MASTER_ADDR/PORT are reachable"
            ) from exc
    return DistContext(
        rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend, timeout_s=timeout_s
    )


def release_stats_sync(ctx: DistContext) -> None:
    """Take the process group back from the layers :func:`configure_stats_sync` gave it to (they train with
    per-process statistics again).

    A model lives on in reference cycles until the garbage collector runs, possibly not before the
    interpreter exits, and a group it holds with it: its gloo worker threads run on, and one still releasing a
    finished collective's tensors then needs the GIL and aborts the process ("terminate called without an
    active exception"). So the group is let go as soon as training ends.
    """
    for ref in ctx.grouped:
        layer = ref()
        if layer is not None:
            layer.process_group = None
    ctx.grouped.clear()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (safe to call when there is none), after :func:`release_stats_sync`."""
    release_stats_sync(ctx)
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _backend_reason(exc: BaseException) -> str:
    """The backend's message without its source location, first sentence only.

    Not errors.first_line: gloo and NCCL prefix their messages with ``[file.cpp:123]`` and follow the reason
    with sentences of internals, which would crowd the one error line.
    """
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else "") or type(exc).__name__
    return text.split(". ")[0].rstrip(".")[:200]


class RankFailure(BrnError):
    """A peer rank died or a collective timed out; `detail` is the backend's reason."""

    def __init__(self, rank: int, timeout_s: float, detail: str, last_checkpoint: str | None = None) -> None:
        where = f"; the last complete checkpoint is {last_checkpoint}" if last_checkpoint else ""
        super().__init__(
            f"rank {rank}: lost contact with another rank or a collective timed out after "
            f"{timeout_s:g}s ({detail}){where}"
        )
        self.rank, self.timeout_s, self.detail = rank, timeout_s, detail
        self.last_checkpoint = last_checkpoint


def is_peer_failure(exc: BaseException) -> bool:
    """Does `exc` look like a lost rank or a timed-out collective (rather than a bug)?"""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(marker in text for marker in _PEER_FAILURE_MARKERS)
    return False


@contextlib.contextmanager
def peer_failures(
    ctx: DistContext, last_checkpoint: str | Callable[[], str | None] | None = None
) -> Iterator[None]:
    """Turn a lost peer / collective timeout into one clear BrnError naming the last good checkpoint.

    `last_checkpoint` may be a callable, asked only when a failure happens (the newest file by then).
    """
    try:
        yield
    except RankFailure as exc:
        if callable(last_checkpoint):
            last_checkpoint = last_checkpoint()
        if last_checkpoint is None or exc.last_checkpoint is not None:
            raise
        raise RankFailure(exc.rank, exc.timeout_s, exc.detail, last_checkpoint) from exc.__cause__
    except BrnError:
        raise
    except Exception as exc:
        if not ctx.distributed or not is_peer_failure(exc):
            raise
        if callable(last_checkpoint):
            last_checkpoint = last_checkpoint()
        raise RankFailure(ctx.rank, ctx.timeout_s, _backend_reason(exc), last_checkpoint) from exc


# ----------------------------------------------------------------------------------------------
# Model setup
# ----------------------------------------------------------------------------------------------


@dataclass
class StatsSyncReport:
    """What :func:`configure_stats_sync` did to the model."""

    mode: str
    renorm_layers: int
    sync_batchnorm: list[str]  # plain BatchNorm layers converted to SyncBatchNorm (global mode, GPU)
    local_batchnorm: list[str]  # plain BatchNorm layers that normalize per rank (buffers averaged at saves)

    def note(self) -> str | None:
        """One line for the log when plain BatchNorm layers behave differently from the renorm ones."""
        if not self.local_batchnorm:
            return None
        names = ", ".join(self.local_batchnorm[:3]) + (" ..." if len(self.local_batchnorm) > 3 else "")
        return (
            f"{len(self.local_batchnorm)} plain BatchNorm layer(s) ({names}) normalize each rank's "
            "minibatch on its own; their running statistics are averaged over ranks before each "
            "evaluation and checkpoint"
        )


def configure_stats_sync(
    model: nn.Module, mode: str, ctx: DistContext, process_group: ProcessGroup | None = None
) -> StatsSyncReport:
    """Set every BatchRenormNd of `model` to the `mode` statistics over `process_group` (default: WORLD).

    Call on the bare model before :func:`wrap_model`. With one process it only records the mode. Plain
    BatchNorm layers left unconverted (e.g. excluded by ``exclude``) become SyncBatchNorm in global mode on GPU
    (SyncBatchNorm has no CPU path); otherwise they normalize per rank and :func:`average_batchnorm_buffers`
    keeps their running statistics equal. We never call ``SyncBatchNorm.convert_sync_batchnorm`` on the whole
    model: it is the renorm layers' job to be synchronized (GUIDE section 5).
    """
    from torch import nn

    from brn_cli.nn.norms import is_torch_batch_norm, renorm_layers

    mode = parse_stats_sync(mode)
    group = None
    if ctx.distributed:
        import torch.distributed as dist

        group = process_group if process_group is not None else dist.group.WORLD
    renorm = renorm_layers(model)
    for _, module in renorm:
        module.process_group = group
        module.average_stats = mode == "local"
        if group is not None:
            ctx.grouped.append(weakref.ref(module))

    synced: list[str] = []
    local: list[str] = []
    plain_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    on_gpu = ctx.device.startswith("cuda")
    if ctx.distributed:
        for name, module in list(model.named_modules()):
            if not is_torch_batch_norm(module) or isinstance(module, nn.SyncBatchNorm):
                continue
            if mode == "global" and on_gpu and type(module) in plain_types:
                ctx.grouped.append(weakref.ref(_replace_with_sync_bn(model, name, module, group)))
                synced.append(name)
            else:
                local.append(name)
    return StatsSyncReport(mode=mode, renorm_layers=len(renorm), sync_batchnorm=synced, local_batchnorm=local)


def _replace_with_sync_bn(model: nn.Module, name: str, bn: nn.Module, group) -> nn.Module:
    from torch import nn

    from brn_cli.nn.norms import set_submodule

    sync = nn.SyncBatchNorm(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group=group
    )
    # The same Parameter and buffer objects: an optimizer built before the swap still updates them.
    for name in ("weight", "bias"):
        setattr(sync, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(sync, name, getattr(bn, name))
    sync.train(bn.training)
    set_submodule(model, name, sync)
    return sync


@contextlib.contextmanager
def stats_sync_suspended(model: nn.Module) -> Iterator[None]:
    """Make renorm layers use per-process statistics for a while (e.g. an evaluation on a rank's shard).

    Ranks evaluate different numbers of batches, so a collective inside an evaluation forward (batch-stats
    evaluation runs the training path) would wait for a peer that never calls it.
    """
    from brn_cli.nn.norms import renorm_layers

    saved = []
    for _, module in renorm_layers(model):
        saved.append((module, module.process_group))
        module.process_group = None
    try:
        yield
    finally:
        for module, group in saved:
            module.process_group = group


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel with ``broadcast_buffers=False`` (a no-op on one process).

    Buffers must not be broadcast: rank 0's moving averages would overwrite the others' before every
    forward. They are equal by construction (see the module docstring) and checked at every checkpoint.
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [int(ctx.device.split(":")[1])] if ctx.device.startswith("cuda") else None
    # torch >= 2.14 renames the option (and warns on the old name); both still sync buffers once at init.
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        else {"broadcast_buffers": False}
    )
    with peer_failures(ctx):
        return DDP(model, device_ids=device_ids, **no_sync)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (and torch.compile), whose state_dict has no ``module.`` prefix."""
    inner = model
    while True:
        if hasattr(inner, "module") and type(inner).__name__ == "DistributedDataParallel":
            inner = inner.module
        elif hasattr(inner, "_orig_mod"):
            inner = inner._orig_mod
        else:
            return inner


def average_batchnorm_buffers(model: nn.Module, ctx: DistContext) -> int:
    """Average the running statistics of plain BatchNorm layers over ranks (one all_reduce).

    Renorm layers are left alone (theirs are equal by construction and are *checked*, not repaired). Returns
    the number of layers averaged. Like timm's ``distribute_bn(reduce=True)``.
    """
    if not ctx.distributed:
        return 0
    import torch
    import torch.distributed as dist

    from brn_cli.nn.norms import has_running_stats, is_torch_batch_norm

    tensors = []
    layers = 0
    for module in unwrap(model).modules():
        if is_torch_batch_norm(module) and has_running_stats(module):
            tensors += [module.running_mean, module.running_var]
            layers += 1
    if not tensors:
        return 0
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]).to(ctx._comm_device())
    with peer_failures(ctx):
        dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
        offset += n
    return layers


def buffer_differences(model: nn.Module, ctx: DistContext, *, parameters: bool = False) -> dict[str, float]:
    """Max over ranks of |value on this rank - value on rank 0| for every buffer (and parameter).

    Two collectives in all (a broadcast of rank 0's values, a MAX all_reduce of the per-tensor differences).
    A NaN on one rank but not on rank 0 counts as an infinite difference. Every rank gets the same dict.
    """
    import torch

    inner = unwrap(model)
    # The state_dict's entries: persistent buffers (scratch such as telemetry is not state) and parameters.
    param_names = {n for n, _ in inner.named_parameters()}
    named = [
        (n, t)
        for n, t in inner.state_dict(keep_vars=True).items()
        if isinstance(t, torch.Tensor) and t.numel() > 0 and (parameters or n not in param_names)
    ]
    if not ctx.distributed or not named:
        return {n: 0.0 for n, _ in named}
    import torch.distributed as dist

    dev = ctx._comm_device()
    flat = torch.cat([t.detach().reshape(-1).double().to(dev) for _, t in named])
    ref = flat.clone()
    with peer_failures(ctx):
        dist.broadcast(ref, src=0)
    diff = (flat - ref).abs()
    both_nan = torch.isnan(flat) & torch.isnan(ref)
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=float("inf"))
    per_tensor = torch.stack([chunk.max() for chunk in diff.split([t.numel() for _, t in named])])
    with peer_failures(ctx):
        dist.all_reduce(per_tensor, op=dist.ReduceOp.MAX)
    return dict(zip([n for n, _ in named], per_tensor.tolist(), strict=True))


def check_buffers_equal(model: nn.Module, ctx: DistContext, *, atol: float = 0.0) -> float:
    """Raise BrnError unless every buffer is equal (within `atol`) on all ranks; return the max difference.

    Run by every rank before each checkpoint (it is a collective). The renorm moving averages are updated
    from all-reduced values, so on a healthy run the difference is exactly 0.
    """
    diffs = buffer_differences(model, ctx)
    if not diffs:
        return 0.0
    worst_name = max(diffs, key=lambda k: diffs[k])
    worst = diffs[worst_name]
    if worst > atol:
        raise BrnError(
            f"buffers differ across ranks ({worst_name}: max difference {worst:.3g}); "
            "the renorm statistics are no longer consistent, so no checkpoint was written"
        )
    return worst


# ----------------------------------------------------------------------------------------------
# Launcher: brn finetune --nproc N
# ----------------------------------------------------------------------------------------------
