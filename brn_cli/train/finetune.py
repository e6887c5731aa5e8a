"""`brn finetune`: fine-tune a (converted) BatchNorm model with Batch Renormalization.

One training loop, readable top to bottom in :func:`run_finetune`. Each iteration is one optimizer step:

    batch  = sampler(seed, epoch)[batch_index]          # data order: a pure function of (seed, epoch, index)
    loss   = cross_entropy(model(x), y)                 # renorm layers use r, d clipped at rmax(step), dmax(step)
    step  += 1; lr, rmax, dmax <- schedules(updates)    # every schedule is a function of the optimizer step

Why it is written this way:

* Batch composition (the paper's section 4). ``--sampler grouped:K`` draws batches of batch/K labels with K
  examples each (non-i.i.d., as in section 4.3); ``--microbatch K`` normalizes groups of K consecutive
  examples separately while the gradient is taken over the whole batch (section 4.2). Under such batches the
  minibatch statistics differ systematically from the population's, BatchNorm's training function drifts
  away from its inference function, and inference accuracy collapses; Batch Renorm trains the function it
  will use at inference (r, d correct the minibatch statistics towards the moving averages).
* ``step`` counts iterations (batches drawn; it decides --steps, --eval-every, --save-every and the data
  position); ``updates`` counts optimizer steps actually applied (an ``optimizer.step`` post-hook of
  :class:`~brn_cli.train.schedule.RenormScheduler`). The two differ only under ``--amp fp16``, whose GradScaler
  skips the update of a step with inf/NaN gradients: that step must not move the lr, rmax or dmax either.
* Exact resume. Everything that decides the trajectory is either a pure function of the step (lr, rmax,
  dmax, the data order) or saved in ``last.pt``: weights and running statistics, optimizer state, GradScaler
  state, the RNG states (torch CPU/CUDA, numpy, python ``random``), the sampler position (epoch, batch index)
  and the running sums of the current logging window. A run killed with SIGKILL and resumed from its last
  ``--save-every`` checkpoint ends with bit-identical weights (CPU). ``metrics.jsonl`` is truncated to the
  checkpoint's step on resume, so it reads as if the run had never stopped.
* No failure loses a run. ``last.pt`` is saved before the validation of its step (a resumed run does a
  pending validation first); every save checks that the weights and statistics are finite, and the loss,
  summed on the device every step, is checked at each log line, save and the last step; one process at a
  time trains in a run folder (:func:`~brn_cli.storage.atomic.folder_lock`); ``config.json`` and ``metrics.jsonl``
  appear with the first checkpoint, so a run that fails before it leaves the folder (and, with --force,
  the old run in it) as it was (:class:`_RunFiles`). A resume checks that its data is the run's
  (:func:`_check_same_data`).
* Device handling lives in :class:`_Runtime` (device, rank, world size, "is main process"). Logging,
  metrics and checkpoint writing happen on the main process only; the sampler takes ``num_replicas`` and
  ``rank``; so distributed training is a local change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brn_cli.errors import BrnError
from brn_cli.storage.atomic import LOCK_NAME, ensure_output_dir, folder_lock, remove_stale_temps

if TYPE_CHECKING:  # torch is imported inside the functions, so `brn --help` stays fast
    import torch

__all__ = [
    "FinetuneConfig",
    "FinetuneInterrupted",
    "FinetuneResult",
    "OPTIMIZERS",
    "LR_SCHEDULES",
    "RESUME_OVERRIDABLE",
    "lr_at",
    "resolve_device",
    "run_finetune",
]

OPTIMIZERS = ("sgd", "adamw", "rmsprop")
LR_SCHEDULES = ("cosine", "linear", "constant")
AMP_MODES = ("off", "bf16", "fp16")
PRESET_SCHEDULES = ("paper", "paper-scaled", "off")
# Options that may differ on --resume: they change where and how often things happen, not the trajectory.
RESUME_OVERRIDABLE = (
    "device",
    "num_workers",
    "save_every",
    "eval_every",
    "force",
    "resume",
    "output",
    "dist_timeout",
)
# Options that say how last.pt is read (its architecture), not how the run goes: left to the loader on resume.
RESUME_LOADING = ("arch", "arch_kwargs", "trust_pickle")
# Where the resumed run is and how it was asked for: never compared with the run's values.
_RESUME_STRUCTURAL = ("resume", "output", "force", "resume_overrides")
SGD_MOMENTUM = 0.9  # optimizer momentum; `momentum` in the config is the rate of the moving statistics

LAST, BEST, METRICS, CONFIG, CURVES = "last.pt", "best.pt", "metrics.jsonl", "config.json", "curves.png"
RUN_FILES = (LAST, BEST, METRICS, CONFIG, CURVES)


@dataclass
class FinetuneConfig:
    """Every option of `brn finetune`; JSON-serialisable (written to RUNDIR/config.json)."""

    checkpoint: str
    data: str
    output: str
    arch: str | None = None
    arch_kwargs: dict | None = None
    trust_pickle: bool = False
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    momentum: float = 0.01
    rmax_schedule: str = "paper-scaled"
    dmax_schedule: str | None = None  # None: the same preset as rmax_schedule when that is a preset
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    microbatch: int | None = None
    sampler: str = "iid"
    val_split: float | None = None
    normalize: str | None = None
    image_size: int | None = None  # ImageFolder data: center crop S x S after resizing the shorter side
    resize_size: int | None = None  # ... to this (None: round(S / 0.875))
    channels: int | None = None  # image folders: 1 or 3 (None: the model's first convolution decides)
    augment: str = "none"  # training images: none, flip or crop-flip (per-example seeds; see data.py)
    device: str = "auto"
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 0
    force: bool = False
    resume: str | None = None
    # Extensions beyond the issue-3 contract:
    log_every: int = 10  # steps between train-metric records (and progress-line updates)
    # issue 6 (distributed; see brn_cli/train/distributed.py and docs/distributed.md):
    stats_sync: str = "global"  # global: batch statistics over all ranks; local: per rank, averages shared
    dist_timeout: float = 300.0  # seconds for the rendezvous and any collective before giving up
    # On --resume, which fields this config really sets (the CLI passes the options given on its command
    # line): RESUME_OVERRIDABLE ones replace the run's value, any other must repeat it. None: the
    # RESUME_OVERRIDABLE fields that differ from the defaults, the others keep the run's values. In both
    # cases a non-empty `data` may name the run's data at a new location (checked to be the same data).
    resume_overrides: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class FinetuneResult:
    """What a run produced. `final` / `best`: {"step", "train_loss", "train_accuracy", "val_loss", ...}."""

    run_dir: str
    steps: int
    final: dict
    best: dict
    metrics_path: str
    resumed_from: int | None = None
    device: str = "cpu"
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)


class FinetuneInterrupted(BrnError):
    """SIGINT / SIGTERM arrived: last.pt was saved; exit code 130 / 143 as a shell would report."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)
        self.signum = int(signum)


