"""brn: Batch Renormalization (Ioffe, NIPS 2017) for existing PyTorch models.

The public API is imported lazily so that `brn --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from brn_cli._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "BatchRenorm1d": "nn.layer",
    "BatchRenorm2d": "nn.layer",
    "BatchRenorm3d": "nn.layer",
    "BatchRenormNd": "nn.layer",
    "BatchRenormAct": "nn.layer",
    "RenormTelemetry": "nn.layer",
    "batch_renorm": "nn.layer",
    "collect_telemetry": "nn.layer",
    "convert_batchnorm": "nn.convert",
    "plan_conversion": "nn.convert",
    "restore_batchnorm": "nn.convert",
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
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from brn_cli.deploy.export import export_onnx_checked
    from brn_cli.deploy.fold import FoldResult, fold_model
    from brn_cli.deploy.graph import find_fold_sites
    from brn_cli.deploy.inspection import inspect_model
    from brn_cli.deploy.verify import verify_onnx
    from brn_cli.errors import BrnError
    from brn_cli.nn.convert import convert_batchnorm, plan_conversion, restore_batchnorm
    from brn_cli.nn.layer import (
        BatchRenorm1d,
        BatchRenorm2d,
        BatchRenorm3d,
        BatchRenormAct,
        BatchRenormNd,
        RenormTelemetry,
        batch_renorm,
        collect_telemetry,
    )
    from brn_cli.storage.checkpoint import build_arch, load_checkpoint, save_brn_checkpoint
    from brn_cli.storage.statedict import export_state_dict


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'brn_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
