"""Batch composition (iid / grouped:K, the paper's section 4.3) and DataLoaders over it."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from brn_cli.data.base import ArrayDataset, _ArrayBatches
from brn_cli.errors import BrnError

__all__ = [
    "LabelBatchSampler",
    "eval_loader",
    "make_loader",
    "parse_sampler",
]


def parse_sampler(text: str) -> str:
    """'iid' or 'grouped:K' (K >= 1) -> the normalized text; anything else -> BrnError."""
    t = text.strip().lower()
    if t == "iid":
        return "iid"
    if t.startswith("grouped:"):
        k_text = t.split(":", 1)[1]
        try:
            k = int(k_text)
        except ValueError:
            k = 0
        if k >= 1 and k_text.isdigit():
            return f"grouped:{k}"
        raise BrnError(f"`sampler` {text!r}: K in grouped:K must be a whole number >= 1")
    raise BrnError(f"`sampler` {text!r}: expected iid or grouped:K (K examples per label in each batch)")


class LabelBatchSampler(Sampler[list[int]]):
    """Yields one list of dataset indices per optimizer step, for this rank.

    Each step draws a GLOBAL batch of batch_size * num_replicas examples and rank r takes
    ``[r*batch_size:(r+1)*batch_size]``, so the data order depends only on (seed, epoch, global batch) and
    the ranks' slices partition the global batch.

    mode ``iid``: a seeded permutation per epoch cut into consecutive global batches (no example twice in
    an epoch, the ragged tail dropped). mode ``grouped:K`` (the paper's section 4.3): each global batch is
    global_batch / K labels drawn uniformly without replacement, with K distinct examples of each, groups
    contiguous (so each rank's slice holds whole groups). Examples of a class are taken from a per-class
    shuffled pool that is refilled when fewer than K remain, so an epoch covers the data roughly evenly.
    Batches per epoch: len(labels) // global batch.

    Example (P x K batches: 3 labels x 4 examples each)::

        >>> import torch
        >>> from brn_cli import LabelBatchSampler
        >>> labels = torch.arange(60) % 10
        >>> sampler = LabelBatchSampler(labels, 12, "grouped:4", seed=0)
        >>> batch = next(iter(sampler))  # DataLoader(dataset, batch_sampler=sampler) yields these
        >>> [len(set(labels[batch[i : i + 4]].tolist())) for i in range(0, 12, 4)], len(sampler)
        ([1, 1, 1], 5)
    """

    def __init__(
        self,
        labels: Tensor,
        batch_size: int,
        mode: str = "iid",
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.mode = parse_sampler(mode)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        if self.batch_size < 1:
            raise BrnError(f"`batch_size` must be >= 1, got {batch_size}")
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise BrnError(f"rank {rank} is not in 0..{num_replicas - 1}")
        n = len(self.labels)
        if n == 0:
            raise BrnError("the dataset is empty")
        self.global_batch = self.batch_size * self.num_replicas
        if self.global_batch > n:
            raise BrnError(
                f"batch larger than the data: a global batch of {self.global_batch} from {n} examples"
            )
        self.k = int(self.mode.split(":")[1]) if self.mode.startswith("grouped:") else 0
        if self.k:
            if self.batch_size % self.k:
                raise BrnError(
                    f"`batch_size` {self.batch_size} is not a multiple of K={self.k} ({self.mode})"
                )
            counts = torch.bincount(self.labels)
            present = torch.nonzero(counts).flatten()
            small = [int(c) for c in present if int(counts[c]) < self.k]
            if small:
                raise BrnError(
                    f"{self.mode}: class {small[0]} has only {int(counts[small[0]])} examples, fewer than K={self.k}"
                    + (f" ({len(small)} such classes)" if len(small) > 1 else "")
                )
            self.groups = self.global_batch // self.k
            if self.groups > len(present):
                raise BrnError(
                    f"{self.mode}: a global batch of {self.global_batch} needs {self.groups} distinct labels "
                    f"but the data has {len(present)}"
                )
            self._classes = present
            self._members = [torch.nonzero(self.labels == c).flatten() for c in present.tolist()]

    def set_epoch(self, epoch: int) -> None:
        """Reseed for `epoch` (as DistributedSampler): call before iterating each epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels) // self.global_batch

    def _global_batches(self) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n_batches = len(self)
        if not self.k:
            perm = torch.randperm(len(self.labels), generator=gen)
            for b in range(n_batches):
                yield perm[b * self.global_batch : (b + 1) * self.global_batch]
            return
        pools = [m[torch.randperm(len(m), generator=gen)] for m in self._members]
        cursor = [0] * len(pools)
        for _ in range(n_batches):
            chosen = torch.randperm(len(pools), generator=gen)[: self.groups].tolist()
            parts = []
            for c in chosen:
                if cursor[c] + self.k > len(pools[c]):  # refill: K distinct examples from a fresh shuffle
                    pools[c] = self._members[c][torch.randperm(len(self._members[c]), generator=gen)]
                    cursor[c] = 0
                parts.append(pools[c][cursor[c] : cursor[c] + self.k])
                cursor[c] += self.k
            yield torch.cat(parts)

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self._global_batches():
            yield batch[lo:hi].tolist()


def make_loader(
    dataset: Dataset, batch_sampler: Sampler[list[int]], *, num_workers: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """DataLoader over `dataset` with one index list per batch from `batch_sampler`.

    Batches are (x float32 [B, ...], y int64 [B]). In-memory data is gathered one batch at a time.
    """
    if isinstance(dataset, ArrayDataset):
        # batch_size=None: the sampler's index lists go to _ArrayBatches whole (one gather per batch).
        return torch.utils.data.DataLoader(
            _ArrayBatches(dataset),
            sampler=batch_sampler,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory
    )


def eval_loader(dataset: Dataset, batch_size: int, *, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Every example once, in order (the last batch may be smaller): for inference-mode evaluation."""
    if batch_size < 1:
        raise BrnError(f"`batch_size` must be >= 1, got {batch_size}")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise BrnError("the dataset is empty")
    if isinstance(dataset, ArrayDataset):
        chunks = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
        return torch.utils.data.DataLoader(
            _ArrayBatches(dataset), sampler=chunks, batch_size=None, num_workers=num_workers
        )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
