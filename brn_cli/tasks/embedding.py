"""Metric learning: embeddings [N, D] against integer labels [N] (examples of one label should be close).

Every loss and metric works on L2-normalized embeddings, so that the scale of the output does not matter
and Euclidean and cosine neighbours agree (on the unit sphere ``|a - b|^2 = 2 - 2 cos(a, b)``).

* ``triplet`` (default): batch-hard triplet loss (Hermans, Beyer and Leibe 2017, "In Defense of the Triplet
  Loss"): for each anchor, its farthest positive and its closest negative in the batch,
  ``max(0, d(a, p) - d(a, n) + margin)`` with Euclidean distances, averaged over the anchors that have both.
  Default margin 0.2, FaceNet's (Schroff et al. 2015) margin for unit-length embeddings. It needs several
  examples per label in a batch: the grouped sampler (P labels x K examples).
* ``contrastive``: over every pair of the batch, ``d^2`` for a pair of one label and ``max(0, margin - d)^2``
  for a pair of two (Hadsell, Chopra and LeCun 2006), averaged over the pairs; default margin 0.5.
* Metric: recall@k over the validation split, the retrieval measure of Song et al. 2016 (lifted structure):
  each example queries all the others (itself excluded) by cosine similarity; a hit when one of its k nearest
  neighbours has its label. Averaged over the queries whose label occurs at least twice (the others cannot
  hit). The training log shows recall@1 within each batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from brn_cli.errors import BrnError
from brn_cli.tasks.base import Task, describe_output, scalar_state_reduce
from brn_cli.tasks.names import EMBEDDING_LOSSES

__all__ = ["EMBEDDING_LOSSES", "Embedding", "batch_hard_triplet_loss", "contrastive_loss", "recall_at_k"]

DEFAULT_MARGINS = {"triplet": 0.2, "contrastive": 0.5}
_QUERY_BLOCK = 1024  # queries per similarity block: memory stays block x N


def _distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of unit vectors, with a gradient everywhere (no sqrt(0))."""
    unit = F.normalize(embeddings.float(), dim=1)
    return (2.0 - 2.0 * unit @ unit.T).clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over anchors (with a positive and a negative) of relu(hardest d(a,p) - hardest d(a,n) + margin)."""
    d = _distances(embeddings)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    valid = positive.any(1) & negative.any(1)
    if not bool(valid.any()):
        return d.sum() * 0.0  # nothing to compare in this batch: no gradient, not a NaN
    hardest_positive = torch.where(positive, d, torch.zeros_like(d)).max(1).values
    hardest_negative = torch.where(negative, d, torch.full_like(d, float("inf"))).min(1).values
    return F.relu(hardest_positive - hardest_negative + margin)[valid].mean()


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over the pairs i < j of d^2 (same label) or relu(margin - d)^2 (different labels)."""
    d = _distances(embeddings)
    same = labels[:, None] == labels[None, :]
    pairs = torch.triu(torch.ones_like(same), diagonal=1)
    if not bool(pairs.any()):
        return d.sum() * 0.0
    per_pair = torch.where(same, d.pow(2), F.relu(margin - d).pow(2))
    return per_pair[pairs].mean()


def _neighbour_hits(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits [queries, len(ks)] as bool, answerable [queries]): whether one of the k nearest others (cosine)
    shares the query's label, for each k; a query is answerable when its label occurs at least twice."""
    unit = F.normalize(embeddings.float(), dim=1)
    n = len(labels)
    deepest = min(max(ks), max(n - 1, 1))
    rows = []
    for start in range(0, n, _QUERY_BLOCK):
        sim = unit[start : start + _QUERY_BLOCK] @ unit.T
        idx = torch.arange(start, min(start + _QUERY_BLOCK, n), device=sim.device)
        sim[torch.arange(len(idx), device=sim.device), idx] = float("-inf")  # never itself
        nearest = sim.topk(deepest, dim=1).indices
        match = labels[nearest] == labels[idx, None]
        rows.append(torch.stack([match[:, : min(k, deepest)].any(1) for k in ks], dim=1))
    counts = torch.bincount(labels)
    return torch.cat(rows), counts[labels] > 1


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """{"recall@k": fraction of the answerable queries with a same-label example among the k nearest}."""
    if len(labels) < 2:
        raise BrnError("recall@k needs at least 2 validation examples")
    hits, answerable = _neighbour_hits(embeddings, labels.to(torch.int64), ks)
    if not bool(answerable.any()):
        raise BrnError("recall@k needs a label with at least 2 validation examples; every label occurs once")
    hits = hits[answerable].double().mean(0)
    return {f"recall@{k}": float(h) for k, h in zip(ks, hits.tolist(), strict=True)}


