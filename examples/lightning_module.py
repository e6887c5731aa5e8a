"""Batch Renorm in a Lightning Trainer: a LightningModule written with plain BatchNorm, one callback.

    python examples/lightning_module.py --steps 200
    python examples/lightning_module.py --steps 200 --devices 2 --strategy ddp --sync-batchnorm

The callback converts the module's BatchNorm layers to Batch Renorm at setup, drives rmax / dmax from the
trainer's global step (the paper's schedule stretched to the run), logs the limits and the renorm telemetry
through the trainer's logger (metrics.csv under --out), keeps its state in the trainer's checkpoints, and
under DDP computes each layer's batch statistics over every process's examples. The data are synthetic
(small random images whose class shifts their mean), so the script runs anywhere in seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
except ImportError:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

import brn_cli
from brn_cli.integrations.lightning import BatchRenormCallback


class SmallConvNet(pl.LightningModule):
    """Any LightningModule with BatchNorm layers: the callback converts them."""

    def __init__(self, classes: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def synthetic_images(n: int = 64, classes: int = 4, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randn(n, 3, 8, 8, generator=gen) + labels.view(-1, 1, 1, 1).float() * 0.5
    return TensorDataset(images, labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per process and step")
    parser.add_argument("--devices", type=int, default=1, help="processes (CPU)")
    parser.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn")
    parser.add_argument("--sync-batchnorm", action="store_true", help="Lightning's sync_batchnorm=True")
    parser.add_argument("--out", type=Path, default=Path("lightning-brn"), help="logs and final weights")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = SmallConvNet()
    # In order, so that one process with batch 2B sees the same global batches as two with B each.
    loader = DataLoader(synthetic_images(), batch_size=args.batch_size, shuffle=False, drop_last=True)
    # Moving averages of this data, not of the initialization: the limits can open without a loss spike.
    brn_cli.calibrate(model, loader, num_batches=4)
    renorm = BatchRenormCallback("paper-scaled", convert_options={"momentum": 0.1})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        sync_batchnorm=args.sync_batchnorm,
        max_steps=args.steps,
        callbacks=[renorm],
        logger=CSVLogger(args.out, name="logs", version=0),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, loader)
    if trainer.is_global_zero:
        torch.save(model.state_dict(), args.out / "model.pt")
        layers = {n: type(m).__name__ for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
        summary = {"steps": trainer.global_step, "limits": renorm.scheduler.values(), "norm_layers": layers}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
