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
     "task": {"name": "segmentation", "ignore_index": 255} | absent,  # what finetune trained it for
     "peer_schedule": {"positions": [{"layers", "library", "start_step", "warmup_steps", "rmax", "dmax",
                       "ramp"}]} | absent,  # torchrl / sb3-contrib warm-up, recorded by convert
     "training": {...} | absent}               # written by finetune: optimizer, schedule, RNG, step
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import errno
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import pickle
import re
import shutil
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brn_cli._version import __version__
from brn_cli.errors import BrnError, first_line
from brn_cli.nn.norms import renorm_layer_settings
from brn_cli.storage.atomic import atomic_path

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
    # The sample input shape as the file records it; read it through `input_shape`, which checks it.
    recorded_input_shape: Any = None
    renorm_layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    # How inputs were prepared when the weights were trained ({"normalize": "MEAN,STD"}), so that
    # evaluate / calibrate feed the model what it was trained on without being told again.
    preprocessing: dict[str, Any] = field(default_factory=dict)
    # The task it was fine-tuned for ({"name": "segmentation", "ignore_index": 255}): plain data only.
    task: dict[str, Any] = field(default_factory=dict)
    # Where converted torchrl / sb3-contrib layers stood in their warm-up (brn_cli.nn.peers.peer_record), for
    # RenormScheduler.from_checkpoint to continue; checked when loaded.
    peer_schedule: dict[str, Any] = field(default_factory=dict)
    state_key: str | None = None  # where the state_dict was nested, if it was
    sha256: str = ""

    @property
    def input_shape(self) -> list[int] | None:
        """The recorded sample input shape, checked (see :func:`check_recorded_shape`) when first needed, so
        that a call given ``input_shape`` never looks at it."""
        return check_recorded_shape(self.recorded_input_shape, path=self.path)

    def lineage(self) -> dict[str, Any]:
        """What a checkpoint derived from this one records about it (keyword arguments of
        :func:`make_brn_checkpoint`): the architecture, and the source file's name and sha256."""
        return {
            "arch_spec": self.arch_spec,
            "arch_kwargs": dict(self.arch_kwargs or {}),
            "source_sha256": self.sha256,
            "source_name": self.path.name,
            "preprocessing": dict(self.preprocessing) or None,
            "task": dict(self.task) or None,
            "peer_schedule": dict(self.peer_schedule) or None,
        }


# ----------------------------------------------------------------------------------------------
# Architecture specs
# ----------------------------------------------------------------------------------------------


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``arch_kwargs`` JSON text into a dict."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BrnError(f"`arch_kwargs` is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise BrnError("`arch_kwargs` must be a JSON object, for example '{\"num_classes\": 10}'")
    return value


