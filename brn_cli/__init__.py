"""brn: Batch Renormalization (Ioffe, NIPS 2017) for existing PyTorch models.

Everything an own training loop needs is importable from here (docs/own-loop.md shows the loop)::

    convert_batchnorm(model)                      # BatchNorm -> Batch Renorm, eval outputs unchanged
    position = peer_schedule(critic)              # a torchrl / sb3-contrib BatchRenorm's warm-up, to continue
    sched = RenormScheduler.from_preset(model, "paper-scaled", total_steps=T, optimizer=opt)
    sched = RenormScheduler.warmup(model, opt, warmup_steps=W)  # BatchNorm for W steps, then rmax 3, dmax 5
    calibrate(model, loader, num_batches=50)      # exact statistics from any iterable of inputs
    LabelBatchSampler(labels, 32, "grouped:4")    # P x K batches (P labels, K examples each)
    set_microbatch(model, 4); set_renorm_limits(model, 3.0, 5.0)
    configure_stats_sync(model, "global", init_distributed())  # renorm statistics over a process group
    collect_telemetry(model)                      # how far the batch statistics were from the averages
    fold_model(model); export_onnx_checked(...); verify_onnx(...); export_state_dict(model, "w.pt")

The names are imported lazily so that starting the `brn` command does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from brn_cli._version import __version__

# public name -> module that defines it ("module:attribute" where the module's name differs)
_EXPORTS = {
    "BatchRenorm1d": "nn.layer",
    "BatchRenorm2d": "nn.layer",
    "BatchRenorm3d": "nn.layer",
    "BatchRenormNd": "nn.layer",
    "BatchRenormAct": "nn.layer",
    "RenormTelemetry": "nn.layer",
    "batch_renorm": "nn.layer",
    "collect_telemetry": "nn.norms",
    "convert_batchnorm": "nn.convert",
    "plan_conversion": "nn.convert",
    "restore_batchnorm": "nn.convert",
    "peer_schedule": "nn.peers",
    "PeerSchedule": "nn.peers",
    "load_checkpoint": "storage.checkpoint",
    "save_brn_checkpoint": "storage.checkpoint",
    "build_arch": "storage.checkpoint",
    "find_fold_sites": "deploy.graph",
    "fold_model": "deploy.fold",
    "FoldResult": "deploy.fold",
    "export_onnx_checked": "deploy.export",
    "verify_onnx": "deploy.verify",
    "export_state_dict": "storage.statedict",
    "inspect_model": "deploy.inspection",
    "BrnError": "errors",
    "RenormScheduler": "train.schedule",
    "RenormOpeningWarning": "train.schedule",
    "Schedule": "train.schedule",
    "parse_schedule": "train.schedule",
    "calibrate": "evaluation.calibrate:calibrate_inputs",
    "LayerShift": "evaluation.calibrate",
    "LabelBatchSampler": "data.samplers",
    "set_microbatch": "nn.norms",
    "set_renorm_limits": "nn.norms",
    "renorm_layers": "nn.norms",
    "configure_stats_sync": "train.distributed",
    "init_distributed": "train.distributed",
    "flat_outputs": "nn.outputs",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from brn_cli.data.samplers import LabelBatchSampler
    from brn_cli.deploy.export import export_onnx_checked
    from brn_cli.deploy.fold import FoldResult, fold_model
    from brn_cli.deploy.graph import find_fold_sites
    from brn_cli.deploy.inspection import inspect_model
    from brn_cli.deploy.verify import verify_onnx
    from brn_cli.errors import BrnError
    from brn_cli.evaluation.calibrate import LayerShift
    from brn_cli.evaluation.calibrate import calibrate_inputs as calibrate
    from brn_cli.nn.convert import convert_batchnorm, plan_conversion, restore_batchnorm
    from brn_cli.nn.layer import (
        BatchRenorm1d,
        BatchRenorm2d,
        BatchRenorm3d,
        BatchRenormAct,
        BatchRenormNd,
        RenormTelemetry,
        batch_renorm,
    )
    from brn_cli.nn.norms import collect_telemetry, renorm_layers, set_microbatch, set_renorm_limits
    from brn_cli.nn.outputs import flat_outputs
    from brn_cli.nn.peers import PeerSchedule, peer_schedule
    from brn_cli.storage.checkpoint import build_arch, load_checkpoint, save_brn_checkpoint
    from brn_cli.storage.statedict import export_state_dict
    from brn_cli.train.distributed import configure_stats_sync, init_distributed
    from brn_cli.train.schedule import RenormOpeningWarning, RenormScheduler, Schedule, parse_schedule


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'brn_cli' has no attribute {name!r}")
    module, _, attribute = target.partition(":")
    value = getattr(importlib.import_module(f".{module}", __name__), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
