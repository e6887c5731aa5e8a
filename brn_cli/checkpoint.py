"""Reading users' checkpoints and writing brn's own.

Inputs (see :func:`load_checkpoint`):
  * plain state_dict files (.pt/.pth/.bin), possibly nested under ``state_dict``, ``model_state_dict``,
    ``model`` or ``state_dict_ema``, keys possibly prefixed ``module.`` (DDP) or ``_orig_mod.``
    (torch.compile) -- need ``arch``;
  * .safetensors files -- need ``arch``;
  * brn checkpoints (written by :func:`save_brn_checkpoint`) -- carry their own arch;
  * whole pickled modules -- only with ``trust_pickle=True``.

Loading never executes pickled code unless ``trust_pickle`` is set: files are read with
``torch.load(weights_only=True)``, and when that refuses a file,
``torch.serialization.get_unsafe_globals_in_checkpoint`` names what it would have imported.

The brn checkpoint is a dict of tensors and primitive types only (loads with weights_only=True)::

    {"format": "brn.checkpoint", "format_version": 1,
     "arch": {"spec": "torchvision:resnet18" | None, "kwargs": {...}},
     "state_dict": {...},                       # renorm layers in nn.BatchNorm's key layout
     "renorm_layers": {name: {"type", "num_features", "eps", "momentum", "rmax", "dmax", "affine"}},
     "input_shape": [N, C, ...] | None,
     "provenance": {"source_sha256", "source_name", "brn_version", "torch_version", "created", "command"},
     "preprocessing": {"normalize": "MEAN,STD"} | absent,  # how inputs were prepared in fine-tuning
     "training": {...} | absent}               # written by finetune: optimizer, schedule, RNG, step
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import importlib
import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .atomic import atomic_path
from .errors import BrnError, first_line

FORMAT_NAME = "brn.checkpoint"
FORMAT_VERSION = 1
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a file, plus what the file said about itself."""

    model: nn.Module
    path: Path
    file_format: str  # "brn", "state_dict", "safetensors", "pickled-module"
    top_level_keys: list[str]
    arch_spec: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: list[int] | None = None
    renorm_layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    # How inputs were prepared when the weights were trained ({"normalize": "MEAN,STD"}), so that
    # evaluate / calibrate feed the model what it was trained on without being told again.
    preprocessing: dict[str, Any] = field(default_factory=dict)
    state_key: str | None = None  # where the state_dict was nested, if it was
    sha256: str = ""

    def lineage(self) -> dict[str, Any]:
        """What a checkpoint derived from this one records about it (keyword arguments of
        :func:`make_brn_checkpoint`): the architecture, and the source file's name and sha256."""
        return {
            "arch_spec": self.arch_spec,
            "arch_kwargs": dict(self.arch_kwargs or {}),
            "source_sha256": self.sha256,
            "source_name": self.path.name,
            "preprocessing": dict(self.preprocessing) or None,
        }


