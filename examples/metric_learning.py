"""Metric learning with P x K batches: Batch Renorm where every batch is a few classes, K examples each.

Triplet losses need several examples of each class in a batch, so batches hold P classes x K examples:
far from i.i.d., which is the case Batch Renorm was made for (the paper's section 4.3). This script

- builds an embedding network with ordinary BatchNorm and converts it (`convert_batchnorm`),
- draws P x K batches with `LabelBatchSampler(labels, P * K, "grouped:K")`,
- trains with a batch-hard triplet loss while a `RenormScheduler` opens rmax / dmax,
- calibrates the moving averages on i.i.d. training data, and measures recall@1 on classes it never saw.

The data are synthetic clusters (nothing is downloaded): each class is a point in a 16-d subspace hidden
among 48 dimensions of large noise, so raw nearest neighbours are poor and the network must learn the
subspace. Chance recall@1 is about 1 / (held-out classes).

    python examples/metric_learning.py                     # 600 steps, P 8 x K 4
    python examples/metric_learning.py --steps 40 --classes 20 --per-class 12
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import brn_cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--classes", type=int, default=60, help="classes in all; the last quarter is held out")
    p.add_argument("--per-class", type=int, default=20, help="examples per class")
    p.add_argument("--p", type=int, default=8, help="classes per batch (P)")
    p.add_argument("--k", type=int, default=4, help="examples of each class per batch (K)")
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def synthetic_clusters(
    classes: int, per_class: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """x = [class centre (16 d) + small noise, large noise (48 d)], randomly rotated; labels 0..classes-1."""
    centres = torch.randn(classes, 16, generator=gen) * 1.5
    labels = torch.arange(classes).repeat_interleave(per_class)
    signal = centres[labels] + 0.3 * torch.randn(len(labels), 16, generator=gen)
    nuisance = 3.0 * torch.randn(len(labels), 48, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    return torch.cat([signal, nuisance], 1) @ rotation + 2.0, labels


def embedding_net() -> nn.Sequential:
    """Stands for a pretrained backbone with BatchNorm (a ResNet in practice)."""
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 32),
    )


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """For each anchor: its farthest positive and nearest negative in the batch (Hermans et al., 2017)."""
    dist = torch.cdist(embeddings, embeddings)
    same = labels[:, None] == labels[None, :]
    hardest_positive = (dist * same).max(1).values
    hardest_negative = dist.masked_fill(same, float("inf")).min(1).values
    return nn.functional.relu(hardest_positive - hardest_negative + margin).mean()


@torch.no_grad()
def recall_at_1(model: nn.Module | None, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose nearest other example (in embedding space) has the same label."""
    if model is not None:
        model.eval()
        x = nn.functional.normalize(model(x), dim=1)
    dist = torch.cdist(x, x).fill_diagonal_(float("inf"))
    return (labels[dist.argmin(1)] == labels).float().mean().item()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    x, labels = synthetic_clusters(args.classes, args.per_class, torch.Generator().manual_seed(args.seed))
    held_out = labels >= args.classes - args.classes // 4  # classes never seen in training
    train_x, train_y, test_x, test_y = x[~held_out], labels[~held_out], x[held_out], labels[held_out]
    train = TensorDataset(train_x, train_y)

    model = embedding_net()
    brn_cli.convert_batchnorm(model)  # BatchNorm1d -> BatchRenorm1d, starts as BatchNorm
    # Statistics of this data (not of the pretraining data) before the limits open.
    brn_cli.calibrate(model, DataLoader(train, batch_size=64, shuffle=True))
    sampler = brn_cli.LabelBatchSampler(train_y, args.p * args.k, f"grouped:{args.k}", seed=args.seed)
    loader = DataLoader(train, batch_sampler=sampler)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = brn_cli.RenormScheduler.from_preset(
        model, "paper-scaled", total_steps=args.steps, optimizer=optimizer
    )

    chance = 1 / (args.classes // 4)
    raw, untrained = recall_at_1(None, test_x, test_y), recall_at_1(model, test_x, test_y)
    print(f"recall@1 on {len(test_y)} held-out examples: raw inputs {raw:.3f}, untrained {untrained:.3f}")

    epoch = 0
    while scheduler.step < args.steps:
        sampler.set_epoch(epoch)
        for xb, yb in loader:  # each batch: P labels x K examples, groups contiguous
            model.train()
            loss = batch_hard_triplet_loss(nn.functional.normalize(model(xb), dim=1), yb, args.margin)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler.step >= args.steps:
                break
        epoch += 1
        if epoch % 10 == 0:
            rmax, dmax = scheduler.values()
            print(
                f"step {scheduler.step:5d}  rmax {rmax:.2f} dmax {dmax:.2f}  triplet loss {loss.item():.4f}"
            )

    # Moving averages learned on P x K batches; replace them by exact statistics of i.i.d. training data.
    brn_cli.calibrate(model, DataLoader(train, batch_size=64, shuffle=True))
    after = recall_at_1(model, test_x, test_y)
    rmax, dmax = scheduler.values()
    print(
        f"after {scheduler.step} steps (rmax {rmax:g}, dmax {dmax:g}): recall@1 {after:.3f} (chance {chance:.3f})"
    )


if __name__ == "__main__":
    main()