# ----------------------------------------------------------------------------------------------
# Runtime: device and process identity in one place (distributed training extends this)
# ----------------------------------------------------------------------------------------------


def resolve_device(spec: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device; CUDA asked for but absent -> BrnError."""
    import torch

    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BrnError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        index = text.partition(":")[2]
        if index:
            if not index.isdigit():
                raise BrnError(f"--device {spec}: expected cuda:N with N a GPU index")
            if int(index) >= torch.cuda.device_count():
                raise BrnError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device(text)
    raise BrnError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


@dataclass
class _Runtime:
    """Where this process trains and who it is. Single process: rank 0 of 1."""

    device: Any
    rank: int = 0
    world_size: int = 1
    dist: Any = None  # brn_cli.train.distributed.DistContext

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def wrap(self, model):
        """The module the training forward goes through: DDP (broadcast_buffers off) under torchrun."""
        from brn_cli.train.distributed import wrap_model

        return wrap_model(model, self.dist)


def _make_runtime(config: FinetuneConfig) -> _Runtime:
    import torch

    from brn_cli.train.distributed import DistContext, init_distributed, launched_by_torchrun

    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        ctx = init_distributed(config.device, config.dist_timeout)  # NCCL on GPU, gloo on CPU
        return _Runtime(device=torch.device(ctx.device), rank=ctx.rank, world_size=ctx.world_size, dist=ctx)
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return _Runtime(device=device, dist=DistContext(device=str(device), timeout_s=config.dist_timeout))


# ----------------------------------------------------------------------------------------------
# Small pure pieces: learning rate, options, RNG state, metrics file
# ----------------------------------------------------------------------------------------------


def lr_at(
    step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine"
) -> float:
    """Learning rate for the update that turns step `step` into step+1 (a pure function of the step).

    Warm-up: linear from base/warmup to base over the first `warmup_steps` updates. Then
    cosine: base * (1 + cos(pi * t)) / 2, linear: base * (1 - t), constant: base, with t the fraction of
    the remaining updates already done (t = 0 at the first post-warm-up update).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    span = max(total_steps - warmup_steps, 1)
    t = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "linear":
        return base_lr * (1.0 - t)
    raise BrnError(f"--lr-schedule {kind!r}: expected one of {', '.join(LR_SCHEDULES)}")


def _validate(config: FinetuneConfig) -> None:
    """Reject bad options with one clear line before any work is done."""
    if config.steps is None and config.epochs is None:
        raise BrnError("say how long to train: --steps N or --epochs E")
    if config.steps is not None and config.epochs is not None:
        raise BrnError("give --steps or --epochs, not both")
    if config.steps is not None and config.steps < 1:
        raise BrnError(f"--steps must be >= 1, got {config.steps}")
    if config.epochs is not None and not config.epochs > 0:
        raise BrnError(f"--epochs must be > 0, got {config.epochs}")
    if config.batch_size < 2:
        raise BrnError(
            f"--batch-size must be >= 2 (normalization needs more than one example), got {config.batch_size}"
        )
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise BrnError(f"--lr must be a positive number, got {config.lr}")
    if config.optimizer not in OPTIMIZERS:
        raise BrnError(f"--optimizer {config.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if config.weight_decay < 0:
        raise BrnError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise BrnError(f"--lr-schedule {config.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if config.warmup_steps < 0:
        raise BrnError(f"--warmup-steps must be >= 0, got {config.warmup_steps}")
    if not 0.0 < config.momentum <= 1.0:
        raise BrnError(f"--momentum (rate of the moving statistics) must be in (0, 1], got {config.momentum}")
    for name in ("eval_every", "save_every", "num_workers"):
        if getattr(config, name) < 0:
            raise BrnError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if config.log_every < 1:
        raise BrnError(f"--log-every must be >= 1, got {config.log_every}")
    if config.microbatch is not None:
        if config.microbatch < 2:
            raise BrnError(
                f"--microbatch must be >= 2 (a group of one has no variance), got {config.microbatch}"
            )
        if config.batch_size % config.microbatch:
            raise BrnError(
                f"--microbatch {config.microbatch} does not divide --batch-size {config.batch_size}"
            )
    if config.amp not in AMP_MODES:
        raise BrnError(f"--amp {config.amp!r}: expected one of {', '.join(AMP_MODES)}")
    from brn_cli.train.distributed import parse_stats_sync

    parse_stats_sync(config.stats_sync)
    if not config.dist_timeout > 0:
        raise BrnError(f"--dist-timeout must be > 0 seconds, got {config.dist_timeout}")
    if config.dmax_schedule is None and config.rmax_schedule.strip().lower() not in PRESET_SCHEDULES:
        from brn_cli.train.schedule import parse_schedule

        parse_schedule(config.rmax_schedule, kind="rmax")  # its own syntax error first, if it has one
        raise BrnError(
            f"--rmax-schedule {config.rmax_schedule!r} is not a preset, so give --dmax-schedule as well"
        )


def _rng_state(runtime: _Runtime) -> dict[str, Any]:
    """Every RNG the step can touch, as tensors and primitives (loads with weights_only=True)."""
    import numpy as np
    import torch

    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
        "cuda": None,
    }
    if runtime.is_cuda:
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], runtime: _Runtime) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if runtime.is_cuda and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _truncate_metrics(path: Path, step: int, *, eval_pending: bool = False) -> None:
    """Keep only the records up to `step` (those written before the checkpoint being resumed); without the
    validation record of `step` itself when the checkpoint was saved before that validation (it is redone)."""
    from brn_cli.storage.atomic import atomic_path
    from brn_cli.train.curves import read_metrics

    kept = [
        r
        for r in read_metrics(path)
        if int(r.get("step", 0)) < step
        or (int(r.get("step", 0)) == step and not (eval_pending and r.get("kind") == "eval"))
    ]
    with atomic_path(path, force=True) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def _write_json(path: Path, obj: Any) -> None:
    from brn_cli.storage.atomic import atomic_path

    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Resume: the run's settings, and what a resume call may change
