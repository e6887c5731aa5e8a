"""Object detection at batch 2: Faster R-CNN's FrozenBatchNorm2d converted to Batch Renorm, then exported.

torchvision's detectors with a pretrained backbone use FrozenBatchNorm2d: a fixed affine map, because 1-4
images per GPU are too few for BatchNorm's batch statistics. Batch Renorm can train those norms at such
batches. This script

- builds Faster R-CNN on a ResNet-FPN backbone exactly as torchvision does for a pretrained one
  (FrozenBatchNorm2d, stem and layer1 frozen) but with random weights: nothing is downloaded,
- converts the frozen norms of the trainable stages to Batch Renorm (`frozen="convert"`; the norms of
  the frozen stages stay frozen),
- calibrates the moving averages on the data, trains at batch 2 with a `RenormScheduler`, calibrates
  again for the final weights,
- exports to ONNX (one graph input per image) and verifies it against PyTorch in onnxruntime.

The images are synthetic: noise with one or two bright rectangles, whose boxes are the targets.

    python examples/detection.py                                   # ResNet-50 FPN, 20 steps at 256 px
    python examples/detection.py --backbone resnet18 --steps 3 --image-size 96 --output /tmp/det.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import brn_cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50", help="torchvision ResNet name (resnet18 is faster)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps at batch 2")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument(
        "--score-thresh", type=float, default=0.05, help="keep detections scoring above this (0: all of them)"
    )
    p.add_argument("--output", type=Path, default=Path("detector.onnx"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def synthetic_image(size: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A noise image with 1-2 bright rectangles, and its target: boxes (x1, y1, x2, y2) and labels (1)."""
    image = torch.rand(3, size, size, generator=gen) * 0.3
    boxes = []
    for _ in range(int(torch.randint(1, 3, (1,), generator=gen))):
        x1, y1 = torch.randint(0, size // 2, (2,), generator=gen).tolist()
        w, h = torch.randint(size // 8, size // 2, (2,), generator=gen).tolist()
        image[:, y1 : y1 + h, x1 : x1 + w] += 0.6
        boxes.append([x1, y1, x1 + w, y1 + h])
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.ones(len(boxes), dtype=torch.int64),
    }
    return image, target


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    size = args.image_size

    # As torchvision builds fasterrcnn_resnet50_fpn for pretrained weights: FrozenBatchNorm2d everywhere,
    # the stem and layer1 frozen (trainable_layers=3). Random weights here.
    backbone = resnet_fpn_backbone(backbone_name=args.backbone, weights=None, trainable_layers=3)
    model = FasterRCNN(
        backbone, num_classes=2, min_size=size, max_size=size, box_score_thresh=args.score_thresh
    )

    brn_cli.convert_batchnorm(model, frozen="convert")  # eval outputs unchanged
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    renorm = len(brn_cli.renorm_layers(model))
    print(f"{renorm} frozen norms -> Batch Renorm; {frozen} stay frozen (their convolutions are frozen)")

    # calibrate() runs the model in eval mode on each input; a torchvision detector takes a batch tensor
    # (N, 3, H, W) as well as a list of images, so hand it tensors (a list would be read as (input, labels)).
    calibration = [torch.stack([synthetic_image(size, gen)[0] for _ in range(2)]) for _ in range(4)]
    brn_cli.calibrate(model, calibration)

    params = [p for p in model.parameters() if p.requires_grad]
    # torchvision's reference recipe: lr 0.02 for 16 images, scaled to 2.
    optimizer = torch.optim.SGD(params, lr=0.0025, momentum=0.9, weight_decay=1e-4)
    scheduler = brn_cli.RenormScheduler.from_preset(
        model, "paper-scaled", total_steps=args.steps, optimizer=optimizer
    )
    model.train()
    for _ in range(args.steps):
        images, targets = zip(*(synthetic_image(size, gen) for _ in range(2)), strict=True)  # batch 2
        losses = model(list(images), list(targets))
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rmax, dmax = scheduler.values()
        print(f"step {scheduler.step:3d}  rmax {rmax:.2f} dmax {dmax:.2f}  loss {loss.item():.4f}")

    brn_cli.calibrate(model, calibration)  # exact statistics for the final weights, before export

    model.eval()
    with torch.no_grad():
        found = [len(d["boxes"]) for d in model(list(calibration[0]))]
    print(f"detections on two synthetic images: {found}")

    # A detector is exported unfolded (the exporter fuses its norms), one graph input per image, and verified
    # on real images: on random noise a detector may find nothing, and empty outputs prove little.
    report = brn_cli.export_onnx_checked(
        model, [2, 3, size, size], args.output, fold=False, force=True, verify_data=torch.cat(calibration)
    )
    verify = report.verify
    print(
        f"ONNX {'verified' if verify.passed else 'NOT verified'}: {len(verify.checks)} checks, max abs diff "
        f"{verify.max_abs:.2e}; inputs {report.input_shape}; wrote {args.output if report.written else 'nothing'}"
    )


if __name__ == "__main__":
    main()
