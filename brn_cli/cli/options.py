"""Options shared by several commands, and small helpers for printing results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from brn_cli.cli.app import err
from brn_cli.errors import BrnError

if TYPE_CHECKING:  # pragma: no cover
    from brn_cli.storage.checkpoint import LoadedCheckpoint


CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint: brn checkpoint, state_dict (.pt/.pth/.bin), "
        ".safetensors, or a pickled module (with --trust-pickle)."
    ),
]


ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Architecture for plain state_dicts: torchvision:NAME, timm:NAME or package.module:callable.",
    ),
]


ArchKwargsOpt = Annotated[
    str | None,
    typer.Option("--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'."),
]


TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow loading pickled Python objects (can run arbitrary code: only for files you trust).",
    ),
]


KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="Top-level key holding the state_dict, when the "
        "default search (state_dict, model_state_dict, model, "
        "state_dict_ema) picks the wrong one.",
    ),
]


InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="Sample input shape, e.g. 2,3,224,224 (default: recorded in the checkpoint or inferred).",
    ),
]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]


def parse_shape(text: str | None) -> list[int] | None:
    """'2,3,224,224' or '2x3x224x224' -> [2, 3, 224, 224]."""
    if text is None:
        return None
    parts = text.replace("x", ",").replace(" ", "").strip(",").split(",")
    try:
        shape = [int(p) for p in parts if p]
    except ValueError:
        raise BrnError(f"--input-shape {text!r}: expected integers like 2,3,224,224") from None
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise BrnError(f"--input-shape {text!r}: need at least (batch, features), all positive")
    return shape


def load(
    checkpoint: Path, arch: str | None, arch_kwargs: str | None, trust_pickle: bool, key: str | None = None
) -> LoadedCheckpoint:
    from brn_cli.storage.checkpoint import load_checkpoint, parse_arch_kwargs

    return load_checkpoint(
        checkpoint,
        arch=arch,
        arch_kwargs=parse_arch_kwargs(arch_kwargs),
        trust_pickle=trust_pickle,
        state_key=key,
    )


def checkpoint_preprocessing(
    ckpt: LoadedCheckpoint,
    data: str,
    normalize: str | None,
    image_size: int | None = None,
    resize_size: int | None = None,
) -> dict[str, Any]:
    """load_data's preprocessing options: those given, else those the checkpoint was fine-tuned with (said on
    stderr; a model scores at chance on inputs prepared differently)."""
    from brn_cli.data.datasets import is_image_folder
    from brn_cli.data.specs import resolve_normalize

    recorded = ckpt.preprocessing
    chosen = resolve_normalize(normalize, recorded.get("normalize"))
    if normalize is None and chosen is not None:
        err.print(
            f"note: inputs normalized with {chosen}, as recorded in {ckpt.path.name} (--normalize to change)"
        )
    if image_size is None and recorded.get("image_size") and is_image_folder(data):
        image_size = int(recorded["image_size"])
        resize_size = resize_size if resize_size is not None else recorded.get("resize_size")
        err.print(
            f"note: images resized to {resize_size} and center-cropped to {image_size}, as recorded in "
            f"{ckpt.path.name} (--image-size to change)"
        )
    return {"normalize": chosen, "image_size": image_size, "resize_size": resize_size}


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


# ----------------------------------------------------------------------------------------------
# schedule / evaluate / calibrate (data, schedule, evaluate, calibrate modules)
# ----------------------------------------------------------------------------------------------
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Data: .npz (x_train, y_train[, x_val, y_val]), a folder with train/ and val/, "
        "or package.module:callable returning (train, val).",
    ),
]


ValSplitOpt = Annotated[
    float | None,
    typer.Option("--val-split", help="Hold out this fraction of train when there is no val set."),
]


NormalizeOpt = Annotated[
    str | None,
    typer.Option(
        "--normalize",
        help="MEAN,STD (or M1,M2,M3,S1,S2,S3) applied after /255; 'none' for none. evaluate and calibrate "
        "default to the normalization recorded in a fine-tuned checkpoint.",
    ),
]


ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        help="ImageFolder data: center-crop S x S after resizing the shorter side to --resize-size. evaluate "
        "and calibrate default to the size recorded in a fine-tuned checkpoint.",
    ),
]


ResizeSizeOpt = Annotated[
    int | None,
    typer.Option("--resize-size", help="Shorter side before the --image-size crop (default S / 0.875)."),
]


DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]


SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the batch order and of --val-split.")]


ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", help="torch threads (default 1: fastest on a busy CPU; at most the cores)."),
]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
