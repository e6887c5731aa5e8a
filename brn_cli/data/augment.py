"""Training-set augmentation, seeded per (seed, epoch, index) so resume and workers leave it unchanged."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset

from brn_cli.errors import BrnError

__all__ = [
    "AUGMENTATIONS",
    "AugmentedDataset",
    "augment_image",
    "crop_box",
    "parse_augment",
]


AUGMENTATIONS = ("none", "flip", "crop-flip")


# Area fraction of a random crop. torchvision's default lower bound (0.08) is meant for training from scratch;
# fine-tuning an already trained model uses milder crops.
CROP_SCALE = (0.25, 1.0)


CROP_RATIO = (3 / 4, 4 / 3)


def parse_augment(text: str) -> str:
    mode = text.strip().lower()
    if mode not in AUGMENTATIONS:
        raise BrnError(f"`augment` {text!r}: expected one of {', '.join(AUGMENTATIONS)}")
    return mode


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one example of one epoch (splitmix64 finaliser over the three numbers)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) >> 1


def crop_box(h: int, w: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of torchvision's RandomResizedCrop box drawn from `generator`: CROP_SCALE x
    the area with an aspect ratio log-uniform in CROP_RATIO (10 tries, else the whole image)."""

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    for _ in range(10):
        area = h * w * uniform(*CROP_SCALE)
        aspect = math.exp(uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cand_w, cand_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cand_w <= w and 0 < cand_h <= h:
            top = int(torch.randint(0, h - cand_h + 1, (), generator=generator))
            left = int(torch.randint(0, w - cand_w + 1, (), generator=generator))
            return top, left, cand_h, cand_w
    return 0, 0, h, w


def random_resized_crop(x: Tensor, generator: torch.Generator) -> Tensor:
    """torchvision's RandomResizedCrop drawn from `generator` (:func:`crop_box`), resized back to x's H x W
    (bilinear, antialiased). `x` is [C, H, W]."""
    _, h, w = x.shape
    top, left, ch, cw = crop_box(h, w, generator)
    crop = x[:, top : top + ch, left : left + cw]
    if (ch, cw) == (h, w):
        return crop
    out = torch.nn.functional.interpolate(
        crop[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True
    )[0]
    return out.to(x.dtype)


def augment_image(x: Tensor, mode: str, generator: torch.Generator) -> Tensor:
    """One example [C, H, W] through `mode` ("none", "flip", "crop-flip"), drawing from `generator`."""
    if mode == "crop-flip":
        x = random_resized_crop(x, generator)
    if mode in ("flip", "crop-flip") and float(torch.rand((), generator=generator)) < 0.5:
        x = x.flip(-1)
    return x


class AugmentedDataset(Dataset):
    """Training examples randomly augmented, a pure function of (seed, epoch, example index).

    torchvision's random transforms draw from the global RNG, which DataLoader workers re-seed and which a
    resumed run has advanced differently; a generator per example keeps augmentation exact across both.
    Call :meth:`set_epoch` before building each epoch's loader. Flips and bilinear crops commute with the
    per-channel ``normalize``, so applying them to normalized tensors is the same as before normalizing.
    """

    def __init__(self, base: Dataset, mode: str, seed: int, labels: Tensor) -> None:
        self.base, self.mode, self.seed, self.epoch = base, parse_augment(mode), int(seed), 0
        self.targets = labels  # dataset_labels() reads these instead of loading every example

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, y = self.base[index]
        x = torch.as_tensor(x)
        if x.dim() != 3:
            raise BrnError(f"`augment` needs image examples [C, H, W]; this data has shape {list(x.shape)}")
        generator = torch.Generator().manual_seed(example_seed(self.seed, self.epoch, int(index)))
        return augment_image(x, self.mode, generator), int(y)
