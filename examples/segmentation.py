"""Semantic segmentation at batch 2: DeepLabV3 with Batch Renorm, calibrated with a shuffling loader, exported.

Segmentation trains at 1-4 images per GPU, where BatchNorm's batch statistics are noisy and differ from
the moving averages used at test time. This script

- builds torchvision's DeepLabV3 (MobileNetV3 backbone, random weights: nothing is downloaded) and
  converts its BatchNorm layers to Batch Renorm,
- trains at batch 2 while a `RenormScheduler` opens rmax / dmax (the paper's schedule, stretched),
- calibrates the moving averages with a shuffling DataLoader (`calibrate` reads the batches once),
- exports to ONNX with the norms folded into the convolutions, verified against PyTorch in onnxruntime.

The images are synthetic: noise with a bright rectangle (class 1) and a dark disk (class 2).

    python examples/segmentation.py                          # 60 steps at 128 px
    python examples/segmentation.py --steps 4 --image-size 64 --output /tmp/seg.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

import brn_cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps at batch 2")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--images", type=int, default=32, help="synthetic training images")
    p.add_argument("--output", type=Path, default=Path("segmentation.onnx"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def synthetic_scenes(n: int, size: int, gen: torch.Generator) -> TensorDataset:
    """Images (n, 3, size, size) and masks (n, size, size): 0 background, 1 rectangle, 2 disk."""
    images = torch.randn(n, 3, size, size, generator=gen) * 0.3
    masks = torch.zeros(n, size, size, dtype=torch.int64)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        top, left = torch.randint(0, size // 2, (2,), generator=gen).tolist()
        h, w = torch.randint(size // 6, size // 2, (2,), generator=gen).tolist()
        masks[i, top : top + h, left : left + w] = 1
        cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=gen).tolist()
        masks[i][(rows - cy) ** 2 + (cols - cx) ** 2 < (size // 8) ** 2] = 2
    images += (masks == 1).unsqueeze(1) * 1.5 - (masks == 2).unsqueeze(1) * 1.5
    return TensorDataset(images, masks)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    data = synthetic_scenes(args.images, args.image_size, torch.Generator().manual_seed(args.seed))

    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3, aux_loss=False)
    brn_cli.convert_batchnorm(model)  # every BatchNorm2d -> BatchRenorm2d; eval outputs unchanged
    # Statistics of this data for the starting weights, so the limits do not open on stale averages.
    brn_cli.calibrate(model, DataLoader(data, batch_size=8, shuffle=True), num_batches=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    scheduler = brn_cli.RenormScheduler.from_preset(
        model, "paper-scaled", total_steps=args.steps, optimizer=optimizer
    )

    # Batch 2: the small batches segmentation trains with. The norm in DeepLabV3's image-pooling branch
    # (classifier.0.convs.4.2) sees one value per channel and image: 2 per batch, whose statistics are noise
    # whatever the norm; expect the scheduler's RenormOpeningWarning to name it. (drop_last: a batch of 1
    # has no batch statistics there at all.)
    loader = DataLoader(data, batch_size=2, shuffle=True, drop_last=True)
    model.train()
    while scheduler.step < args.steps:
        for images, masks in loader:
            loss = nn.functional.cross_entropy(model(images)["out"], masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler.step % 10 == 0 or scheduler.step == args.steps:
                rmax, dmax = scheduler.values()
                print(f"step {scheduler.step:4d}  rmax {rmax:.2f} dmax {dmax:.2f}  loss {loss.item():.4f}")
            if scheduler.step >= args.steps:
                break

    # Exact statistics for the final weights; a shuffling loader is fine (each batch is read once).
    shifts = brn_cli.calibrate(model, DataLoader(data, batch_size=8, shuffle=True), num_batches=4)
    moved = max(shifts, key=lambda s: s.mean_shift)
    print(f"calibrated {len(shifts)} layers; largest mean shift {moved.mean_shift:.3f} in {moved.name}")

    model.eval()
    with torch.no_grad():
        images, masks = next(iter(DataLoader(data, batch_size=8)))
        accuracy = (model(images)["out"].argmax(1) == masks).float().mean().item()
    print(f"pixel accuracy on 8 training images: {accuracy:.3f}")

    report = brn_cli.export_onnx_checked(
        model, [2, 3, args.image_size, args.image_size], args.output, force=True
    )
    verify = report.verify
    print(
        f"ONNX {'verified' if verify.passed else 'NOT verified'}: {len(verify.checks)} checks, max abs diff "
        f"{verify.max_abs:.2e}; {len(report.fold.folded)} norms folded, "
        f"{report.batchnorm_nodes} BatchNormalization nodes; wrote {args.output if report.written else 'nothing'}"
    )


if __name__ == "__main__":
    main()
