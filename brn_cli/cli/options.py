"""Options shared by several commands, and small helpers for printing results."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from brn_cli.cli.app import out
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
    compact = text.replace(" ", "").strip(",")
    if not re.fullmatch(r"\d+([x,]\d+)*", compact):
        raise BrnError(f"--input-shape {text!r}: expected integers like 2,3,224,224")
    shape = [int(p) for p in re.split(r"[x,]", compact)]
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


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def print_wrote_checkpoint(output: Path, arch_spec: str | None) -> None:
    """The last lines of a command that wrote a brn checkpoint: where, how big, and whether it needs --arch."""
    if arch_spec is None:
        out.print("[yellow]note: no --arch given, so later commands on this file need --arch[/yellow]")
    out.print(f"wrote {output} ({human_size(Path(output).stat().st_size)})")


def human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


# ----------------------------------------------------------------------------------------------
# Data, device and seed: the commands that run a model on data
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
