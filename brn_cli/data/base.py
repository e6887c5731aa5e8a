"""The data types every loader shares: in-memory arrays, the DataBundle the commands consume, the image
reader, and the helpers that read .npz arrays and turn them into float images (classification's loaders in
:mod:`brn_cli.data.datasets`, segmentation's in :mod:`brn_cli.data.segmentation`)."""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from brn_cli.data.specs import _check_channels
from brn_cli.errors import BrnError, first_line

__all__ = ["ArrayDataset", "DataBundle", "DataFileError", "ImageReader"]


class ArrayDataset(Dataset):
    """In-memory (x, y) pairs: x float32 [N, ...], y int64 [N]. Items are (x[i], int(y[i]))."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if len(x) != len(y):
            raise BrnError(f"x has {len(x)} examples but y has {len(y)}")
        self.x = x
        self.y = y
        self.targets = y  # as torchvision datasets: lets dataset_labels() skip a pass over the data

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.x[index], int(self.y[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        # DataLoader's batched fetch: one gather instead of len(indices) indexing calls.
        idx = torch.as_tensor(indices, dtype=torch.long)
        xs, ys = self.x.index_select(0, idx), self.y.index_select(0, idx).tolist()
        return list(zip(xs, ys, strict=True))


class _ArrayBatches(Dataset):
    """ArrayDataset indexed by a whole list of indices: one gather per batch, no per-example collate."""

    def __init__(self, base: ArrayDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        # index_select, not x[idx]: advanced indexing is ~1000x slower on a loaded multi-threaded CPU.
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.base.x.index_select(0, idx), self.base.y.index_select(0, idx)


class _Subset(Dataset):
    """Subset that keeps `targets` (torch's Subset does not)."""

    def __init__(self, base: Dataset, indices: Tensor, labels: Tensor) -> None:
        self.base = base
        self.indices = indices.tolist()
        self.targets = labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]


@dataclass
class DataBundle:
    """Training and validation data with their labels, as the commands consume them."""

    train: Dataset  # items: (x: float32 tensor, y: int)
    val: Dataset | None
    train_labels: Tensor  # int64 [len(train)]
    val_labels: Tensor | None
    num_classes: int
    sample_shape: tuple[int, ...]  # shape of one x, e.g. (1, 28, 28) or (64,)
    description: str  # one line for logs
    source: str = ""  # the data spec as given, for error messages
    images: ImageReader | None = None  # image folders: decodes the files; its channels can follow the model
    # "classification" and "embedding": targets are class indices; "segmentation": int64 masks [H, W] whose
    # pixels equal to ignore_index count for nothing, and the labels above are each mask's dominant class.
    task: str = "classification"
    ignore_index: int | None = None


def _to_float_images(x: np.ndarray, what: str) -> Tensor:
    """Integer pixels in 0..255 -> /255 float32; float -> float32; NHWC -> NCHW; N x H x W -> N x 1 x H x W."""
    if x.dtype.kind in "iu":
        # 8-bit pixels whatever the dtype (arrays often come out of numpy as int64); any other integer range
        # has no divisor that is right for every file (12-bit images in uint16 are not /65535), so it is refused.
        if x.size:
            low, high = int(x.min()), int(x.max())
            if low < 0 or high > 255:
                raise BrnError(
                    f"{what} has {x.dtype} values {low}..{high}; integer pixels are read as 8-bit values "
                    "0..255 (divided by 255): save other ranges as float32, scaled as the model expects"
                )
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)).to(torch.float32).div_(255.0)
    elif x.dtype.kind == "f":
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if not bool(torch.isfinite(t).all()):
            raise BrnError(f"{what} contains NaN or infinite values")
    else:
        raise BrnError(f"{what}: unsupported dtype {x.dtype} (expected integer pixels 0..255 or float)")
    if t.dim() < 2:
        raise BrnError(f"{what}: expected N x features or N x C x H x W, got shape {list(x.shape)}")
    if t.dim() == 3:  # N x H x W grayscale
        t = t.unsqueeze(1)
    elif t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


def _normalize_tensor(x: Tensor, norm: tuple[Tensor, Tensor] | None, what: str) -> Tensor:
    if norm is None:
        return x
    mean, std = norm
    channels = x.shape[1]
    if mean.numel() not in (1, channels):
        raise BrnError(f"`normalize` gives {mean.numel()} channel values but {what} has {channels} channels")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.view(shape)) / std.view(shape)


