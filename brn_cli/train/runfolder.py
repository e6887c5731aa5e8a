"""The run folder and the run's data: what a run writes, when, and how a resume checks it is the same run.

RUNDIR is locked while a process trains in it; its files (``config.json``, ``metrics.jsonl``) appear with
the first checkpoint, so a run that fails before it leaves the folder (and, with ``force``, the old run in
it) as it was (:class:`RunFiles`). A resume checks that its data is the run's (:func:`check_same_data`),
by a fingerprint recorded in last.pt (:func:`data_fingerprint`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brn_cli.errors import BrnError
from brn_cli.storage.atomic import LOCK_NAME, atomic_path, ensure_output_dir, folder_lock, remove_stale_temps

if TYPE_CHECKING:  # torch is imported inside the functions, so `brn --help` stays fast
    import torch

__all__ = [
    "BEST",
    "CONFIG",
    "CURVES",
    "LAST",
    "METRICS",
    "RUN_FILES",
    "RunFiles",
    "check_same_data",
    "data_fingerprint",
    "nonfinite_tensors",
    "prepare_run_dir",
    "truncate_metrics",
    "write_json",
]

LAST, BEST, METRICS, CONFIG, CURVES = "last.pt", "best.pt", "metrics.jsonl", "config.json", "curves.png"
RUN_FILES = (LAST, BEST, METRICS, CONFIG, CURVES)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def truncate_metrics(path: Path, step: int, *, eval_pending: bool = False) -> None:
    """Keep only the records up to `step` (those written before the checkpoint being resumed); without the
    validation record of `step` itself when the checkpoint was saved before that validation (it is redone)."""
    from brn_cli.train.curves import read_metrics

    kept = [
        r
        for r in read_metrics(path)
        if int(r.get("step", 0)) < step
        or (int(r.get("step", 0)) == step and not (eval_pending and r.get("kind") == "eval"))
    ]
    with atomic_path(path, force=True) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# The folder: locked while a process trains in it; its files appear with the first checkpoint
# ----------------------------------------------------------------------------------------------


def _refuse_inputs_among_outputs(checkpoint: str, run_dir: Path) -> None:
    """A fresh run replaces RUNDIR's own files: its checkpoint must not be one of them."""
    source = Path(checkpoint).resolve()
    for name in RUN_FILES:
        if (run_dir / name).resolve() == source:
            raise BrnError(
                f"checkpoint {checkpoint} is the {name} of the run folder {run_dir}, which this run "
                "would replace: copy it out of the folder first, or write the new run to another folder",
                param="checkpoint",
            )


def _check_run_dir_free(run_dir: Path, force: bool) -> None:
    """Under the lock: a fresh run needs an empty folder, or force (see :class:`RunFiles`)."""
    for name in RUN_FILES:  # temporaries of saves killed midway
        remove_stale_temps(run_dir / name)
    occupied = [p.name for p in run_dir.iterdir() if p.name != LOCK_NAME]
    if occupied and not force:
        raise BrnError(
            f"the output folder {run_dir} is not empty; pass `resume={run_dir}` or `force=True`",
            param="output",
        )


def _remove_if_unused(run_dir: Path) -> None:
    """Remove `run_dir` when it holds nothing but its lock file (a run that never saved)."""
    with contextlib.suppress(OSError):
        if {p.name for p in run_dir.iterdir()} <= {LOCK_NAME}:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
            run_dir.rmdir()


def prepare_run_dir(config: Any, resuming: bool, held: contextlib.ExitStack) -> Path:
    """Create and lock RUNDIR for a fresh run (a resumed run's folder is locked already). Deletes nothing."""
    run_dir = Path(config.output)
    if run_dir.exists() and not run_dir.is_dir():
        raise BrnError(f"output {run_dir} exists and is not a directory", param="output")
    if resuming:
        return run_dir
    _refuse_inputs_among_outputs(config.checkpoint, run_dir)
    if not run_dir.exists():
        # Registered before the lock, so it runs after the lock is released: a run that fails before its
        # first checkpoint takes the folder it created away again.
        held.callback(_remove_if_unused, run_dir)
    ensure_output_dir(run_dir)
    held.enter_context(folder_lock(run_dir, what="run folder"))
    _check_run_dir_free(run_dir, config.force)
    return run_dir


class RunFiles:
    """metrics.jsonl and config.json of a run, which appear with its first checkpoint.

    Until then the metric records wait in memory, and an old run's files (force) stay as they were, so a
    run that fails before saving anything leaves the folder as it found it: reusable without force, the
    old run intact. The first checkpoint writes both files and removes what is left of an old run, so the
    folder never mixes two runs. A resumed run's files exist already.
    """

    def __init__(self, run_dir: Path, record: dict[str, Any], *, enabled: bool, started: bool) -> None:
        self.run_dir, self.record, self.enabled, self.started = run_dir, record, enabled, started
        self.pending: list[dict[str, Any]] = []
        self.written: set[str] = set()

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not self.started:
            self.pending.append(record)
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def saved(self, name: str) -> None:
        """Checkpoint `name` is written: on the first one, the run's other files follow."""
        if not self.enabled:
            return
        self.written.add(name)
        if self.started:
            return
        with atomic_path(self.metrics_path, force=True) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.pending), encoding="utf-8")
        write_json(self.run_dir / CONFIG, self.record)
        for old in (LAST, BEST, CURVES):  # an old run's, replaced by this one
            if old not in self.written:
                (self.run_dir / old).unlink(missing_ok=True)
        self.pending.clear()
        self.started = True