class Embedding(Task):
    """Embeddings [N, D] with integer labels: batch-hard triplet (or contrastive) loss, recall@k."""

    name = "embedding"
    metric_name = "recall@1"
    train_metric_name = "recall@1"

    def __init__(
        self, loss: str = "triplet", margin: float | None = None, recall_k: tuple[int, ...] = (1, 5)
    ) -> None:
        if loss not in EMBEDDING_LOSSES:
            raise BrnError(
                f"embedding_loss {loss!r}: expected one of {', '.join(EMBEDDING_LOSSES)}",
                param="embedding_loss",
            )
        if margin is not None and not margin > 0:
            raise BrnError(f"margin must be > 0, got {margin}", param="margin")
        self.loss_kind = loss
        self.margin = float(margin) if margin is not None else DEFAULT_MARGINS[loss]
        self.recall_k = sorted({1, *(int(k) for k in recall_k)})

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "embedding_loss": self.loss_kind,
            "margin": self.margin,
            "recall_k": self.recall_k,
        }

    def check(self, output: Any, target: Any = None, num_classes: int | None = None) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            raise BrnError(
                f"the embedding task expects the model to return embeddings [N, D]; got {describe_output(output)}"
            )
        if target is not None and torch.as_tensor(target).dim() != 1:
            raise BrnError(
                f"the embedding task expects one label per example; got targets of shape "
                f"{list(torch.as_tensor(target).shape)}"
            )

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "triplet":
            return batch_hard_triplet_loss(output, target, self.margin)
        return contrastive_loss(output, target, self.margin)

    def batch_metric(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hits, answerable = _neighbour_hits(output.detach(), target, [1])
        return (hits[:, 0] & answerable).sum(), answerable.sum()

    def metric_state(self) -> dict[str, Any]:
        return {"loss_sum": 0.0, "count": 0.0, "embeddings": [], "labels": []}

    def update(self, state: dict[str, Any], output: torch.Tensor, target: torch.Tensor) -> None:
        state["loss_sum"] += float(self.loss(output, target)) * len(target)
        state["count"] += len(target)
        state["embeddings"].append(F.normalize(output.detach().float(), dim=1).cpu())
        state["labels"].append(target.detach().to(torch.int64).cpu())

    def reduce(self, state: dict[str, Any], dist: Any) -> dict[str, Any]:
        """Loss sums summed; every process's embeddings gathered (recall is over the whole split)."""
        sums = scalar_state_reduce({"loss_sum": state["loss_sum"], "count": state["count"]}, dist)
        parts = [(state["embeddings"], state["labels"])]
        if dist is not None and getattr(dist, "world_size", 1) > 1:
            import torch.distributed as tdist

            parts = [None] * dist.world_size  # type: ignore[list-item]
            tdist.all_gather_object(parts, (state["embeddings"], state["labels"]))
        return {
            **sums,
            "embeddings": [e for emb, _ in parts for e in emb],
            "labels": [y for _, lab in parts for y in lab],
        }

    def compute(self, state: dict[str, Any]) -> dict[str, Any]:
        count = self._need_examples(state)
        embeddings, labels = torch.cat(state["embeddings"]), torch.cat(state["labels"])
        return {"loss": state["loss_sum"] / count, **recall_at_k(embeddings, labels, self.recall_k)}