def _stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, val): about `fraction` of each class to val, seeded."""
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = int(round(len(idx) * fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def _held_out(
    source: str, has_val: bool, labels: Tensor, val_split: float | None, seed: int
) -> tuple[Tensor, Tensor] | None:
    """(train, val) indices of the seeded, stratified `val_split` of a training set's `labels`; None without
    `val_split`. A validation set of its own as well, or a split that empties a side, is one line."""
    if val_split is None:
        return None
    if has_val:
        raise BrnError(f"{source} has a validation set already; drop `val_split`")
    tr, va = _stratified_split(labels, val_split, seed)
    if len(tr) == 0 or len(va) == 0:
        raise BrnError(f"`val_split` {val_split} leaves an empty train or validation set")
    return tr, va


def _open_npz(path: Path) -> Any:
    """np.load without pickles, every way a file can fail to be an .npz archive as one BrnError."""
    try:
        arrays = np.load(path, allow_pickle=False)
    except EOFError:  # numpy's word for a file with no bytes
        raise BrnError(f"{path}: empty file, not an .npz archive") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # neither a zip nor a .npy header: numpy would try to unpickle it
            raise BrnError(f"{path}: not an .npz archive (numpy.savez writes one)") from None
        raise BrnError(f"{path}: not an .npz archive ({first_line(exc, 200)})") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise BrnError(f"{path}: not an .npz archive ({first_line(exc, 200)})") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise BrnError(f"{path}: a single array (.npy), not an .npz archive of x_train and y_train")
    return arrays


def _read_npz_array(arrays: Any, name: str, path: Path) -> np.ndarray:
    try:
        return arrays[name]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise BrnError(
                f"{path}: {name} is an object array; data is never unpickled: save numeric arrays"
            ) from None
        raise BrnError(f"{path}: cannot read {name} ({first_line(exc, 200)})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise BrnError(f"{path}: cannot read {name} ({first_line(exc, 200)})") from None


def _read_npz_pairs(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz of examples and targets: x_train and y_train, and x_val with y_val when there;
    a missing one (or an x_val without its y_val) is one line naming the file."""
    with _open_npz(path) as arrays:
        names = set(arrays.files)
        missing = [k for k in ("x_train", "y_train") if k not in names]
        if missing:
            raise BrnError(
                f"{path} has no {' or '.join(missing)} (arrays: {', '.join(sorted(names)) or 'none'})"
            )
        if ("x_val" in names) != ("y_val" in names):
            raise BrnError(f"{path}: x_val and y_val must come together")
        keys = ("x_train", "y_train", "x_val", "y_val")
        return {k: _read_npz_array(arrays, k, path) for k in keys if k in names}


class DataFileError(BrnError):
    """A data file that cannot be read, raised while loading examples (possibly in a DataLoader worker).

    DataLoader re-raises a worker's exception as ``type(exc)(message)`` with the worker's whole traceback
    as the message; this keeps the original one line instead, so the report stays one line naming the file.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class ImageReader:
    """Decodes one image file as grayscale (1 channel) or RGB (3): torchvision ImageFolder's loader, with a
    channel count and errors that name the file. ``given`` says whether the channels were chosen by the user
    (else :func:`fit_data_to_model` may set them from the model)."""

    def __init__(self, channels: int | None) -> None:
        _check_channels(channels)
        self.given = channels is not None
        self.channels = channels if channels is not None else 3
        self.normalize: tuple[Tensor, Tensor] | None = None  # the --normalize in the folder's transform

    def __call__(self, path: str) -> Any:
        from PIL import Image

        try:
            with open(path, "rb") as fh:
                return Image.open(fh).convert("L" if self.channels == 1 else "RGB")  # convert() decodes
        except Exception as exc:  # a decoder can fail in many ways (OSError, SyntaxError, ValueError, ...)
            raise DataFileError(
                f"{path}: cannot read this image ({type(exc).__name__}: {first_line(exc, 150)})"
            ) from None


def _check_normalize_channels(norm, channels: int, why: str = "") -> None:
    if norm is not None and norm[0].numel() not in (1, channels):
        raise BrnError(
            f"`normalize` gives {norm[0].numel()} channel values but the images have {channels}{why}"
        )
