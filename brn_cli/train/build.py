"""What a training run is built from: the runtime (device, rank), the model with its renorm layers, the
optimizer, the data loaders, the stop request of a signal, and the saved state a resume starts from.

:class:`brn_cli.train.trainer.Trainer` assembles these; each is usable on its own.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brn_cli.errors import BrnError
from brn_cli.train.config import SGD_MOMENTUM, FinetuneConfig, resume_path, resumed_config

__all__ = [
    "Runtime",
    "StopRequest",
    "load_model",
    "make_loader",
    "make_optimizer",
    "make_runtime",
    "make_val_loader",
    "read_resume_state",
]


# ----------------------------------------------------------------------------------------------
# Runtime: device and process identity in one place
# ----------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process trains and who it is. Single process: rank 0 of 1."""

    device: Any
    rank: int = 0
    world_size: int = 1
    dist: Any = None  # brn_cli.train.distributed.DistContext

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def wrap(self, model):
        """The module the training forward goes through: DDP (broadcast_buffers off) under torchrun."""
        from brn_cli.train.distributed import wrap_model

        return wrap_model(model, self.dist)

    def agree(self, action) -> None:
        """Run `action` on the main process; a BrnError it raises is raised on every rank."""
        problem = None
        if self.is_main:
            try:
                action()
            except BrnError as exc:
                problem = str(exc)
        problem = self.dist.broadcast_object(problem)
        if problem is not None:
            raise BrnError(problem)


def make_runtime(config: FinetuneConfig) -> Runtime:
    import os

    import torch

    from brn_cli.nn.device import resolve_device
    from brn_cli.train.distributed import DistContext, init_distributed, launched_by_torchrun

    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        ctx = init_distributed(config.device, config.dist_timeout)  # NCCL on GPU, gloo on CPU
        return Runtime(device=torch.device(ctx.device), rank=ctx.rank, world_size=ctx.world_size, dist=ctx)
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Runtime(device=device, dist=DistContext(device=str(device), timeout_s=config.dist_timeout))


class StopRequest:
    """Installs SIGINT/SIGTERM handlers (main thread only) that ask the loop to stop after this step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now (atomic writes leave nothing partial)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


# ----------------------------------------------------------------------------------------------
# Building blocks: model, optimizer, loaders
# ----------------------------------------------------------------------------------------------


def load_model(config: FinetuneConfig, source: str):
    """The model from `source` with every BatchNorm converted to Batch Renorm at the configured momentum."""
    from brn_cli.nn.convert import convert_batchnorm
    from brn_cli.nn.norms import renorm_layers
    from brn_cli.nn.peers import peer_record
    from brn_cli.storage.checkpoint import load_checkpoint

    ckpt = load_checkpoint(
        source, arch=config.arch, arch_kwargs=config.arch_kwargs, trust_pickle=config.trust_pickle
    )
    if ckpt.arch_spec is None:
        raise BrnError(
            f"arch is needed: {Path(source).name} is a pickled module, and the run's checkpoints must "
            "record an architecture they can be rebuilt from",
            param="arch",
        )
    model = ckpt.model
    if not renorm_layers(model):
        # A plain BatchNorm model: convert on the fly. A brn checkpoint keeps the user's choice of layers.
        # torchrl / sb3-contrib layers convert too: their warm-up position, read first, is what the run notes.
        ckpt.peer_schedule = peer_record(model)
        model = convert_batchnorm(model, momentum=config.momentum)
    layers = [layer for _, layer in renorm_layers(model)]
    if not layers:
        raise BrnError(f"{Path(source).name}: the model has no BatchNorm layers with running statistics")
    for layer in layers:  # brn checkpoints keep their own momentum: the run's momentum wins
        layer.momentum = float(config.momentum)
        layer.microbatch = config.microbatch
    return model, ckpt, len(layers)


def make_optimizer(model, config: FinetuneConfig):
    """SGD (Nesterov, momentum 0.9) / AdamW / RMSProp. No weight decay on biases and norm parameters."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise BrnError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=SGD_MOMENTUM, nesterov=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    # RMSProp as the paper's Inception run used it (decay 0.9, eps 1.0 in TF's convention is too large here)
    return torch.optim.RMSprop(groups, lr=config.lr, alpha=0.9, momentum=0.9, eps=1e-3)


def make_loader(dataset, batches: list[list[int]], runtime: Runtime, num_workers: int):
    """A DataLoader over precomputed index lists (one per step).

    It gets a private generator: a DataLoader without one draws its worker seed from the global torch RNG
    each time it is iterated, and a resumed run iterates once more (mid-epoch) than an uninterrupted one.
    """
    import torch

    from brn_cli.data.samplers import make_loader as index_loader

    loader = index_loader(dataset, batches, num_workers=num_workers, pin_memory=runtime.is_cuda)
    loader.generator = torch.Generator().manual_seed(0)
    return loader


def make_val_loader(data, runtime: Runtime, config: FinetuneConfig):
    """Validation batches (this rank's shard under torchrun: the sums are all-reduced); None without data."""
    import torch

    from brn_cli.data.samplers import eval_loader

    if data.val is None or len(data.val) == 0:
        return None
    val_set = data.val
    if runtime.world_size > 1:
        val_set = torch.utils.data.Subset(data.val, range(runtime.rank, len(data.val), runtime.world_size))
    loader = eval_loader(val_set, max(config.batch_size, 256), num_workers=config.num_workers)
    loader.generator = torch.Generator().manual_seed(0)  # see make_loader
    return loader


def read_resume_state(config: FinetuneConfig) -> tuple[FinetuneConfig, dict[str, Any] | None]:
    """(the run's config, the `training` entry of its last.pt) on resume; (config, None) for a fresh run."""

    if not config.resume:
        return config, None
    last_path = resume_path(config)
    from brn_cli.storage.checkpoint import read_raw

    _, saved = read_raw(last_path)  # weights-only; a damaged or truncated file is one line naming it
    if not isinstance(saved, dict) or not isinstance(saved.get("training"), dict):
        raise BrnError(f"resume: {last_path} is not a brn finetune checkpoint", param="resume")
    return resumed_config(config, saved["training"]["config"]), saved["training"]
