"""The cells of `brn reproduce`: batch compositions, learning-rate regimes, alpha, architectures, lengths.

A full factorial (6 compositions x 3 lr regimes x 2 alphas x 3 architectures x 3 lengths x 3 seeds x 3
methods) is about 9,700 runs, far beyond an hour on 2 cores. The grid is a **main slice** crossed in full
plus **one-axis-at-a-time variations** around it:

* main slice: the plain 3-convolution BatchNorm CNN, alpha 0.01, 800 steps, every batch composition
  (6) x every learning-rate regime (3): where renorm helps, and whether annealing hides the difference;
* alpha 0.1 (moving averages that remember ~10 steps instead of ~100), constant rate, on four compositions;
* the small ResNet on three compositions and the separable CNN on one, constant rate;
* 400 and 1,600 steps, constant rate, on the non-i.i.d. composition of the main slice's centre.

Each variation changes one axis of a main-slice cell, so every variation cell has its reference in the
main slice. The centre is ``grouped-16`` (2 labels x 16 examples) with a constant rate: the setting in
which renorm beat batchnorm by 27 points in the issue that asked for this grid.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ARCHS",
    "COMPOSITIONS",
    "LR_REGIMES",
    "Cell",
    "Composition",
    "full_grid",
    "quick_grid",
]

# Architectures in the grid: sample models (brn_cli.samples.models), each with BatchNorm2d after every conv.
ARCHS = ("plain_cnn", "small_resnet", "separable_cnn")
LR_REGIMES = ("constant", "step", "cosine")  # FinetuneConfig.lr_schedule values


@dataclass(frozen=True)
class Composition:
    """How the training batches are made, and what the paper measured for it (Inception-v3, ImageNet,
    top-1 %; None where the paper has no such run)."""

    name: str
    batch_size: int
    sampler: str
    microbatch: int | None
    description: str
    paper: str
    paper_bn: float | None = None
    paper_brn: float | None = None
    paper_bn_batch_stats: float | None = None  # the paper's "training mode" evaluation

    @property
    def group(self) -> int:
        """How many examples share normalization statistics in training."""
        return self.microbatch or self.batch_size


COMPOSITIONS: dict[str, Composition] = {
    c.name: c
    for c in (
        Composition(
            "iid-32", 32, "iid", None, "i.i.d. batches of 32", "BN 78.3%, BRN 78.5% (130k)", 78.3, 78.5
        ),
        Composition(
            "micro-4",
            32,
            "iid",
            4,
            "batch 32, normalized in microbatches of 4",
            "BN 74.2% @210k, BRN 76.5% @130k",
            74.2,
            76.5,
        ),
        Composition("micro-2", 32, "iid", 2, "batch 32, normalized in microbatches of 2", "not in the paper"),
        Composition(
            "grouped-16", 32, "grouped:16", None, "batch 32 = 2 labels x 16 examples", "not in the paper"
        ),
        Composition(
            "grouped-2",
            16,
            "grouped:2",
            None,
            "batch 16 = 8 labels x 2 examples",
            "BN 67%, BN batch statistics 76.5%, BRN 78.5% @120k (16 labels x 2)",
            67.0,
            78.5,
            76.5,
        ),
        Composition(
            "grouped-32", 32, "grouped:32", None, "batch 32 = 1 label x 32 examples", "not in the paper"
        ),
    )
}


@dataclass(frozen=True)
class Cell:
    """One setting of the grid; each runs batchnorm, renorm and groupnorm over the seeds."""

    arch: str
    composition: str
    lr_schedule: str
    alpha: float
    steps: int
    group: str = "main"  # which part of the design the cell belongs to (main, alpha, arch, steps, quick)

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.composition}.{self.lr_schedule}.a{self.alpha:g}.s{self.steps}"

    @property
    def batches(self) -> Composition:
        return COMPOSITIONS[self.composition]

    def groupnorm_key(self) -> str:
        """The GroupNorm run this cell shares: GroupNorm has no moving averages (alpha) and normalizes each
        example alone (microbatches), so cells that differ only there train the same GroupNorm model."""
        b = self.batches
        return f"{self.arch}.b{b.batch_size}-{b.sampler.replace(':', '')}.{self.lr_schedule}.s{self.steps}"


CENTRE = ("grouped-16", "constant")


def full_grid() -> list[Cell]:
    """The main slice and the one-axis variations (see the module docstring), main slice first."""
    cells = [Cell("plain_cnn", c, lr, 0.01, 800) for c in COMPOSITIONS for lr in LR_REGIMES]
    cells += [
        Cell("plain_cnn", c, "constant", 0.1, 800, "alpha")
        for c in ("iid-32", "micro-2", "grouped-16", "grouped-32")
    ]
    cells += [
        Cell("small_resnet", c, "constant", 0.01, 800, "arch") for c in ("iid-32", "grouped-16", "grouped-32")
    ]
    cells += [Cell("separable_cnn", CENTRE[0], CENTRE[1], 0.01, 800, "arch")]
    cells += [Cell("plain_cnn", CENTRE[0], CENTRE[1], 0.01, s, "steps") for s in (400, 1600)]
    return cells


QUICK_STEPS = 12


def quick_grid() -> list[Cell]:
    """A handful of cells of very few steps: the whole flow (every method, baseline and figure) in seconds.
    The first two share their GroupNorm runs (microbatches do not reach GroupNorm)."""
    return [
        Cell("plain_cnn", "iid-32", "constant", 0.01, QUICK_STEPS, "quick"),
        Cell("plain_cnn", "micro-2", "constant", 0.01, QUICK_STEPS, "quick"),
        Cell("plain_cnn", "grouped-2", "step", 0.1, QUICK_STEPS, "quick"),
    ]
