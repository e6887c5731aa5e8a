"""Batch Renorm in a Lightning ``Trainer``: one callback (``pip install "brn[lightning]"``).

::

    from brn_cli.integrations.lightning import BatchRenormCallback

    trainer = Trainer(max_steps=10_000, callbacks=[BatchRenormCallback("paper-scaled")])
    trainer.fit(module, datamodule)

What it does, at each point of ``fit``:

* ``setup``: converts the module's BatchNorm layers to Batch Renorm (a module converted already is taken as
  it is), before Lightning builds the optimizer and wraps the model; under a multi-process strategy (DDP) it
  sets the renorm layers to brn's statistics sync (``stats_sync="global"``: each layer's batch statistics
  over every rank's examples). Lightning's ``sync_batchnorm=True`` replaces only ``nn.BatchNorm`` modules by
  ``SyncBatchNorm``: the renorm layers are left alone and keep brn's sync.
* ``on_train_start``: builds the schedule (a preset stretched to ``trainer.estimated_stepping_batches``
  unless ``total_steps`` is given, a pair of specs, or the ``warmup_steps`` form) at the trainer's
  ``global_step``;
* ``on_train_batch_start`` and ``on_train_batch_end``: set rmax / dmax of ``trainer.global_step``
  (completed optimizer steps, so gradient accumulation and validation never move it);
* ``on_train_batch_end``: logs ``brn/rmax``, ``brn/dmax`` and the telemetry of the step (``brn/mean_abs_log_r``,
  ``brn/mean_abs_d``, clip fractions, ``brn/batchnorm_phase``) through ``pl_module.log`` whenever Lightning
  writes its step metrics (``log_every_n_steps``);
* ``state_dict`` / ``load_state_dict``: the schedules and position travel in the trainer's checkpoint, so
  ``fit(ckpt_path=...)`` continues the limits exactly (the saved schedules win over new arguments).

The ``lightning`` package (``lightning.pytorch``) is used when installed, else ``pytorch_lightning``.
"""

from __future__ import annotations

import logging
from typing import Any

from brn_cli.integrations._driver import RenormCallbackBase

try:
    from lightning.pytorch import Callback
except ImportError:
    from pytorch_lightning import Callback

__all__ = ["BatchRenormCallback"]

log = logging.getLogger(__name__)


class BatchRenormCallback(RenormCallbackBase, Callback):
    """Converts the LightningModule to Batch Renorm and drives rmax / dmax from the trainer's global step.

    `schedule`: ``"paper-scaled"`` (default: the paper's schedule stretched to the run's optimizer steps),
    ``"paper"``, ``"off"``, or a pair of specs ``("5k:1,40k:3", "5k:0,25k:5")``. `warmup_steps`: instead,
    BatchNorm for that many steps, then `rmax`, `dmax` at once (CrossQ). `total_steps`: the run's length for
    ``paper-scaled`` (default: ``trainer.estimated_stepping_batches``). `convert`: convert BatchNorm layers
    at setup (``convert_options`` go to :func:`brn_cli.convert_batchnorm`); a converted module is accepted.
    `stats_sync`: ``"global"`` or ``"local"`` renorm statistics under DDP. `log_telemetry`: log the limits and
    telemetry through ``pl_module.log``.

    Example::

        >>> from brn_cli.integrations.lightning import BatchRenormCallback
        >>> BatchRenormCallback(warmup_steps=1000).state_key
        'BatchRenormCallback'
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.driver.prepare(pl_module)
        note = self.driver.sync_statistics(
            trainer.global_rank, trainer.world_size, str(trainer.strategy.root_device)
        )
        if note and trainer.is_global_zero:
            log.info(note)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.driver.start(_total_steps(trainer), trainer.global_step)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.driver.begin_step(trainer.global_step)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.log_telemetry and _lightning_logs_this_step(trainer):
            pl_module.log_dict(self.driver.metrics(), on_step=True, on_epoch=False)
        # The step is done: a checkpoint saved now (every_n_train_steps, epoch end) holds the new position.
        self.driver.follow(trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.driver.release_statistics()

    def state_dict(self) -> dict[str, Any]:
        return self.driver.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.driver.load_state_dict(state_dict)


def _total_steps(trainer: Any) -> int | None:
    """The run's optimizer steps as Lightning estimates them; None for an unbounded run."""
    estimate = trainer.estimated_stepping_batches
    if estimate is None or estimate == float("inf"):
        return None
    return int(estimate)


def _lightning_logs_this_step(trainer: Any) -> bool:
    """Whether Lightning writes this batch's step metrics to the logger (``log_every_n_steps``): logging
    on other batches would only cost a host sync for values Lightning drops."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