# ----------------------------------------------------------------------------------------------


def _resume_path(config: FinetuneConfig) -> Path:
    """RUNDIR/last.pt of --resume RUNDIR; one line when there is none."""
    run_dir = Path(config.resume)
    last = run_dir / LAST
    if not run_dir.is_dir():
        raise BrnError(f"--resume {run_dir}: no such run directory")
    if not last.is_file():
        raise BrnError(f"--resume {run_dir}: no {LAST} there to resume from")
    return last


def _given_fields(config: FinetuneConfig) -> set[str]:
    """The fields a resume call sets: the list it passes (the CLI: its command line), else the
    RESUME_OVERRIDABLE ones that differ from the defaults (a library caller keeps the run's other values)."""
    if config.resume_overrides is not None:
        return set(config.resume_overrides)
    defaults = FinetuneConfig(checkpoint="", data="", output="")
    return {k for k in RESUME_OVERRIDABLE if getattr(config, k) != getattr(defaults, k)}


def _same_setting(name: str, given: Any, recorded: Any) -> bool:
    if name == "checkpoint":  # the same file, however the path is spelled
        return bool(given) and bool(recorded) and Path(given).resolve() == Path(recorded).resolve()
    return given == recorded


def _resumed_config(config: FinetuneConfig, recorded: dict[str, Any]) -> FinetuneConfig:
    """On --resume: the run's own settings (`recorded`, from last.pt) and what this call may change.

    Given again, a RESUME_OVERRIDABLE option takes its new value; `data` may name the run's data at a new
    location (checked to be the same data once loaded: :func:`_check_same_data`); RESUME_LOADING is the
    loader's business; any other option must repeat the run's value, or it would silently be ignored.
    """
    run_dir = Path(config.resume)
    if config.output and Path(config.output).resolve() != run_dir.resolve():
        raise BrnError(
            f"-o {config.output} differs from --resume {run_dir}; a resumed run stays in its folder"
        )
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    given = _given_fields(config)
    fixed = given - set(RESUME_OVERRIDABLE) - set(RESUME_LOADING) - set(_RESUME_STRUCTURAL) - {"data"}
    for name in sorted(fixed):
        if name not in defaults:
            continue
        value, before = getattr(config, name), recorded.get(name, defaults[name])
        if not _same_setting(name, value, before):
            flag = "CHECKPOINT" if name == "checkpoint" else f"--{name.replace('_', '-')}"
            raise BrnError(
                f"{flag} {value} cannot change on --resume: the run in {run_dir} used {before} "
                f"(see its {CONFIG})"
            )
    # Structural keys always come from this call; the rest only when given, so an option left out on
    # --resume keeps the run's value (e.g. its --save-every) instead of silently taking the default.
    keys = given | {"resume", "output", "force"}
    overrides = {k: getattr(config, k) for k in RESUME_OVERRIDABLE if k in keys}
    if config.data:
        overrides["data"] = config.data
    specs = _resume_specs(config, recorded, run_dir / LAST)
    return FinetuneConfig.from_dict({**recorded, **overrides, **specs, "output": str(run_dir)})