def nonfinite_tensors(model, names: set[str] | None = None) -> list[str]:
    """Names of the floating-point state_dict entries (parameters and the buffers a checkpoint keeps), of
    `names` if given, that hold a NaN or an infinity; one host sync when all is well."""
    import torch

    named = [
        (name, t)
        for name, t in model.state_dict().items()
        if t.is_floating_point() and t.numel() and (names is None or name in names)
    ]
    if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return []
    return [name for name, t in named if not bool(torch.isfinite(t).all())]


# ----------------------------------------------------------------------------------------------
# Which data a run trained on: sizes, label counts and a content hash, recorded and checked on resume
# ----------------------------------------------------------------------------------------------


def _content_hash(dataset: Any, labels: torch.Tensor) -> tuple[str, str]:
    """(sha256, what it covers) of one split: its labels in order, and the content under any wrappers.

    In-memory arrays are hashed whole; an image folder by its files' relative paths and sizes (reading every
    image would cost a pass over the data); other datasets by their labels alone.
    """
    import numpy as np
    import torch

    digest = hashlib.sha256(labels.to(torch.int64).numpy().tobytes())
    source = dataset
    while hasattr(source, "base"):  # brn's wrappers: augmentation, normalization, val_split subsets
        source = source.base
    tensors = [getattr(source, "x", None)] if hasattr(source, "x") else list(getattr(source, "tensors", []))
    if tensors and all(isinstance(t, torch.Tensor) for t in tensors):
        for t in tensors:
            digest.update(f"{t.dtype}{list(t.shape)}".encode())
            digest.update(memoryview(np.ascontiguousarray(t.detach().cpu().numpy())).cast("B"))
        return digest.hexdigest(), "arrays"
    samples, root = getattr(source, "samples", None), getattr(source, "root", None)
    if isinstance(samples, list) and root is not None:
        for item in samples:
            path = Path(item[0])
            size = path.stat().st_size if path.exists() else -1
            digest.update(
                f"{path.relative_to(root) if path.is_relative_to(root) else path}\0{size}\0".encode()
            )
        return digest.hexdigest(), "file names and sizes"
    return digest.hexdigest(), "labels"


def _split_record(dataset: Any, labels: torch.Tensor | None) -> dict[str, Any] | None:
    import torch

    if dataset is None or labels is None:
        return None
    sha256, covers = _content_hash(dataset, labels)
    counts = torch.bincount(labels.to(torch.int64)).tolist() if len(labels) else []
    return {"examples": int(len(labels)), "label_counts": counts, "sha256": sha256, "hashed": covers}


def data_fingerprint(bundle: Any) -> dict[str, Any]:
    """What identifies a run's data (recorded in last.pt and config.json): per split, the number of
    examples, the count of each label and a content hash (see :func:`_content_hash`)."""
    return {
        "train": _split_record(bundle.train, bundle.train_labels),
        "val": _split_record(bundle.val, bundle.val_labels),
    }


def _split_mismatch(split: str, before: dict | None, now: dict | None) -> str | None:
    """Why split `split` of the data is not the run's (None: the same, or only other content)."""
    name = {"train": "training", "val": "validation"}[split]
    if (before is None) != (now is None):
        return (
            f"it has no {name} set, the run's had one"
            if now is None
            else f"it has a {name} set, the run's had none"
        )
    if before is None:
        return None
    if before["examples"] != now["examples"]:
        return f"{now['examples']} {name} examples, the run had {before['examples']}"
    if before["label_counts"] != now["label_counts"]:
        return f"other label counts in the {name} set"
    if before["sha256"] != now["sha256"] and split == "train":
        return f"the {name} set has the same size and labels but other content ({now['hashed']} differ)"
    return None


def check_same_data(
    recorded: dict[str, Any] | None,
    current: dict[str, Any],
    spec: str,
    *,
    given: bool,
    run_dir: Path,
    note: bool,
) -> None:
    """Refuse data that is not what the run trained on: other sizes, label counts or training content.

    A validation set whose content alone differs (a repaired image, say) is accepted with a note: it only
    decides which checkpoint becomes best.pt. A run recorded without a fingerprint cannot be checked.
    """
    what = f"data {spec}" if given else f"the run's data {spec}"
    if recorded is None:
        if given and note:
            sys.stderr.write(
                f"note: {run_dir} recorded no fingerprint of its data (an older brn): cannot check that "
                f"{spec} is the data it trained on\n"
            )
        return
    for split in ("train", "val"):
        problem = _split_mismatch(split, recorded.get(split), current.get(split))
        if problem:
            raise BrnError(f"{what} is not the data this run trained on: {problem}", param="data")
    before, now = recorded.get("val"), current.get("val")
    if note and before is not None and before["sha256"] != now["sha256"]:
        sys.stderr.write(
            f"note: {what}: the validation set has the run's size and labels but other content; "
            "the best.pt so far was chosen on the old one\n"
        )