def import_callable(spec: str, *, param: str) -> Callable[..., Any]:
    """Resolve "package.module:callable" (`param` names the parameter that gave it, in error messages).

    Only for specs the user typed: a spec read from a file goes through :func:`check_recorded_arch` or
    :func:`check_recorded_data` first, which refuse anything but known builders.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BrnError(f"`{param}` {spec}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise BrnError(f"`{param}` {spec}: {module_name} has no callable {attr!r}")
    return factory


# What a checkpoint may name and brn will build without being told on the command line: architectures from
# torchvision's and timm's registries and brn's own samples, built with random weights. Anything else recorded
# in a file is code the file's author chose (``subprocess:run``, ``torch.hub:load`` of a local hubconf.py...).
SAMPLES_MODULE = "brn_cli.samples.models"
# Builder arguments that fetch or read weights (the network, a hub, a file). brn loads weights only from the
# checkpoint the user names, so these may only be unset (None / False); builders get them unset explicitly.
WEIGHT_SOURCE_KWARGS = frozenset(
    {
        "weights",
        "weights_backbone",
        "pretrained",
        "pretrained_backbone",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "checkpoint_path",
        "cache_dir",
        "model_dir",
        "hf_hub_id",
        "url",
        "file",
    }
)
WEIGHT_SOURCE_SUFFIXES = ("_path", "_file", "_url", "_dir")
PLAIN_DATA_DEPTH = 8  # nesting of lists / dicts in builder kwargs


def printable(text: object, limit: int | None = 200) -> str:
    """`text` as one printable line: control and format characters (ESC, newlines, bidi overrides) shown as
    escapes, so a string read from a file cannot recolour the terminal, move the cursor or forge a line.
    Longer than `limit`: cut, with an ellipsis."""
    chars = []
    for ch in str(text):
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            chars.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            chars.append(ch)
    line = "".join(chars)
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


def _is_plain_data(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if depth >= PLAIN_DATA_DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_plain_data(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_data(v, depth + 1) for k, v in value.items())
    return False


def _fetches_weights(key: str, value: Any) -> bool:
    """Whether builder argument `key=value` asks for weights from somewhere (unset values ask for nothing)."""
    named = key in WEIGHT_SOURCE_KWARGS or key.endswith(WEIGHT_SOURCE_SUFFIXES)
    return named and value is not None and value is not False


def check_builder_kwargs(
    spec: str, kwargs: Any, *, where: str = "`arch_kwargs`", weights: bool = True
) -> dict[str, Any]:
    """`kwargs` for the builder `spec`, checked: a dict of plain data (str, int, float, bool, None, lists and
    dicts of those) and, with `weights`, none of it asking for downloaded or file-read weights. `where` names
    the source in error messages."""
    if not isinstance(kwargs, Mapping) or not _is_plain_data(dict(kwargs)):
        raise BrnError(
            f"{where}: arguments for {printable(spec)} must be plain data (a dict of strings, numbers, booleans, "
            "null, lists and dicts of those)"
        )
    for key, value in kwargs.items():
        if weights and _fetches_weights(key, value):
            raise BrnError(
                f"{where}: {printable(key, 60)}={printable(value, 60)} for {printable(spec)} would fetch weights; "
                "brn never downloads or reads weights through a builder (the checkpoint holds them): leave it unset"
            )
    return dict(kwargs)


def _torchvision_builder(name: str) -> Callable[..., Any] | None:
    try:
        import torchvision
    except ImportError:
        return None
    if name not in torchvision.models.list_models():
        return None
    return torchvision.models.get_model_builder(name)


@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset[str]:
    try:
        import timm
    except ImportError:
        return frozenset()
    return frozenset(timm.list_models()) | frozenset(timm.list_models(pretrained=True))


def is_known_builder(spec: str) -> bool:
    """Whether brn builds `spec` from a file without asking: ``torchvision:NAME`` (a model in torchvision's
    registry), ``timm:NAME`` (in ``timm.list_models()``) or ``brn_cli.samples.models:NAME`` (a sample)."""
    if not isinstance(spec, str) or ":" not in spec:
        return False
    source, name = spec.split(":", 1)
    if source == "torchvision":
        return _torchvision_builder(name) is not None
    if source == "timm":
        return name in _timm_names()
    if source == SAMPLES_MODULE:
        from brn_cli.samples.models import ALL_ARCHS

        return name in ALL_ARCHS
    return False


def check_recorded_arch(spec: Any, kwargs: Any, *, path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """An architecture recorded in the file `path`, if brn may build it from there (see
    :func:`is_known_builder`; plain-data kwargs, no weights fetched); else BrnError asking for ``arch``."""
    if not is_known_builder(spec):
        shown = printable(spec if isinstance(spec, str) else repr(spec), 120)
        raise BrnError(
            f"{path} records arch '{shown}', which brn does not run from a file; pass `arch` to name the "
            "architecture yourself"
        )
    return spec, check_builder_kwargs(spec, {} if kwargs is None else kwargs, where=f"{path}: recorded arch")


def is_data_callable(spec: str) -> bool:
    """Whether data spec `spec` names code (``package.module:callable``) rather than an .npz file or a folder:
    the same test the data loader makes."""
    path = Path(spec)
    if path.suffix == ".npz" or path.exists():
        return False
    return ":" in spec


def check_recorded_data(spec: Any, *, path: str | os.PathLike) -> str:
    """A data spec recorded in the file `path`, if it is a path (an .npz file or a folder); a recorded
    ``package.module:callable`` is code, which brn does not run from a file: BrnError asking for ``data``."""
    if not isinstance(spec, str) or is_data_callable(spec):
        shown = printable(spec if isinstance(spec, str) else repr(spec), 120)
        raise BrnError(
            f"{path} records data '{shown}', which brn does not run from a file; pass `data` to name the data "
            "yourself"
        )
    return spec


def _build_known(spec: str, kwargs: dict[str, Any]) -> nn.Module | None:
    """Build an allow-listed spec with every weight source unset; None when `spec` is not one."""
    source, name = spec.split(":", 1)
    if source == "torchvision":
        builder = _torchvision_builder(name)
        if builder is None:
            return None
        params = inspect.signature(builder).parameters
        # Detectors and segmenters download ImageNet backbone weights unless told not to.
        unset = {p: None for p in ("weights", "weights_backbone") if p in params}
        return builder(**{**kwargs, **unset})
    if source == "timm":
        import timm

        if not timm.is_model(name):
            return None
        return timm.create_model(name, **{**kwargs, "pretrained": False})
    if source == SAMPLES_MODULE:
        from brn_cli.samples.models import ALL_ARCHS

        factory = ALL_ARCHS.get(name)
        return None if factory is None else factory(**kwargs)
    return None


def build_arch(
    spec: str, kwargs: Mapping[str, Any] | None = None, *, recorded_in: str | os.PathLike | None = None
) -> nn.Module:
    """Build a randomly initialised model from `torchvision:NAME`, `timm:NAME` or `pkg.module:callable`.

    Nothing is downloaded: torchvision gets ``weights=None`` (and ``weights_backbone=None`` where the builder
    takes it), timm ``pretrained=False``, and arguments asking for weights are refused. `recorded_in`: the
    file the spec was read from; then only known builders are built (see :func:`check_recorded_arch`).
    """
    if recorded_in is not None:
        spec, kwargs = check_recorded_arch(spec, kwargs, path=recorded_in)
    # Weight arguments of torchvision / timm / the samples download or read files; those of the user's own
    # callable (a config_path, say) are the user's business.
    kwargs = check_builder_kwargs(spec, dict(kwargs or {}), weights=is_known_builder(spec))
    if ":" not in spec:
        raise BrnError(f"`arch` {spec!r}: expected torchvision:NAME, timm:NAME or package.module:callable")
    source, name = spec.split(":", 1)
    try:
        if source == "torchvision":
            if importlib.util.find_spec("torchvision") is None:
                raise BrnError("`arch` torchvision:... needs torchvision installed")
            model = _build_known(spec, kwargs)
            if model is None:
                raise BrnError(f"`arch` {spec}: torchvision has no model named {name!r}")
        elif source == "timm":
            if importlib.util.find_spec("timm") is None:
                raise BrnError("`arch` timm:... needs timm installed")
            model = _build_known(spec, kwargs)
            if model is None:
                raise BrnError(f"`arch` {spec}: timm has no model named {name!r}")
        elif source == SAMPLES_MODULE and is_known_builder(spec):
            model = _build_known(spec, kwargs)
        else:
            model = import_callable(spec, param="arch")(**kwargs)
    except BrnError:
        raise
    except TypeError as exc:
        raise BrnError(f"`arch` {spec}: bad `arch_kwargs` ({exc})") from None
    if not isinstance(model, nn.Module):
        raise BrnError(f"`arch` {spec} returned {type(model).__name__}, not a torch.nn.Module")
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
            raise BrnError(f"{path}: not a PyTorch checkpoint ({printable(first_line(exc))})") from None
        unsafe = _unsafe_globals(path, exc)
        if not trust_pickle and not unsafe:
            # The weights-only unpickler choked on something other than an import: random bytes or a
            # damaged stream, not a checkpoint that holds Python objects.
            if _ends_early(exc):
                raise BrnError(f"{path}: not a readable PyTorch checkpoint: {TRUNCATED}") from None
            detail = str(exc).rsplit("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            reason = detail[0][:200] if detail and "WeightsUnpickler" in str(exc) else first_line(exc)
            raise BrnError(f"{path}: not a PyTorch checkpoint ({printable(reason)})") from None
        if not trust_pickle:
            shown = ", ".join(printable(name, 80) for name in unsafe[:5]) + (
                " ..." if len(unsafe) > 5 else ""
            )
            raise BrnError(
                f"{path} contains pickled Python objects (it would import {shown}); loading it can run "
                "arbitrary code. Re-run with `trust_pickle=True` only if you trust its source"
            ) from None
        try:
            return "torch", torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # the pickle itself failed: missing class, broken stream...
            if _ends_early(exc):
                raise BrnError(f"{path}: could not unpickle: {TRUNCATED}") from None
            raise BrnError(
                f"{path}: could not unpickle ({type(exc).__name__}: {printable(first_line(exc))})"
            ) from None
    except Exception as exc:  # the weights-only loader runs no code: any failure is the file's
        if (_is_zip(path) and _zip_is_damaged(path)) or _ends_early(exc):
            raise BrnError(f"{path}: not a readable PyTorch checkpoint: {TRUNCATED}") from None
        raise BrnError(f"{path}: not a readable PyTorch checkpoint ({printable(first_line(exc))})") from None


TRUNCATED = "the file is truncated or damaged (an interrupted copy or save?); copy or save it again"


def _ends_early(exc: BaseException) -> bool:
    """Whether a load failed because the stream ended before the pickle did."""
    seen: BaseException | None = exc
    while seen is not None:
        if (
            isinstance(seen, EOFError)
            or "Ran out of input" in str(seen)
            or "pickle data was truncated" in str(seen)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _zip_is_damaged(path: Path) -> bool:
    """Whether a zip-format checkpoint's archive is unreadable (torch's own message here is a miniz internal
    error or a bare errno); checks every record's CRC, so only called once loading has failed."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is not None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return True


