"""The state of a training run: every piece that decides what the next step does, each with
``state_dict`` / ``load_state_dict``, gathered in one :class:`TrainState`.

Resume restores one TrainState; a run killed and resumed from its last checkpoint continues bit-exactly
(CPU). The model's weights and running statistics are the checkpoint's own entries (``state_dict``); the
rest is its ``training`` entry, :meth:`TrainState.state_dict`, whose keys are kept stable so that older
last.pt files still resume.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from brn_cli.errors import BrnError

__all__ = ["LRSchedule", "MetricWindow", "RngState", "SamplerPosition", "TrainState", "lr_at"]

LR_SCHEDULES = ("cosine", "linear", "constant", "step")
# `step`: Inception-v3's decay (x0.94 every two epochs), the model and optimizer of the paper's section 4:
# 81 decays over the paper's 130k steps of 1,600 examples, spread evenly over the run, as paper-scaled
# spreads the rmax/dmax knots. The rate ends at 0.94**80 = 0.7 % of its peak.
STEP_DECAY_FACTOR = 0.94
STEP_DECAYS = 81


def lr_at(
    step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine"
) -> float:
    """Learning rate for the update that turns step `step` into step+1 (a pure function of the step).

    Warm-up: linear from base/warmup to base over the first `warmup_steps` updates. Then
    cosine: base * (1 + cos(pi * t)) / 2, linear: base * (1 - t), constant: base,
    step: base * 0.94 ** floor(81 t) (:data:`STEP_DECAYS` staircase decays), with t the fraction of
    the remaining updates already done (t = 0 at the first post-warm-up update).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    span = max(total_steps - warmup_steps, 1)
    t = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "linear":
        return base_lr * (1.0 - t)
    if kind == "step":  # integer arithmetic: a decay falls on the same update whatever the rounding
        done = min(max(step - warmup_steps, 0), span)
        return base_lr * STEP_DECAY_FACTOR ** min(done * STEP_DECAYS // span, STEP_DECAYS - 1)
    raise BrnError(f"lr_schedule {kind!r}: expected one of {', '.join(LR_SCHEDULES)}", param="lr_schedule")


@dataclass
class LRSchedule:
    """The learning rate as a function of the applied updates; :meth:`apply` sets it on the optimizer."""

    kind: str
    base_lr: float
    warmup_steps: int
    total_steps: int

    def at(self, updates: int) -> float:
        return lr_at(
            updates,
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            kind=self.kind,
        )

    def apply(self, optimizer: Any, updates: int) -> float:
        lr = self.at(updates)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base_lr": self.base_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kind, self.base_lr = state["kind"], state["base_lr"]
        self.warmup_steps, self.total_steps = state["warmup_steps"], state["total_steps"]


@dataclass
class SamplerPosition:
    """Where the data order is: the epoch and the index of the next batch in it."""

    epoch: int = 0
    batch_index: int = 0

    def advance(self) -> None:
        self.batch_index += 1

    def next_epoch(self) -> None:
        self.epoch, self.batch_index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])


