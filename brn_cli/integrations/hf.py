"""Batch Renorm in a Hugging Face ``Trainer``: one callback (``pip install "brn[hf]"``).

For vision models with BatchNorm (``ResNetForImageClassification``, ConvNeXt-style heads, timm backbones
wrapped in transformers)::

    from brn_cli.integrations.hf import BatchRenormCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[BatchRenormCallback()])
    trainer.train()

What it does, at each event of the Trainer:

* ``on_init_end`` (the end of ``Trainer.__init__``, before the optimizer exists): converts the model's
  BatchNorm layers to Batch Renorm; a model converted already is taken as it is. A callback added later
  (``trainer.add_callback``) converts at ``on_train_begin`` instead, and refuses to once an optimizer holds
  the old parameters: pass it in ``callbacks=`` or convert first;
* ``on_train_begin``: with several processes (``torchrun``; the Trainer has built the optimizer and wrapped
  the converted model in DDP by then), sets the renorm layers to brn's statistics sync over the Trainer's
  process group (``stats_sync="global"``: each layer's batch statistics over every rank's examples, as
  SyncBatchNorm would, so 2 processes of batch B train as one of batch 2B); builds the schedule (a preset
  stretched to ``state.max_steps`` unless ``total_steps`` is given, a pair of specs, or the
  ``warmup_steps`` form), restores the schedule saved in the checkpoint when resuming, and moves it to
  ``state.global_step``;
* ``on_step_begin`` and ``on_step_end``: set rmax / dmax of ``state.global_step`` (completed optimizer
  steps);
* ``on_log``: adds ``brn/rmax``, ``brn/dmax`` and the last step's telemetry to the training logs the
  Trainer writes (``logging_steps``): to the ``logs`` the reporters after this callback receive and to
  ``state.log_history``. The Trainer puts its default reporters (``report_to``) before user callbacks; to
  have them see the brn values, pass ``report_to="none"`` and list the reporter callbacks after this one;
* checkpoints: the callback is an ``ExportableState``: its schedule state is written in each checkpoint's
  ``trainer_state.json``, and ``trainer.train(resume_from_checkpoint=...)`` continues the limits exactly
  (with or without ``restore_callback_states_from_checkpoint``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from brn_cli.integrations._driver import RenormCallbackBase

__all__ = ["BatchRenormCallback"]

log = logging.getLogger(__name__)


class BatchRenormCallback(RenormCallbackBase, TrainerCallback, ExportableState):
    """Converts a transformers model to Batch Renorm and drives rmax / dmax from ``state.global_step``.

    `schedule`: ``"paper-scaled"`` (default: the paper's schedule stretched to the run's optimizer steps),
    ``"paper"``, ``"off"``, or a pair of specs ``("5k:1,40k:3", "5k:0,25k:5")``. `warmup_steps`: instead,
    BatchNorm for that many steps, then `rmax`, `dmax` at once. `total_steps`: the run's length for
    ``paper-scaled`` (default: ``state.max_steps``). `convert`: convert BatchNorm layers
    (``convert_options`` go to :func:`brn_cli.convert_batchnorm`). `stats_sync`: ``"global"`` or
    ``"local"`` under several processes. `log_telemetry`: add the limits and telemetry to the training logs.

    Example::

        >>> from brn_cli.integrations.hf import BatchRenormCallback
        >>> BatchRenormCallback(warmup_steps=1000).state()["args"]["warmup_steps"]
        1000
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._training = False

    # ExportableState: what trainer_state.json carries, and what Trainer sets back on a rebuilt callback.
    def state(self) -> dict[str, Any]:
        return {"args": self.arguments(), "attributes": {"brn_state": self.brn_state}}

    @property
    def brn_state(self) -> dict[str, Any]:
        return self.driver.state_dict()

    @brn_state.setter
    def brn_state(self, value: Mapping[str, Any]) -> None:
        self.driver.load_state_dict(value)

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            self.driver.prepare(model, optimizer_built=kwargs.get("optimizer") is not None)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.driver.model is None or (model is not None and self.driver.model is not model):
            self.driver.prepare(model, optimizer_built=kwargs.get("optimizer") is not None)
        # The Trainer has wrapped the model in DDP by now; the sync is a setting of the layers, not of the
        # wrapper, and takes effect at the first step. Its group is the Trainer's (torchrun's default group).
        rank, world_size = _process_group_position()
        note = self.driver.sync_statistics(rank, world_size, str(_device_of(model)))
        if note and rank == 0:
            log.info(note)
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, Mapping):  # resuming: the checkpoint's trainer_state.json holds our state
            self.driver.load_state_dict(saved.get("attributes", {}).get("brn_state") or {})
        self.driver.start(state.max_steps or None, state.global_step)
        self._training = True

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.begin_step(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The step is done: a checkpoint saved now (save_steps) holds the new position.
        self.driver.follow(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not (self.log_telemetry and self._training and logs is not None):
            return
        if "loss" not in logs:
            return  # an evaluation's metrics or the run's summary, not a training step's log
        metrics = self.driver.metrics()
        logs.update(metrics)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(metrics)  # the Trainer appended a copy of `logs` just before this event

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training = False
        self.driver.release_statistics()


def _process_group_position() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed's default group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device_of(model: Any) -> Any:
    for parameter in model.parameters():
        return parameter.device
    return "cpu"