def _unsafe_globals(path: Path, exc: BaseException) -> list[str]:
    """What a pickle would import, read without running it: torch's own scan for the zip format, a static
    scan of the opcodes for torch's legacy (non-zip) format, else torch's error text."""
    names: list[str] = []
    try:
        if _is_zip(path):
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        else:
            names = _legacy_unsafe_globals(path)
    except Exception:
        names = []
    found = re.findall(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
    return names or list(dict.fromkeys(found))


LEGACY_PICKLES = 4  # torch's legacy format: magic number, protocol version, sys info, then the object
PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 names, as unpickling maps them


def _legacy_unsafe_globals(path: Path) -> list[str]:
    """The imports of a legacy-format torch file that weights-only loading refuses, found by reading the
    pickle opcodes (pickletools never executes them)."""
    import pickletools

    allowed = _weights_only_allowed_globals()
    found: list[str] = []
    with open(path, "rb") as fh, contextlib.suppress(Exception):  # a damaged stream: what was read so far
        for _ in range(LEGACY_PICKLES):
            strings: list[str] = []
            for opcode, arg, _pos in pickletools.genops(fh):
                if opcode.name == "GLOBAL" and isinstance(arg, str):
                    module, _, name = arg.partition(" ")
                    found.append(f"{PY2_MODULES.get(module, module)}.{name}")
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and "UNICODE" in opcode.name:
                    strings.append(arg)
    return [name for name in dict.fromkeys(found) if name not in allowed]


def _weights_only_allowed_globals() -> set[str]:
    """The globals torch's weights-only unpickler accepts (its allow-list is not public API: if it moves,
    every global is reported, which errs on the side of naming too much)."""
    try:
        from torch import _weights_only_unpickler as unpickler

        allowed = set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except Exception:
        allowed = set()
    return allowed


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _keys_text(obj: Mapping, limit: int = 10) -> str:
    keys = [printable(k, 60) for k in list(obj)[:limit]]
    return ", ".join(keys) + (", ..." if len(obj) > limit else "") if keys else "none"


def find_state_dict(
    obj: Any, key: str | None = None, *, source: str | os.PathLike = "file"
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Locate the state_dict inside a loaded object: top level, or under one of NESTED_STATE_KEYS.
    `source` (the file) starts every error message."""
    if not isinstance(obj, Mapping):
        raise BrnError(f"{source} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    if key is not None:
        if key not in obj or not _is_tensor_dict(obj[key]):
            raise BrnError(
                f"{source}: no state_dict under key {printable(key)!r} (top-level keys: {_keys_text(obj)})"
            )
        return dict(obj[key]), key
    if _is_tensor_dict(obj):
        return dict(obj), None
    for candidate in NESTED_STATE_KEYS:
        if candidate in obj and _is_tensor_dict(obj[candidate]):
            return dict(obj[candidate]), candidate
    raise BrnError(
        f"{source}: no state_dict found (top-level keys: {_keys_text(obj)}); pass `key` to name it"
    )


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
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str,
    source: str | os.PathLike | None = None,
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
                shown = ", ".join(printable(n, 120) for n in names[:6])
                shown += f", ... ({len(names) - 6} more)" if len(names) > 6 else ""
                parts.append(f"{len(names)} {label}: {shown}")
        where = f"{source}: weights" if source is not None else "weights"
        raise BrnError(f"{where} do not match {what}: " + "; ".join(parts))
    return state


def load_state_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str,
    source: str | os.PathLike | None = None,
) -> nn.Module:
    state = match_state_dict(model, state_dict, what=what, source=source)
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
            model = load_state_into(build_arch(arch, arch_kwargs), obj.state_dict(), what=f"`arch` {arch}")
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

    state, nested = find_state_dict(obj, state_key, source=path)
    top_keys = [str(k) for k in obj] if isinstance(obj, Mapping) else []
    if arch is None:
        raise BrnError(
            f"{path.name} is a plain {'safetensors' if kind == 'safetensors' else 'state_dict'} file: "
            "pass `arch` (torchvision:NAME, timm:NAME or package.module:callable) to say which model it holds"
        )
    what = f"`arch` {arch}"
    check_shapes_before_building(arch, arch_kwargs, state, what=what, source=path)
    model = load_state_into(build_arch(arch, arch_kwargs), state, what=what, source=path)
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


# A recorded sample input is allocated (random inputs for tracing, checks and exports): 2**28 float32 elements
# are 1 GiB, far beyond any real sample batch (2 x 3 x 224 x 224 is 301,056), so a larger record is damage or
# an attempt to exhaust memory.
MAX_RECORDED_INPUT_ELEMENTS = 2**28
MAX_RECORDED_INPUT_DIMS = 8


def check_recorded_shape(shape: Any, *, path: str | os.PathLike) -> list[int] | None:
    """A sample input shape recorded in `path`: None, or 2 to 8 positive integers with at most
    MAX_RECORDED_INPUT_ELEMENTS elements in all; anything else is refused before it is allocated."""
    if shape is None:
        return None
    hint = "pass `input_shape` to give one"
    valid = (
        isinstance(shape, (list, tuple))
        and 2 <= len(shape) <= MAX_RECORDED_INPUT_DIMS
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    )
    if not valid:
        shown = printable(repr(shape), 80)
        raise BrnError(
            f"{path} records input shape {shown}, not a list of 2 to {MAX_RECORDED_INPUT_DIMS} positive "
            f"integers; {hint}"
        )
    elements = math.prod(shape)
    if elements > MAX_RECORDED_INPUT_ELEMENTS:
        raise BrnError(
            f"{path} records input shape {list(shape)} ({elements:.3g} elements); brn allocates a recorded "
            f"shape only up to 2**28 elements (1 GiB of float32, far more than a sample input needs); {hint}"
        )
    return [int(d) for d in shape]


def check_shapes_before_building(
    spec: str, kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor], *, what: str, source: Path
) -> None:
    """For a known builder: build it on the meta device (no memory) and match `state` against it, so that
    arguments asking for a huge model (a recorded ``num_classes`` of 10**9) fail before anything is
    allocated. Builders that cannot run on the meta device are checked after the real build instead."""
    if not is_known_builder(spec):
        return  # the user's own code: run once, as asked
    try:
        kwargs = check_builder_kwargs(spec, dict(kwargs))
        with torch.device("meta"):
            skeleton = _build_known(spec, kwargs)
    except BrnError:
        raise
    except Exception:  # e.g. a builder that reads a value out of a tensor while it builds
        return
    if skeleton is not None:
        match_state_dict(skeleton, state, what=what, source=source)


def _damaged(path: Path, what: str) -> BrnError:
    return BrnError(f"{path}: damaged brn checkpoint: {what}")


def _recorded_arch(path: Path, obj: Mapping) -> tuple[Any, dict[str, Any] | None]:
    """(spec, kwargs) as the brn checkpoint records them (either may be None); the entry's layout checked."""
    info = obj.get("arch")
    if info is None:
        return None, None
    if not isinstance(info, Mapping):
        raise _damaged(path, f"'arch' should be {{spec, kwargs}}, found a {type(info).__name__}")
    kwargs = info.get("kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise BrnError(
            f"{path}: recorded arch: arguments must be plain data (a dict), found a {type(kwargs).__name__}"
        )
    return info.get("spec"), None if kwargs is None else dict(kwargs)


def _recorded_mapping(path: Path, obj: Mapping, key: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _damaged(path, f"{key!r} should be a dict, found a {type(value).__name__}")
    return dict(value)


def _recorded_peer_schedule(path: Path, obj: Mapping) -> dict[str, Any]:
    """The recorded torchrl / sb3-contrib warm-up positions, checked (every position must read back)."""
    from brn_cli.nn.peers import recorded_peer_schedule

    record = _recorded_mapping(path, obj, "peer_schedule")
    if record:
        entries = record.get("positions")
        try:
            for entry in entries if isinstance(entries, list) and entries else [None]:
                recorded_peer_schedule({"positions": [entry]})
        except BrnError as exc:
            raise _damaged(path, f"'peer_schedule': {exc}") from None
    return record


def _load_brn(path: Path, obj: Mapping, digest: str, arch: str | None, arch_kwargs: dict) -> LoadedCheckpoint:
    """Rebuild a brn checkpoint. A recorded architecture is built only when it is a known builder (see
    :func:`check_recorded_arch`); `arch` from the command line replaces it (with the recorded kwargs when it
    names the same spec and `arch_kwargs` is empty)."""
    from brn_cli.nn.convert import apply_renorm_layout

    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BrnError(
            f"{path}: brn checkpoint format version {printable(repr(version), 40)} is newer than this brn "
            "understands"
        )
    state = obj.get("state_dict")
    if not _is_tensor_dict(state):
        raise _damaged(path, f"its 'state_dict' is {'missing' if state is None else 'not a dict of tensors'}")
    layers = _recorded_mapping(path, obj, "renorm_layers")
    if not all(isinstance(k, str) and isinstance(v, Mapping) for k, v in layers.items()):
        raise _damaged(path, "'renorm_layers' should map layer names to their settings")
    recorded_spec, recorded_kwargs = _recorded_arch(path, obj)
    if arch is not None:  # named by the user; the recorded kwargs go with the same spec
        spec = arch
        kwargs = arch_kwargs
        if not arch_kwargs and recorded_kwargs and arch == recorded_spec:
            kwargs = check_builder_kwargs(spec, recorded_kwargs, where=f"{path}: recorded arch")
    else:
        if recorded_spec is None:
            raise BrnError(f"{path}: this brn checkpoint records no architecture; pass `arch`")
        spec, kwargs = check_recorded_arch(recorded_spec, arch_kwargs or recorded_kwargs, path=path)
    what = (
        f"the architecture {'given' if arch is not None else 'recorded'} for {path.name} ({printable(spec)})"
    )
    check_shapes_before_building(spec, kwargs, state, what=what, source=path)
    model = build_arch(spec, kwargs)
    try:
        apply_renorm_layout(model, layers)
    except BrnError as exc:
        raise BrnError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(
            path, f"a 'renorm_layers' entry is incomplete ({type(exc).__name__}: {printable(exc)})"
        ) from None
    load_state_into(model, state, what=what, source=path)
    return LoadedCheckpoint(
        model=model,
        path=path,
        file_format="brn",
        top_level_keys=[str(k) for k in obj],
        arch_spec=spec,
        arch_kwargs=kwargs,
        recorded_input_shape=obj.get("input_shape"),
        renorm_layers=layers,
        provenance=_recorded_mapping(path, obj, "provenance"),
        training=obj.get("training"),
        preprocessing=_recorded_mapping(path, obj, "preprocessing"),
        task=_recorded_mapping(path, obj, "task"),
        peer_schedule=_recorded_peer_schedule(path, obj),
        sha256=digest,
    )


# ----------------------------------------------------------------------------------------------
# Writing brn checkpoints
# ----------------------------------------------------------------------------------------------


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
    task: dict[str, Any] | None = None,
    peer_schedule: dict[str, Any] | None = None,
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
    if task:
        ckpt["task"] = dict(task)
    if peer_schedule:
        ckpt["peer_schedule"] = copy.deepcopy(dict(peer_schedule))
    return ckpt


def save_checkpoint_dict(ckpt: Mapping[str, Any], path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a checkpoint dict atomically with torch.save."""
    with atomic_path(path, force=force) as tmp, reporting_write_errors(path):
        torch.save(dict(ckpt), tmp)
    return Path(path)


# Free space below this after a failed write means the disk filled up (torch reports only "unexpected pos").
NEARLY_FULL_BYTES = 1 << 20
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or the file-size limit (ulimit -f)",
}


@contextlib.contextmanager
def reporting_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write of `path` (torch.save's "unexpected pos ...", safetensors' "I/O error", an OSError)
    into one line: ``cannot write PATH: no space left on device`` and the like."""
    try:
        yield
    except BrnError:
        raise
    except Exception as exc:
        if not _is_write_failure(exc):
            raise
        raise BrnError(f"cannot write {path}: {_write_failure_reason(Path(path), exc)}") from None


def _is_write_failure(exc: BaseException) -> bool:
    text = str(exc)
    if isinstance(exc, OSError):
        return True
    if isinstance(
        exc, RuntimeError
    ):  # torch's zip writer: "[enforce fail at inline_container.cc] unexpected pos"
        return "unexpected pos" in text or "file write failed" in text or "PytorchStreamWriter" in text
    return "I/O error" in text or "os error" in text  # safetensors (a Rust error type)


def _write_failure_reason(path: Path, exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if code is None:  # safetensors: "... (os error 28)"
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code in WRITE_ERRNOS:
        return WRITE_ERRNOS[code]
    try:
        free = shutil.disk_usage(path.parent if str(path.parent) else ".").free
    except OSError:
        free = None
    if free is not None and free < NEARLY_FULL_BYTES:
        return WRITE_ERRNOS[errno.ENOSPC]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return "the write stopped part-way (disk full, quota or file-size limit?)"


def save_brn_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, force: bool = False, **meta: Any
) -> Path:
    """Build (see :func:`make_brn_checkpoint`) and write a brn checkpoint atomically."""
    return save_checkpoint_dict(make_brn_checkpoint(model, **meta), path, force=force)