class RngState:
    """Every RNG a step can touch: torch CPU (and CUDA on a CUDA run), numpy, python ``random``."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    @staticmethod
    def seed(seed: int) -> None:
        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        """As tensors and primitives, so that it loads with weights_only=True."""
        import numpy as np
        import torch

        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        py_version, py_internal, py_gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": {
                "name": str(np_name),
                "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                "pos": int(np_pos),
                "has_gauss": int(np_has_gauss),
                "cached_gaussian": float(np_gauss),
            },
            "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
            "cuda": torch.cuda.get_rng_state_all() if self.cuda else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import numpy as np
        import torch

        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state(
            (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
        if self.cuda and state.get("cuda"):
            torch.cuda.set_rng_state_all(state["cuda"])


class MetricWindow:
    """The running sums of the current logging window: the loss over the examples, and the training metric's
    numerator over its own denominator (examples for accuracy, labelled pixels for pixel accuracy).

    Each step adds to sums kept on the device (no host sync per step); :meth:`fold` moves them, summed over
    the ranks, into the window (at each log line, each save and the last step). Every step's loss is in the
    sum, so one non-finite loss shows at the next fold.
    """

    def __init__(self, device: Any) -> None:
        import torch

        self.totals = self._empty()
        self.loss_sum = torch.zeros((), device=device)
        self.correct_sum = torch.zeros((), device=device)
        self.metric_sum = torch.zeros((), device=device)  # the metric's denominator
        self.seen = 0

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"loss": 0.0, "correct": 0.0, "count": 0.0, "metric_count": 0.0, "steps": 0}

    def add(self, loss: Any, correct: Any, metric_count: Any, *, examples: int) -> None:
        """One step: its mean loss over `examples`, and its metric numerator `correct` over `metric_count`."""
        self.loss_sum += loss.detach() * examples
        self.correct_sum += correct
        self.metric_sum += metric_count
        self.seen += examples
        self.totals["steps"] += 1

    def fold(self, dist_ctx: Any) -> float:
        """Move the device sums into the window; returns the summed loss (the window is left as it was when
        that is not finite, for the caller to report)."""
        totals = dist_ctx.sum(
            [float(self.loss_sum), float(self.correct_sum), float(self.seen), float(self.metric_sum)]
        )
        if not math.isfinite(totals[0]):
            return totals[0]
        self.totals["loss"] += totals[0]
        self.totals["correct"] += totals[1]
        self.totals["count"] += totals[2]
        self.totals["metric_count"] += totals[3]
        self.loss_sum.zero_()
        self.correct_sum.zero_()
        self.metric_sum.zero_()
        self.seen = 0
        return totals[0]

    def close(self) -> tuple[float, float]:
        """(mean loss, mean metric) of the window, which starts again empty."""
        count = max(self.totals["count"], 1)
        means = self.totals["loss"] / count, self.totals["correct"] / max(self.totals["metric_count"], 1)
        self.totals = self._empty()
        return means

    def state_dict(self) -> dict[str, Any]:
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = dict(state)
        # windows saved before the metric had its own denominator counted examples for both
        self.totals.setdefault("metric_count", self.totals.get("count", 0.0))


@dataclass
class TrainState:
    """One run's state: what resume restores. ``step`` counts iterations (batches drawn); the optimizer
    updates actually applied are ``renorm.step`` (they differ when an fp16 GradScaler skips an update)."""

    total_steps: int
    optimizer: Any
    lr_schedule: LRSchedule
    renorm: Any  # brn_cli.train.schedule.RenormScheduler
    scaler: Any  # torch.amp.GradScaler or None
    rng: RngState
    window: MetricWindow
    config: dict[str, Any]
    world_size: int
    data_fingerprint: dict[str, Any]
    step: int = 0
    position: SamplerPosition = field(default_factory=SamplerPosition)
    best: dict[str, Any] = field(default_factory=dict)

    def state_dict(self, eval_pending: bool = False) -> dict[str, Any]:
        """The checkpoint's ``training`` entry. `eval_pending`: saved before the validation of its step."""
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            **self.position.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "renorm_schedule": self.renorm.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": self.rng.state_dict(),
            "window": self.window.state_dict(),
            "best": dict(self.best),
            "config": self.config,
            "world_size": self.world_size,
            "data_fingerprint": self.data_fingerprint,
            "eval_pending": eval_pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``training`` entry (the config, world size and fingerprint stay this run's: the caller
        checked them against the recorded ones)."""
        self.step = int(state["step"])
        self.position.load_state_dict(state)
        if "lr_schedule" in state:
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.renorm.load_state_dict(state["renorm_schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.window.load_state_dict(state["window"])
        self.best = dict(state.get("best") or {})
        self.rng.load_state_dict(state["rng"])