# ----------------------------------------------------------------------------------------------
# Architecture specs
# ----------------------------------------------------------------------------------------------


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """Parse `--arch-kwargs` JSON into a dict."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BrnError(f"--arch-kwargs is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise BrnError("--arch-kwargs must be a JSON object, for example '{\"num_classes\": 10}'")
    return value


def import_callable(spec: str, *, option: str) -> Callable[..., Any]:
    """Resolve "package.module:callable" (`option` names the flag in error messages)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BrnError(f"{option} {spec}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise BrnError(f"{option} {spec}: {module_name} has no callable {attr!r}")
    return factory


def build_arch(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a randomly initialised model from `torchvision:NAME`, `timm:NAME` or `pkg.module:callable`.

    Nothing is downloaded: torchvision gets ``weights=None`` and timm ``pretrained=False``.
    """
    kwargs = dict(kwargs or {})
    if ":" not in spec:
        raise BrnError(f"--arch {spec!r}: expected torchvision:NAME, timm:NAME or package.module:callable")
    source, name = spec.split(":", 1)
    try:
        if source == "torchvision":
            try:
                import torchvision
            except ImportError:
                raise BrnError("--arch torchvision:... needs torchvision installed") from None
            if name not in torchvision.models.list_models():
                raise BrnError(f"--arch {spec}: torchvision has no model named {name!r}")
            kwargs.setdefault("weights", None)
            model = torchvision.models.get_model(name, **kwargs)
        elif source == "timm":
            try:
                import timm
            except ImportError:
                raise BrnError("--arch timm:... needs timm installed") from None
            if not timm.is_model(name):
                raise BrnError(f"--arch {spec}: timm has no model named {name!r}")
            kwargs.setdefault("pretrained", False)
            model = timm.create_model(name, **kwargs)
        else:
            model = import_callable(spec, option="--arch")(**kwargs)
    except BrnError:
        raise
    except TypeError as exc:
        raise BrnError(f"--arch {spec}: bad --arch-kwargs ({exc})") from None
    if not isinstance(model, nn.Module):
        raise BrnError(f"--arch {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise BrnError(f"{path}: no such file")
    if path.is_dir():
        raise BrnError(f"{path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise BrnError(f"{path} is empty")


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20)


def read_raw(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[str, Any]:
    """Read a file into ("safetensors" | "torch", object) without building any model."""
    path = Path(path)
    _check_file(path)
    if _is_safetensors(path):
        import safetensors
        from safetensors.torch import load_file

        # The error class is SafetensorError (no "s"); look it up so a rename cannot break the import.
        st_error = getattr(safetensors, "SafetensorError", None) or getattr(
            safetensors, "SafetensorsError", OSError
        )
        try:
            return "safetensors", load_file(str(path), device="cpu")
        except (st_error, OSError, ValueError) as exc:
            raise BrnError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    try:
        return "torch", torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Weights only" not in str(exc):
            raise BrnError(f"{path}: not a PyTorch checkpoint ({first_line(exc)})") from None
        unsafe = _unsafe_globals(path, exc)
        if not trust_pickle and not unsafe:
            # The weights-only unpickler choked on something other than an import: random bytes or a
            # damaged stream, not a checkpoint that holds Python objects.
            detail = str(exc).rsplit("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            reason = detail[0][:200] if detail and "WeightsUnpickler" in str(exc) else first_line(exc)
            raise BrnError(f"{path}: not a PyTorch checkpoint ({reason})") from None
        if not trust_pickle:
            what = (
                f" (it would import {', '.join(unsafe[:5])}{' ...' if len(unsafe) > 5 else ''})"
                if unsafe
                else ""
            )
            raise BrnError(
                f"{path} contains pickled Python objects{what}; loading it can run arbitrary code. "
                "Re-run with --trust-pickle only if you trust its source"
            ) from None
        try:
            return "torch", torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # the pickle itself failed: missing class, broken stream...
            raise BrnError(f"{path}: could not unpickle ({type(exc).__name__}: {first_line(exc)})") from None
    except Exception as exc:  # the weights-only loader runs no code: any failure is the file's
        raise BrnError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})") from None


def _unsafe_globals(path: Path, exc: BaseException) -> list[str]:
    """What a pickle would import, read without running it (zip format), else from torch's error text
    (legacy format: 'Unsupported global: GLOBAL module.name')."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        names = []
    return names or list(dict.fromkeys(re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))))


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def find_state_dict(obj: Any, key: str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """Locate the state_dict inside a loaded object: top level, or under one of NESTED_STATE_KEYS."""
    if not isinstance(obj, Mapping):
        raise BrnError(f"file holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    if key is not None:
        if key not in obj or not _is_tensor_dict(obj[key]):
            raise BrnError(f"no state_dict under key {key!r} (top-level keys: {', '.join(map(str, obj))})")
        return dict(obj[key]), key
    if _is_tensor_dict(obj):
        return dict(obj), None
    for candidate in NESTED_STATE_KEYS:
        if candidate in obj and _is_tensor_dict(obj[candidate]):
            return dict(obj[candidate]), candidate
    keys = ", ".join(map(str, list(obj)[:10]))
    raise BrnError(f"no state_dict found (top-level keys: {keys or 'none'})")


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `module.` (DDP) and `_orig_mod.` (torch.compile) wherever they lead a key segment."""
    out = {}
    for key, value in state_dict.items():
        for prefix in STRIPPED_PREFIXES:
            key = key.replace("." + prefix, ".")
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _is_optional_key(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def match_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str
) -> dict[str, torch.Tensor]:
    """Check `state_dict` against `model` and return it (with a common wrapper prefix removed if needed).

    Raises BrnError naming missing and unexpected keys and shape mismatches.
    """
    expected = model.state_dict()
    state = strip_prefixes(state_dict)
    if not set(state) & set(expected):
        # Lightning and similar wrappers: try dropping one common leading segment ("model.", "net.").
        heads = {k.split(".", 1)[0] for k in state if "." in k}
        if len(heads) == 1:
            head = heads.pop() + "."
            state = {k[len(head) :] if k.startswith(head) else k: v for k, v in state.items()}
    missing = [k for k in expected if k not in state and not _is_optional_key(k)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {list(state[k].shape)} vs model {list(expected[k].shape)})"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if names:
                shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
                parts.append(f"{len(names)} {label}: {shown}")
        raise BrnError(f"weights do not match {what}: " + "; ".join(parts))
    return state


def load_state_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str) -> nn.Module:
    state = match_state_dict(model, state_dict, what=what)
    model.load_state_dict(state, strict=False)  # only optional num_batches_tracked may be absent
    return model


def load_checkpoint(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    state_key: str | None = None,
) -> LoadedCheckpoint:
    """Load any supported checkpoint into a ready nn.Module (see the module docstring)."""
    path = Path(path)
    kind, obj = read_raw(path, trust_pickle=trust_pickle)
    digest = sha256_of(path)
    arch_kwargs = dict(arch_kwargs or {})

    if kind == "torch" and isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME:
        return _load_brn(path, obj, digest, arch, arch_kwargs)

    if kind == "torch" and isinstance(obj, nn.Module):  # only reachable with trust_pickle
        model = obj
        if arch is not None:
            model = load_state_into(build_arch(arch, arch_kwargs), obj.state_dict(), what=f"--arch {arch}")
        return LoadedCheckpoint(
            model=model,
            path=path,
            file_format="pickled-module",
            top_level_keys=[],
            arch_spec=arch,
            arch_kwargs=arch_kwargs,
            sha256=digest,
        )

    if kind == "torch" and isinstance(obj, Mapping):
        for candidate in NESTED_STATE_KEYS:  # {"model": <pickled module>, ...}
            if isinstance(obj.get(candidate), nn.Module):
                return LoadedCheckpoint(
                    model=obj[candidate],
                    path=path,
                    file_format="pickled-module",
                    top_level_keys=[str(k) for k in obj],
                    state_key=candidate,
                    sha256=digest,
                )

    state, nested = find_state_dict(obj, state_key)
    top_keys = [str(k) for k in obj] if isinstance(obj, Mapping) else []
    if arch is None:
        raise BrnError(
            f"{path.name} is a plain {'safetensors' if kind == 'safetensors' else 'state_dict'} file: "
            "pass --arch (torchvision:NAME, timm:NAME or package.module:callable) to say which model it holds"
        )
    model = load_state_into(build_arch(arch, arch_kwargs), state, what=f"--arch {arch}")
    return LoadedCheckpoint(
        model=model,
        path=path,
        file_format="safetensors" if kind == "safetensors" else "state_dict",
        top_level_keys=top_keys,
        arch_spec=arch,
        arch_kwargs=arch_kwargs,
        state_key=nested,
        sha256=digest,
    )


def _load_brn(path: Path, obj: Mapping, digest: str, arch: str | None, arch_kwargs: dict) -> LoadedCheckpoint:
    from .convert import apply_renorm_layout

    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BrnError(
            f"{path}: brn checkpoint format version {version!r} is newer than this brn understands"
        )
    arch_info = obj.get("arch") or {}
    spec = arch or arch_info.get("spec")
    kwargs = arch_kwargs or dict(arch_info.get("kwargs") or {})
    if spec is None:
        raise BrnError(f"{path}: this brn checkpoint records no architecture; pass --arch")
    model = build_arch(spec, kwargs)
    layers = dict(obj.get("renorm_layers") or {})
    apply_renorm_layout(model, layers)
    load_state_into(model, obj["state_dict"], what=f"the architecture recorded in {path.name} ({spec})")
    return LoadedCheckpoint(
        model=model,
        path=path,
        file_format="brn",
        top_level_keys=[str(k) for k in obj],
        arch_spec=spec,
        arch_kwargs=kwargs,
        input_shape=obj.get("input_shape"),
        renorm_layers=layers,
        provenance=dict(obj.get("provenance") or {}),
        training=obj.get("training"),
        preprocessing=dict(obj.get("preprocessing") or {}),
        sha256=digest,
    )


# ----------------------------------------------------------------------------------------------
# Writing brn checkpoints
# ----------------------------------------------------------------------------------------------


def renorm_layer_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-layer renorm settings, as recorded in a brn checkpoint."""
    from .layer import BatchRenormNd

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BatchRenormNd):
            out[name] = {
                "type": type(module).__name__,
                "num_features": int(module.num_features),
                "eps": float(module.eps),
                "momentum": float(module.momentum),
                "rmax": float(module.rmax),
                "dmax": float(module.dmax),
                "affine": bool(module.affine),
            }
    return out


def make_brn_checkpoint(
    model: nn.Module,
    *,
    arch_spec: str | None,
    arch_kwargs: Mapping[str, Any] | None = None,
    input_shape: list[int] | None = None,
    source_sha256: str | None = None,
    source_name: str | None = None,
    command: str = "convert",
    training: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The brn checkpoint dict for `model` (tensors and primitive types only)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ckpt: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": {"spec": arch_spec, "kwargs": copy.deepcopy(dict(arch_kwargs or {}))},
        "state_dict": state,
        "renorm_layers": renorm_layer_settings(model),
        "input_shape": [int(s) for s in input_shape] if input_shape else None,
        "provenance": {
            "source_sha256": source_sha256,
            "source_name": source_name,
            "brn_version": __version__,
            "torch_version": str(torch.__version__),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
        },
    }
    if training is not None:
        ckpt["training"] = training
    if preprocessing:
        ckpt["preprocessing"] = dict(preprocessing)
    return ckpt


def save_checkpoint_dict(ckpt: Mapping[str, Any], path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a checkpoint dict atomically with torch.save."""
    with atomic_path(path, force=force) as tmp:
        torch.save(dict(ckpt), tmp)
    return Path(path)


def save_brn_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, force: bool = False, **meta: Any
) -> Path:
    """Build (see :func:`make_brn_checkpoint`) and write a brn checkpoint atomically."""
    return save_checkpoint_dict(make_brn_checkpoint(model, **meta), path, force=force)
