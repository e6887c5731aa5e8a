"""Batch Renorm under DistributedDataParallel in your own loop, with statistics over every rank.

Run under torchrun (gloo on CPU, NCCL on GPUs); without torchrun it runs as one process:

    torchrun --standalone --nproc-per-node 2 examples/ddp_own_loop.py
    python -m torch.distributed.run --standalone --nproc-per-node 2 examples/ddp_own_loop.py --steps 10
    python examples/ddp_own_loop.py

What it shows:

- `init_distributed` joins the process group torchrun describes (and returns a one-process context
  otherwise), so the same script runs both ways;
- `LabelBatchSampler` splits each global P x K batch over the ranks (whole label groups per rank);
- `configure_stats_sync(model, "global", ctx, process_group=...)` makes every renorm layer compute its
  batch statistics over all ranks' examples: the batch renorm sees is the global batch, and the moving
  averages stay equal on every rank (checked at the end);
- the `RenormScheduler` follows `optimizer.step()`, which DDP runs in lockstep on every rank.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import brn_cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="examples per rank and step")
    p.add_argument("--k", type=int, default=4, help="examples of each label per batch")
    p.add_argument("--warmup", type=int, default=20, help="BatchNorm steps before rmax 3 / dmax 5")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    ctx = brn_cli.init_distributed("cpu")  # under torchrun: gloo process group; else one process
    torch.manual_seed(args.seed)  # the same data and initial weights on every rank
    labels = torch.arange(1200) % 20
    data = TensorDataset(torch.randn(1200, 32) + labels[:, None].float() / 10, labels)
    sampler = brn_cli.LabelBatchSampler(
        labels, args.batch, f"grouped:{args.k}", seed=args.seed, num_replicas=ctx.world_size, rank=ctx.rank
    )
    loader = DataLoader(data, batch_sampler=sampler)

    model = nn.Sequential(
        nn.Linear(32, 64),
        brn_cli.BatchRenorm1d(64, momentum=0.1),  # a short run: averages that settle within the warm-up
        nn.ReLU(),
        nn.Linear(64, 64),
        brn_cli.BatchRenorm1d(64, momentum=0.1),
        nn.ReLU(),
        nn.Linear(64, 20),
    )
    group = dist.group.WORLD if ctx.distributed else None  # or a subgroup from dist.new_group(ranks)
    report = brn_cli.configure_stats_sync(model, "global", ctx, process_group=group)  # before wrapping
    ddp = DistributedDataParallel(model) if ctx.distributed else model
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.02, momentum=0.9)
    scheduler = brn_cli.RenormScheduler.warmup(model, optimizer, warmup_steps=args.warmup)

    epoch = 0
    while scheduler.step < args.steps:
        sampler.set_epoch(epoch)  # the same global batches on every rank, a different slice each
        for x, y in loader:
            loss = nn.functional.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients
            optimizer.step()  # every rank steps: the schedule advances in lockstep
            if scheduler.step >= args.steps:
                break
        epoch += 1

    # With "global" statistics every rank saw the same batch mean and variance, so the moving averages
    # must agree to the last bit; compare them across ranks.
    buffers = torch.cat(
        [model[1].running_mean, model[1].running_var, model[4].running_mean, model[4].running_var]
    )
    spread = 0.0
    if ctx.distributed:
        gathered = [torch.empty_like(buffers) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, buffers)
        spread = max((g - gathered[0]).abs().max().item() for g in gathered)
    rmax, dmax = scheduler.values()
    if ctx.is_main:
        print(
            f"{ctx.world_size} process(es), {report.renorm_layers} renorm layers with {report.mode} statistics"
        )
        print(f"after {scheduler.step} steps: rmax {rmax:g}, dmax {dmax:g}, loss {loss.item():.4f}")
        print(f"moving averages across ranks: max difference {spread:.3g}")
    if ctx.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