def _resume_specs(config: FinetuneConfig, recorded: dict[str, Any], last: Path) -> dict[str, Any]:
    """The run's architecture, data and --trust-pickle as a resume may use them. A spec read from last.pt
    names code, so it is used only when brn may build it from a file (a known builder; data that is a path,
    not package.module:callable); anything else must be given again. --trust-pickle comes only from `config`
    (the command line)."""
    from brn_cli.storage.checkpoint import check_builder_kwargs, check_recorded_arch, check_recorded_data

    specs: dict[str, Any] = {"trust_pickle": bool(config.trust_pickle)}
    recorded_arch, recorded_kwargs = recorded.get("arch"), recorded.get("arch_kwargs")
    if config.arch is not None:  # named by the user; the run's kwargs go with the same spec
        specs["arch"], specs["arch_kwargs"] = config.arch, config.arch_kwargs
        if not config.arch_kwargs and recorded_kwargs and config.arch == recorded_arch:
            where = f"{last}: recorded arch"
            specs["arch_kwargs"] = check_builder_kwargs(config.arch, recorded_kwargs, where=where)
    elif recorded_arch is not None:
        specs["arch"], kwargs = check_recorded_arch(recorded_arch, recorded_kwargs, path=last)
        specs["arch_kwargs"] = kwargs or None
    if not config.data:
        specs["data"] = check_recorded_data(recorded.get("data"), path=last)
    return specs


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
    while hasattr(source, "base"):  # brn's wrappers: augmentation, normalization, --val-split subsets
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


def _data_fingerprint(bundle: Any) -> dict[str, Any]:
    """What identifies a run's data (recorded in last.pt and config.json): per split, the number of
    examples, the count of each label and a content hash (see :func:`_content_hash`)."""
    return {
        "train": _split_record(bundle.train, bundle.train_labels),
        "val": _split_record(bundle.val, bundle.val_labels),
    }


