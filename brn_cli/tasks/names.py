"""The tasks' names and plain options, without torch (the command line's options read them)."""

from __future__ import annotations

from typing import Any

from brn_cli.errors import BrnError

__all__ = ["DEFAULT_IGNORE_INDEX", "EMBEDDING_LOSSES", "TASKS", "parse_recall_k", "task_from_record"]

TASKS = ("classification", "segmentation", "embedding")
EMBEDDING_LOSSES = ("triplet", "contrastive")
DEFAULT_IGNORE_INDEX = 255


def parse_recall_k(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """'1,5' (or a list) as the k of recall@k: positive integers."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        ks = tuple(int(str(p).strip()) for p in parts if str(p).strip())
    except ValueError:
        raise BrnError(
            f"recall_k {text!r}: expected positive integers separated by commas, e.g. 1,5"
        ) from None
    if not ks or min(ks) < 1:
        raise BrnError(f"recall_k {text!r}: expected positive integers separated by commas, e.g. 1,5")
    return ks


def task_from_record(record: Any) -> dict[str, Any]:
    """The options of :func:`make_task` a checkpoint's recorded task gives (plain data, names and numbers
    only: a recorded callable is never imported); {} for a missing or unknown record."""
    if not isinstance(record, dict) or record.get("name") not in TASKS:
        return {}
    options: dict[str, Any] = {"name": record["name"]}
    for key, kind in (("ignore_index", int), ("margin", float), ("embedding_loss", str)):
        if isinstance(record.get(key), (int, float, str)) and not isinstance(record.get(key), bool):
            options[key] = kind(record[key])
    if isinstance(record.get("recall_k"), (list, tuple)):
        options["recall_k"] = tuple(int(k) for k in record["recall_k"] if isinstance(k, int))
    return options
