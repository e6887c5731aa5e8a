"""brn: Batch Renormalization (Ioffe, NIPS 2017) for existing PyTorch models.

The public API is imported lazily so that `brn --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "BatchRenorm1d": "layer",
    "BatchRenorm2d": "layer",
    "BatchRenorm3d": "layer",
    "BatchRenormNd": "layer",
    "BatchRenormAct": "layer",
    "RenormTelemetry": "layer",
    "batch_renorm": "layer",
    "collect_telemetry": "layer",
    "convert_batchnorm": "convert",
    "plan_conversion": "convert",
    "restore_batchnorm": "convert",
    "load_checkpoint": "checkpoint",
    "save_brn_checkpoint": "checkpoint",
    "build_arch": "checkpoint",
    "find_fold_sites": "graph",
    "fold_model": "fold",
    "FoldResult": "fold",
    "export_onnx_checked": "export",
    "verify_onnx": "verify",
    "export_state_dict": "statedict",
    "inspect_model": "inspection",
    "BrnError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import build_arch, load_checkpoint, save_brn_checkpoint
    from .convert import convert_batchnorm, plan_conversion, restore_batchnorm
    from .errors import BrnError
    from .export import export_onnx_checked
    from .fold import FoldResult, fold_model
    from .graph import find_fold_sites
    from .inspection import inspect_model
    from .layer import (
        BatchRenorm1d,
        BatchRenorm2d,
        BatchRenorm3d,
        BatchRenormAct,
        BatchRenormNd,
        RenormTelemetry,
        batch_renorm,
        collect_telemetry,
    )
    from .statedict import export_state_dict
    from .verify import verify_onnx


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'brn_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