def _check_same_data(
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
    what = f"--data {spec}" if given else f"the run's data {spec}"
    if recorded is None:
        if given and note:
            sys.stderr.write(
                f"note: {run_dir} recorded no fingerprint of its data (an older brn): cannot check that "
                f"{spec} is the data it trained on\n"
            )
        return
    for split, name in (("train", "training"), ("val", "validation")):
        before, now = recorded.get(split), current.get(split)
        if (before is None) != (now is None):
            which = (
                f"it has no {name} set, the run's had one"
                if now is None
                else f"it has a {name} set, the run's had none"
            )
            raise BrnError(f"{what} is not the data this run trained on: {which}")
        if before is None:
            continue
        if before["examples"] != now["examples"]:
            raise BrnError(
                f"{what} is not the data this run trained on: {now['examples']} {name} examples, "
                f"the run had {before['examples']}"
            )
        if before["label_counts"] != now["label_counts"]:
            raise BrnError(
                f"{what} is not the data this run trained on: other label counts in the {name} set"
            )
        if before["sha256"] == now["sha256"]:
            continue
        if split == "train":
            raise BrnError(
                f"{what} is not the data this run trained on: the {name} set has the same size and labels "
                f"but other content ({now['hashed']} differ)"
            )
        if note:
            sys.stderr.write(
                f"note: {what}: the validation set has the run's size and labels but other content; "
                "the best.pt so far was chosen on the old one\n"
            )


# ----------------------------------------------------------------------------------------------
# The run folder: locked while a process trains in it; its files appear with the first checkpoint
# ----------------------------------------------------------------------------------------------


def _refuse_inputs_among_outputs(config: FinetuneConfig, run_dir: Path) -> None:
    """A fresh run replaces RUNDIR's own files: its CHECKPOINT must not be one of them."""
    source = Path(config.checkpoint).resolve()
    for name in RUN_FILES:
        if (run_dir / name).resolve() == source:
            raise BrnError(
                f"CHECKPOINT {config.checkpoint} is the {name} of the run folder {run_dir}, which this run "
                "would replace: copy it out of the folder first, or write the new run to another folder"
            )


def _check_run_dir_free(config: FinetuneConfig, run_dir: Path) -> None:
    """Under the lock: a fresh run needs an empty folder, or --force (see :class:`_RunFiles`)."""
    for name in RUN_FILES:  # temporaries of saves killed midway
        remove_stale_temps(run_dir / name)
    occupied = [p.name for p in run_dir.iterdir() if p.name != LOCK_NAME]
    if occupied and not config.force:
        raise BrnError(f"output folder {run_dir} is not empty; pass --resume {run_dir} or --force")


def _prepare_run_dir(config: FinetuneConfig, resuming: bool, held: contextlib.ExitStack) -> Path:
    """Create and lock RUNDIR for a fresh run (a resumed run's folder is locked already). Deletes nothing."""
    run_dir = Path(config.output)
    if run_dir.exists() and not run_dir.is_dir():
        raise BrnError(f"output {run_dir} exists and is not a directory")
    if resuming:
        return run_dir
    _refuse_inputs_among_outputs(config, run_dir)
    ensure_output_dir(run_dir)
    held.enter_context(folder_lock(run_dir, what="run folder"))
    _check_run_dir_free(config, run_dir)
    return run_dir


class _RunFiles:
    """metrics.jsonl and config.json of a run, which appear with its first checkpoint.

    Until then the metric records wait in memory, and an old run's files (--force) stay as they were, so a
    run that fails before saving anything leaves the folder as it found it: reusable without --force, the
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
        from brn_cli.storage.atomic import atomic_path

        with atomic_path(self.metrics_path, force=True) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.pending), encoding="utf-8")
        _write_json(self.run_dir / CONFIG, self.record)
        for old in (LAST, BEST, CURVES):  # an old run's, replaced by this one
            if old not in self.written:
                (self.run_dir / old).unlink(missing_ok=True)
        self.pending.clear()
        self.started = True


def _nonfinite_tensors(model, names: set[str] | None = None) -> list[str]:
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
# Model, optimizer, loader
# ----------------------------------------------------------------------------------------------


def _load_model(config: FinetuneConfig, source: str):
    """The model from `source` with every BatchNorm converted to Batch Renorm at the configured momentum."""
    from brn_cli.nn.convert import convert_batchnorm
    from brn_cli.nn.layer import BatchRenormNd
    from brn_cli.storage.checkpoint import load_checkpoint

    ckpt = load_checkpoint(
        source, arch=config.arch, arch_kwargs=config.arch_kwargs, trust_pickle=config.trust_pickle
    )
    if ckpt.arch_spec is None:
        raise BrnError(
            f"{Path(source).name} is a pickled module: pass --arch too, so that the run's checkpoints "
            "record an architecture they can be rebuilt from"
        )
    model = ckpt.model
    if not any(isinstance(m, BatchRenormNd) for m in model.modules()):
        # A plain BatchNorm model: convert on the fly. A brn checkpoint keeps the user's choice of layers.
        model = convert_batchnorm(model, momentum=config.momentum)
    layers = [m for m in model.modules() if isinstance(m, BatchRenormNd)]
    if not layers:
        raise BrnError(f"{Path(source).name}: the model has no BatchNorm layers with running statistics")
    for layer in layers:  # brn checkpoints keep their own momentum: the run's --momentum wins
        layer.momentum = float(config.momentum)
        layer.microbatch = config.microbatch
    return model, ckpt, len(layers)


def _make_optimizer(model, config: FinetuneConfig):
    """SGD (Nesterov, momentum 0.9) / AdamW / RMSProp. No weight decay on biases and norm parameters."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise BrnError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=SGD_MOMENTUM, nesterov=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    # RMSProp as the paper's Inception run used it (decay 0.9, eps 1.0 in TF's convention is too large here)
    return torch.optim.RMSprop(groups, lr=config.lr, alpha=0.9, momentum=0.9, eps=1e-3)


def _make_loader(dataset, batches: list[list[int]], runtime: _Runtime, num_workers: int):
    """A DataLoader over precomputed index lists (one per step).

    It gets a private generator: a DataLoader without one draws its worker seed from the global torch RNG
    each time it is iterated, and a resumed run iterates once more (mid-epoch) than an uninterrupted one.
    """
    import torch

    from brn_cli.data.samplers import make_loader

    loader = make_loader(dataset, batches, num_workers=num_workers, pin_memory=runtime.is_cuda)
    loader.generator = torch.Generator().manual_seed(0)
    return loader


# ----------------------------------------------------------------------------------------------
# Signals: SIGINT / SIGTERM finish the current step, save, and exit
# ----------------------------------------------------------------------------------------------


class _StopRequest:
    """Installs SIGINT/SIGTERM handlers (main thread only) that ask the loop to stop after this step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now (atomic writes leave nothing partial)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def run_finetune(config: FinetuneConfig, *, progress: bool = True) -> FinetuneResult:
    """Fine-tune `config.checkpoint` on `config.data`, writing RUNDIR (see the module docstring).

    Returns the final and best metrics. Raises BrnError on bad input and FinetuneInterrupted (after saving
    last.pt) on SIGINT / SIGTERM. RUNDIR is locked until this returns (see :func:`brn_cli.storage.atomic.folder_lock`).
    """
    with contextlib.ExitStack() as held:
        return _run_finetune(config, progress=progress, held=held)


def _run_finetune(config: FinetuneConfig, *, progress: bool, held: contextlib.ExitStack) -> FinetuneResult:
    import torch
    import torch.nn.functional as F

    from brn_cli.data.augment import AugmentedDataset
    from brn_cli.data.datasets import fit_data_to_model, load_data
    from brn_cli.data.samplers import LabelBatchSampler, eval_loader, parse_sampler
    from brn_cli.data.specs import preprocessing_record
    from brn_cli.evaluation.evaluate import evaluate
    from brn_cli.nn.layer import collect_telemetry
    from brn_cli.storage.checkpoint import make_brn_checkpoint, save_checkpoint_dict
    from brn_cli.train.schedule import RenormScheduler, parse_schedule

    t_start = time.time()
    # ---- settings: a fresh run takes `config`; a resumed run takes its own saved settings -------------
    resume_state = None
    data_given = bool(config.data)
    if config.resume:
        last_path = _resume_path(config)
        try:
            saved = torch.load(last_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BrnError(f"--resume: cannot read {last_path} ({type(exc).__name__})") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("training"), dict):
            raise BrnError(f"--resume: {last_path} is not a brn finetune checkpoint")
        resume_state = saved["training"]
        config = _resumed_config(config, resume_state["config"])
    _validate(config)
    sampler_mode = parse_sampler(config.sampler)
    runtime = _make_runtime(config)
    dist_ctx = runtime.dist
    if resume_state is not None:  # one process at a time continues a run (rank 0 holds the lock)
        problem = None
        if runtime.is_main:
            try:
                held.enter_context(folder_lock(config.output, what="run folder"))
            except BrnError as exc:
                problem = str(exc)
        problem = dist_ctx.broadcast_object(problem)
        if problem is not None:
            raise BrnError(problem)
    if resume_state is not None and int(resume_state.get("world_size", 1)) != runtime.world_size:
        # Resume on another world size: keep the GLOBAL batch, so data order and schedules carry on.
        global_batch = config.batch_size * int(resume_state.get("world_size", 1))
        if global_batch % runtime.world_size:
            raise BrnError(
                f"--resume: the run's global batch {global_batch} does not split over "
                f"{runtime.world_size} processes"
            )
        config = dataclasses.replace(config, batch_size=global_batch // runtime.world_size)
        _validate(config)
    if config.amp == "fp16" and not runtime.is_cuda and runtime.is_main:
        sys.stderr.write(
            "note: --amp fp16 on a CPU runs, but is usually slower than fp32 there; it is meant for GPUs\n"
        )
    # ---- data ----------------------------------------------------------------------------------------
    data = load_data(
        config.data,
        val_split=config.val_split,
        normalize=config.normalize,
        seed=config.seed,
        image_size=config.image_size,
        resize_size=config.resize_size,
        augment=config.augment,
        channels=config.channels,
    )
    fingerprint = _data_fingerprint(data)
    if resume_state is not None:
        _check_same_data(
            resume_state.get("data_fingerprint"),
            fingerprint,
            config.data,
            given=data_given,
            run_dir=Path(config.output),
            note=runtime.is_main,
        )
    sampler = LabelBatchSampler(
        data.train_labels,
        config.batch_size,
        sampler_mode,
        seed=config.seed,
        num_replicas=runtime.world_size,
        rank=runtime.rank,
    )
    batches_per_epoch = len(sampler)
    total_steps = config.steps or max(1, math.ceil(config.epochs * batches_per_epoch))
    val_loader = None
    if data.val is not None and len(data.val) > 0:
        val_set = data.val
        if runtime.world_size > 1:  # each rank evaluates a shard; the sums are all-reduced
            val_set = torch.utils.data.Subset(
                data.val, range(runtime.rank, len(data.val), runtime.world_size)
            )
        val_loader = eval_loader(val_set, max(config.batch_size, 256), num_workers=config.num_workers)
        val_loader.generator = torch.Generator().manual_seed(0)  # see _make_loader

    # ---- model, optimizer, schedules -----------------------------------------------------------------
    source = str(Path(config.resume) / LAST) if resume_state is not None else config.checkpoint
    model, loaded, n_layers = _load_model(config, source)
    fit_data_to_model(model, data)  # channels and classes checked before anything is written
    # What every save checks: entries finite now must stay finite (a model may keep, say, a -inf mask).
    finite_at_start = set(model.state_dict()) - set(_nonfinite_tensors(model))
    model.to(runtime.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    from brn_cli.train.distributed import configure_stats_sync

    sync_report = configure_stats_sync(model, config.stats_sync, dist_ctx)
    if runtime.is_main and runtime.world_size > 1:
        sys.stderr.write(
            f"distributed: {runtime.world_size} processes ({dist_ctx.backend}), --stats-sync "
            f"{config.stats_sync}, global batch {config.batch_size * runtime.world_size}\n"
        )
        if sync_report.note():
            sys.stderr.write(f"note: {sync_report.note()}\n")
    optimizer = _make_optimizer(model, config)
    rmax_spec = config.rmax_schedule
    dmax_spec = config.dmax_schedule if config.dmax_schedule is not None else config.rmax_schedule
    # renorm.step counts applied optimizer updates (its post-hook): lr, rmax and dmax all follow it
    renorm = RenormScheduler(
        model,
        parse_schedule(rmax_spec, kind="rmax", total_steps=total_steps),
        parse_schedule(dmax_spec, kind="dmax", total_steps=total_steps),
        optimizer=optimizer,
    )
    scaler = torch.amp.GradScaler(runtime.device.type) if config.amp == "fp16" else None
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
    forward = runtime.wrap(torch.compile(model) if config.compile else model)

    # ---- run folder: prepared only now, after every input has been checked, so a bad input leaves nothing
    problem = None
    if runtime.is_main:  # one rank checks and prepares the folder (others would race on its contents)
        try:
            _prepare_run_dir(config, resuming=resume_state is not None, held=held)
        except BrnError as exc:
            problem = str(exc)
    problem = dist_ctx.broadcast_object(problem)
    if problem is not None:
        raise BrnError(problem)
    run_dir = Path(config.output)

    # ---- state: fresh or restored --------------------------------------------------------------------
    step, epoch, batch_index = 0, 0, 0
    window = {"loss": 0.0, "correct": 0.0, "count": 0.0, "steps": 0}
    best: dict[str, Any] = {}
    files = _RunFiles(
        run_dir,
        {**config.to_dict(), "data_fingerprint": fingerprint},
        enabled=runtime.is_main,
        started=resume_state is not None,
    )
    metrics_path = files.metrics_path
    eval_pending = False  # last.pt was saved before the validation of its step, which is still to come
    if resume_state is None:
        _seed_everything(config.seed)
    else:
        step = int(resume_state["step"])
        epoch, batch_index = int(resume_state["epoch"]), int(resume_state["batch_index"])
        optimizer.load_state_dict(resume_state["optimizer"])
        renorm.load_state_dict(resume_state["renorm_schedule"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        window = dict(resume_state["window"])
        best = dict(resume_state.get("best") or {})
        _set_rng_state(resume_state["rng"], runtime)
        eval_pending = bool(resume_state.get("eval_pending")) and val_loader is not None
        if runtime.is_main:
            _truncate_metrics(metrics_path, step, eval_pending=eval_pending)
    resumed_from = step if resume_state is not None else None
    rmax, dmax = renorm.apply()

    def training_state(pending: bool) -> dict[str, Any]:
        return {
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch,
            "batch_index": batch_index,
            "optimizer": optimizer.state_dict(),
            "lr_schedule": {
                "kind": config.lr_schedule,
                "base_lr": config.lr,
                "warmup_steps": config.warmup_steps,
                "total_steps": total_steps,
            },
            "renorm_schedule": renorm.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _rng_state(runtime),
            "window": dict(window),
            "best": dict(best),
            "config": config.to_dict(),
            "world_size": runtime.world_size,
            "data_fingerprint": fingerprint,
            "eval_pending": pending,
        }

    saved_at: dict[str, int] = {}

    def last_good() -> str:
        """Where the run can be picked up after a failure (every save checked its weights first)."""
        if LAST in saved_at:
            return f"{run_dir / LAST} (step {saved_at[LAST]}) is the last good checkpoint"
        if resumed_from is not None:
            return f"{run_dir / LAST} (step {resumed_from}) is the last good checkpoint"
        return "no checkpoint was saved"

    def save(name: str, *, pending: bool = False) -> None:
        """Called by every rank: buffers must agree across ranks; rank 0 writes. Never writes a non-finite
        weight or statistic (every rank sees the same values, so every rank raises). `pending`: the
        validation of this step is still to come (a resumed run does it first)."""
        from brn_cli.train.distributed import average_batchnorm_buffers, check_buffers_equal

        average_batchnorm_buffers(model, dist_ctx)
        check_buffers_equal(model, dist_ctx)
        broken = _nonfinite_tensors(model, finite_at_start)
        if broken:
            more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
            raise BrnError(
                f"weights became non-finite by step {step} ({broken[0]}{more}), so {name} was not written; "
                f"{last_good()}; lower --lr or relax the schedule more slowly"
            )
        if not runtime.is_main:
            saved_at[name] = step
            return
        ckpt = make_brn_checkpoint(
            model,
            input_shape=[2, *data.sample_shape],
            command="finetune",
            **{
                **loaded.lineage(),
                "preprocessing": preprocessing_record(
                    config.normalize, config.image_size, config.resize_size
                ),
            },
            training=training_state(pending),
        )
        save_checkpoint_dict(ckpt, run_dir / name, force=True)
        saved_at[name] = step
        files.saved(name)

    log = files.log

    def run_eval() -> dict[str, Any]:
        from brn_cli.train.distributed import average_batchnorm_buffers, stats_sync_suspended

        average_batchnorm_buffers(model, dist_ctx)
        with stats_sync_suspended(model):  # shards differ in length: no collective inside a forward
            result = evaluate(
                model, val_loader, device=runtime.device, amp=config.amp, channels_last=config.channels_last
            )
        model.train()
        n = result.examples
        val_loss, correct, n = dist_ctx.sum([result.loss * n, result.accuracy * n, float(n)])
        return {"step": step, "val_loss": val_loss / max(n, 1), "val_accuracy": correct / max(n, 1)}

    def validate() -> None:
        """Inference-mode validation of this step; a better one becomes best.pt."""
        nonlocal last_eval, best
        last_eval = {"kind": "eval", **run_eval()}
        log(last_eval)
        # Every rank decides (the metrics are all-reduced, so identically): save() is collective.
        if not best or last_eval["val_accuracy"] > best["val_accuracy"]:
            best = {k: v for k, v in last_eval.items() if k != "kind"}
            save(BEST)
        bar.show(last_train, last_eval)

    def fold_window() -> None:
        """Add the device-side sums since the last fold to the window, summed over ranks. Every step's loss
        is in the sum, so one non-finite loss shows here: at each log line, each save and the last step."""
        nonlocal seen, folded_at
        totals = dist_ctx.sum([float(loss_sum), float(correct_sum), float(seen)])
        if not math.isfinite(totals[0]):
            where = (
                f"at step {step}" if folded_at + 1 >= step else f"between steps {folded_at + 1} and {step}"
            )
            raise BrnError(
                f"training loss became {totals[0]} {where}; {last_good()}; lower --lr or relax the schedule "
                "more slowly"
            )
        folded_at = step
        window["loss"] += totals[0]
        window["correct"] += totals[1]
        window["count"] += totals[2]
        loss_sum.zero_()
        correct_sum.zero_()
        seen = 0

    def last_checkpoint() -> str | None:  # this run's (with --force, an old run's last.pt may be there)
        return str(run_dir / LAST) if LAST in saved_at or resumed_from is not None else None

    # ---- progress display (main process only) ---------------------------------------------------------
    bar = _Progress(enabled=progress and runtime.is_main, total=total_steps, start=step)
    last_train: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    loss_sum = torch.zeros((), device=runtime.device)  # summed on the device: no sync per step
    correct_sum = torch.zeros((), device=runtime.device)
    seen = 0
    folded_at = step  # the step of the last fold_window (its loss sums were finite)

    # ---- the loop: one iteration = one optimizer step ------------------------------------------------
    from brn_cli.train.distributed import peer_failures

    with _StopRequest() as stop, bar, peer_failures(dist_ctx, last_checkpoint):
        if eval_pending:  # last.pt was saved before the validation of its step: do it now
            validate()
        while step < total_steps and stop.signum is None:
            sampler.set_epoch(epoch)
            if isinstance(data.train, AugmentedDataset):  # before the loader: workers get a copy
                data.train.set_epoch(epoch)
            batches = list(sampler)[batch_index:]
            for x, y in _make_loader(data.train, batches, runtime, config.num_workers):
                x = x.to(runtime.device, non_blocking=True)
                y = y.to(runtime.device, non_blocking=True)
                if config.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                lr = lr_at(
                    renorm.step,
                    base_lr=config.lr,
                    total_steps=total_steps,
                    warmup_steps=config.warmup_steps,
                    kind=config.lr_schedule,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # forward / backward / update
                with torch.autocast(
                    runtime.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
                ):
                    logits = forward(x)
                    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                        raise BrnError(
                            "finetune expects the model to return class logits [N, classes]; got "
                            + (
                                f"shape {list(logits.shape)}"
                                if isinstance(logits, torch.Tensor)
                                else type(logits).__name__
                            )
                        )
                    loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                # renorm.step (updates) advanced inside optimizer.step, unless the scaler skipped it
                step += 1
                batch_index += 1
                rmax, dmax = renorm.values()

                # bookkeeping on the device; synced only at log time
                loss_sum += loss.detach() * y.shape[0]
                correct_sum += (logits.detach().argmax(1) == y).sum()
                seen += y.shape[0]
                window["steps"] += 1
                bar.advance(step)

                if step % config.log_every == 0 or step == total_steps:
                    fold_window()
                    train_loss = window["loss"] / max(window["count"], 1)
                    last_train = {
                        "kind": "train",
                        "step": step,
                        "epoch": epoch,
                        "loss": train_loss,
                        "accuracy": window["correct"] / max(window["count"], 1),
                        "lr": lr,
                        "rmax": rmax,
                        "dmax": dmax,
                        "skipped_updates": step - renorm.step,
                        **collect_telemetry(model),
                    }
                    window = {"loss": 0.0, "correct": 0.0, "count": 0.0, "steps": 0}
                    log(last_train)
                    bar.show(last_train, last_eval)

                if runtime.world_size > 1:  # a signal on any rank stops every rank after this same step
                    any_signal = int(dist_ctx.max(float(stop.signum or 0)))
                    if any_signal and stop.signum is None:
                        stop.signum = any_signal
                stopping = stop.signum is not None or step >= total_steps
                eval_due = val_loader is not None and (
                    (config.eval_every and step % config.eval_every == 0) or step == total_steps
                )
                if (config.save_every and step % config.save_every == 0) or stopping:
                    # Saved before validating: a validation that fails loses no training (resume redoes it).
                    # Fold the unsynced device sums into the window so that resume sees them.
                    fold_window()
                    save(LAST, pending=bool(eval_due))
                if eval_due:
                    validate()
                    if step >= total_steps:  # the finished run's last.pt knows its final validation
                        save(LAST)
                if stopping:
                    break
            else:  # the epoch ran out: next one from its first batch
                epoch += 1
                batch_index = 0

    # ---- wrap up --------------------------------------------------------------------------------------
    with peer_failures(dist_ctx, last_checkpoint):
        if saved_at.get(LAST) != step:  # a signal arrived between epochs
            save(LAST)
        if val_loader is None and step >= total_steps:
            best = {"step": step, "note": "no validation data: best.pt is the final model"}
            save(BEST)
        dist_ctx.barrier()  # no rank leaves (and tears down the group) while another still saves
    if runtime.is_main:
        _plot_curves(metrics_path, run_dir / CURVES)
    if runtime.world_size > 1:
        from brn_cli.train.distributed import shutdown

        shutdown(dist_ctx)
    if stop.signum is not None and step < total_steps:
        name = signal.Signals(stop.signum).name
        raise FinetuneInterrupted(
            f"{name} at step {step}/{total_steps}: saved {run_dir / LAST}; continue with --resume {run_dir}",
            stop.signum,
        )
    final = {
        "step": step,
        "train_loss": last_train.get("loss"),
        "train_accuracy": last_train.get("accuracy"),
        "val_loss": last_eval.get("val_loss"),
        "val_accuracy": last_eval.get("val_accuracy"),
        "rmax": rmax,
        "dmax": dmax,
        "skipped_updates": step - renorm.step,
        "renorm_layers": n_layers,
    }
    return FinetuneResult(
        run_dir=str(run_dir),
        steps=step,
        final=final,
        best=best,
        metrics_path=str(metrics_path),
        resumed_from=resumed_from,
        device=str(runtime.device),
        seconds=time.time() - t_start,
        files=sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")),
    )


def _plot_curves(metrics_path: Path, out_png: Path) -> None:
    from brn_cli.train.curves import plot_runs

    with contextlib.suppress(ValueError):  # nothing logged yet: no figure
        plot_runs({"finetune": metrics_path}, out_png)


class _Progress:
    """Rich progress bar with a live line: loss, accuracy, lr, rmax/dmax, clip fractions, validation."""

    def __init__(self, *, enabled: bool, total: int, start: int) -> None:
        self.enabled = enabled
        self.total = total
        self.start = start
        self._progress = None
        self._task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]finetune"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("finetune", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def show(self, train: dict[str, Any], val: dict[str, Any]) -> None:
        if self._progress is None or not train:
            return
        parts = [
            f"loss {train['loss']:.4f}",
            f"acc {100 * train['accuracy']:.1f}%",
            f"lr {train['lr']:.3g}",
            f"rmax {train['rmax']:.3g} dmax {train['dmax']:.3g}",
        ]
        if "r_clip_frac" in train:
            parts.append(f"clip r {100 * train['r_clip_frac']:.0f}% d {100 * train['d_clip_frac']:.0f}%")
        if val:
            parts.append(f"val {100 * val['val_accuracy']:.1f}%")
        self._progress.update(self._task, info="  ".join(parts))
