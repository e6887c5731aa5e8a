"""The options of a fine-tuning run, each declared once: its default, its help and its check.

:class:`FinetuneConfig` is the declaration. Every field carries metadata (:func:`option`): ``help`` (the
text the command line shows; other parameters in backticks, see :mod:`brn_cli.errors`), the checks
:func:`validate` applies (``minimum``, ``above``, ``choices``, ``finite``, with ``why`` and ``unit`` for the
message) and ``cli=False`` for a field no command-line option sets. The command line builds
its ``finetune`` options from these fields, so an option added here appears there with the same default.

The resume rules live here too: which options a ``resume`` may change (:data:`RESUME_OVERRIDABLE`), which
say how last.pt is read (:data:`RESUME_LOADING`), and :func:`resumed_config`, the run's own settings with
what the resuming call may change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from brn_cli.errors import BrnError
from brn_cli.tasks import DEFAULT_IGNORE_INDEX, EMBEDDING_LOSSES, TASKS, parse_recall_k

__all__ = [
    "AMP_MODES",
    "FinetuneConfig",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PRESET_SCHEDULES",
    "RESUME_LOADING",
    "RESUME_OVERRIDABLE",
    "SGD_MOMENTUM",
    "option",
    "resumed_config",
    "validate",
]

OPTIMIZERS = ("sgd", "adamw", "rmsprop")
LR_SCHEDULES = ("cosine", "linear", "constant", "step")
AMP_MODES = ("off", "bf16", "fp16")
AUGMENTS = ("none", "flip", "crop-flip")
PRESET_SCHEDULES = ("paper", "paper-scaled", "off")
# Options that may differ on resume: they change where and how often things happen, not the trajectory.
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
LAST, CONFIG = "last.pt", "config.json"


def option(default: Any, help: str = "", **meta: Any) -> Any:
    """A config field: its default, its help text and its checks (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclass
class FinetuneConfig:
    """Every option of a fine-tuning run; JSON-serialisable (written to RUNDIR/config.json)."""

    checkpoint: str = option(
        dataclasses.MISSING,
        "BatchNorm or brn checkpoint to fine-tune (BatchNorm layers are converted on the fly). "
        "Not needed with `resume`.",
    )
    data: str = option(
        dataclasses.MISSING,
        "Data: .npz (x_train, y_train[, x_val, y_val]), a folder with train/ and val/, "
        "or package.module:callable returning (train, val). With `resume`: the run's data at a new "
        "location (checked to be the same data).",
    )
    output: str = option(dataclasses.MISSING, "Run folder: last.pt, best.pt, metrics.jsonl, ...")
    arch: str | None = option(None, "Architecture for plain state_dicts (torchvision:NAME, timm:NAME, ...).")
    arch_kwargs: dict | None = option(None, "Keyword arguments for arch.")
    trust_pickle: bool = option(False, "Allow loading pickled Python objects.")
    steps: int | None = option(None, "Optimizer steps to run.", minimum=1)
    epochs: float | None = option(None, "Or: passes over the data.", above=0)
    batch_size: int = option(
        32, "Examples per step (per process).", minimum=2, why="normalization needs more than one example"
    )
    lr: float = option(0.01, "Peak learning rate.", above=0, finite=True)
    optimizer: str = option("sgd", "sgd (Nesterov 0.9), adamw or rmsprop.", choices=OPTIMIZERS)
    weight_decay: float = option(0.0, "Decoupled for adamw; not applied to biases/norms.", minimum=0)
    lr_schedule: str = option(
        "cosine",
        "cosine, linear, constant or step (x0.94 at 81 even steps: Inception-v3's decay scaled to the run), "
        "after warm-up.",
        choices=LR_SCHEDULES,
    )
    warmup_steps: int = option(0, "Linear LR warm-up steps.", minimum=0)
    momentum: float = option(0.01, "Rate of the moving mu/sigma (the paper's alpha).")
    rmax_schedule: str = option(
        "paper-scaled", "paper-scaled, paper, off (plain batchnorm), or STEP:VALUE,..."
    )
    # None: the same preset as rmax_schedule when that is a preset
    dmax_schedule: str | None = option(None, "As `rmax_schedule` (default: the same preset).")
    seed: int = option(0, "Seed of the data order, dropout and `val_split`.")
    eval_every: int = option(0, "Validate (inference mode) every N steps; 0: at the end.", minimum=0)
    save_every: int = option(0, "Write last.pt every N steps (0: at the end).", minimum=0)
    microbatch: int | None = option(
        None,
        "Normalize groups of K examples separately (paper section 4.2).",
        minimum=2,
        why="a group of one has no variance",
    )
    sampler: str = option("iid", "iid, or grouped:K (batch/K labels, K examples each; section 4.3).")
    val_split: float | None = option(None, "Hold out this fraction of train when there is no val set.")
    normalize: str | None = option(
        None, "MEAN,STD (or M1,M2,M3,S1,S2,S3) applied after /255; 'none' for none."
    )
    image_size: int | None = option(
        None, "ImageFolder data: center crop S x S after resizing the shorter side."
    )
    resize_size: int | None = option(None, "The shorter side before the image_size crop (None: S / 0.875).")
    channels: int | None = option(
        None, "Image folders: 1 or 3 (None: the model's first convolution decides)."
    )
    augment: str = option(
        "none",
        "Training images: none, flip, or crop-flip (random resized crop, then flip). Seeded per "
        "example and epoch, so resume and workers do not change it.",
    )
    task: str = option(
        "classification",
        "classification (labels), segmentation (class-map masks [H, W]) or embedding (metric learning: "
        "embeddings [N, D], labels).",
        choices=TASKS,
    )
    loss: str | None = option(
        None, "package.module:callable(output, target) -> scalar tensor: the loss instead of the task's."
    )
    metric: str | None = option(
        None, "package.module:callable(output, target) -> number or dict: the metric instead of the task's."
    )
    ignore_index: int = option(
        DEFAULT_IGNORE_INDEX, "Segmentation: the mask value of unlabelled pixels.", minimum=0
    )
    embedding_loss: str = option(
        "triplet", "Embedding: triplet (batch-hard) or contrastive.", choices=EMBEDDING_LOSSES
    )
    margin: float | None = option(
        None, "Embedding loss margin (default 0.2 for triplet, 0.5 for contrastive).", above=0
    )
    recall_k: str = option("1,5", "Embedding: the k of recall@k on the validation set.")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    amp: str = option(
        "off", "off, bf16 or fp16 (fp16: with a GradScaler; meant for GPUs).", choices=AMP_MODES
    )
    channels_last: bool = option(False, "NHWC memory format.")
    compile: bool = option(False, "torch.compile the training forward.")
    num_workers: int = option(0, "DataLoader worker processes.", minimum=0)
    force: bool = option(False, "Overwrite an existing output.")
    resume: str | None = option(None, "Continue the run in this folder exactly (its settings are kept).")
    log_every: int = option(10, "Steps per metrics.jsonl train record.", minimum=1)
    stats_sync: str = option(
        "global",
        "Several processes: global (batch statistics over all ranks) or local (each rank its own "
        "minibatch, moving averages shared; the paper's section 4).",
    )
    dist_timeout: float = option(
        300.0, "Seconds to wait for the other ranks before giving up.", above=0, unit=" seconds"
    )
    # On resume, which fields this config really sets (the CLI passes the options given on its command
    # line): RESUME_OVERRIDABLE ones replace the run's value, any other must repeat it. None: the
    # RESUME_OVERRIDABLE fields that differ from the defaults, the others keep the run's values. In both
    # cases a non-empty `data` may name the run's data at a new location (checked to be the same data).
    resume_overrides: list[str] | None = option(None, cli=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------------------------
# Validation: the checks declared on the fields, then the rules that relate several fields
# ----------------------------------------------------------------------------------------------


def _field_problem(name: str, value: Any, meta: dict[str, Any]) -> str | None:
    """What is wrong with one field's value by its declared checks, or None."""
    why = f" ({meta['why']})" if "why" in meta else ""
    unit = meta.get("unit", "")
    if "choices" in meta and value not in meta["choices"]:
        return f"{name} {value!r}: expected one of {', '.join(meta['choices'])}"
    if value is None or isinstance(value, str):
        return None
    if meta.get("finite") and not (value > 0 and math.isfinite(value)):
        return f"{name} must be a positive number, got {value}"
    if "minimum" in meta and value < meta["minimum"]:
        return f"{name} must be >= {meta['minimum']}{why}, got {value}"
    if "above" in meta and not value > meta["above"]:
        return f"{name} must be > {meta['above']}{unit}, got {value}"
    return None


def validate(config: FinetuneConfig) -> None:
    """Reject bad options with one clear line (BrnError naming the parameter) before any work is done."""
    if config.steps is None and config.epochs is None:
        raise BrnError("say how long to train: `steps` or `epochs`", param="steps")
    if config.steps is not None and config.epochs is not None:
        raise BrnError("give `steps` or `epochs`, not both", param="epochs")
    for f in dataclasses.fields(config):
        problem = _field_problem(f.name, getattr(config, f.name), f.metadata)
        if problem:
            raise BrnError(problem, param=f.name)
    if not 0.0 < config.momentum <= 1.0:
        raise BrnError(
            f"momentum (rate of the moving statistics) must be in (0, 1], got {config.momentum}",
            param="momentum",
        )
    if config.microbatch is not None and config.batch_size % config.microbatch:
        raise BrnError(
            f"microbatch {config.microbatch} does not divide `batch_size` {config.batch_size}",
            param="microbatch",
        )
    _validate_task(config)
    from brn_cli.train.distributed import parse_stats_sync

    parse_stats_sync(config.stats_sync)
    if config.dmax_schedule is None and config.rmax_schedule.strip().lower() not in PRESET_SCHEDULES:
        from brn_cli.train.schedule import parse_schedule

        parse_schedule(config.rmax_schedule, kind="rmax")  # its own syntax error first, if it has one
        raise BrnError(
            f"rmax_schedule {config.rmax_schedule!r} is not a preset, so give `dmax_schedule` as well",
            param="rmax_schedule",
        )


def _validate_task(config: FinetuneConfig) -> None:
    """The task's options: recall_k's syntax; a triplet loss needs batches with several examples per label."""
    parse_recall_k(config.recall_k)
    triplets = config.task == "embedding" and config.embedding_loss == "triplet" and config.loss is None
    if triplets and not config.sampler.strip().lower().startswith("grouped:"):
        raise BrnError(
            f"the triplet loss needs several examples of a label in every batch: pass `sampler=grouped:K` "
            f"(batch/K labels, K examples each), not {config.sampler!r}",
            param="sampler",
        )


def task_options(config: FinetuneConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`brn_cli.tasks.make_task` for this run."""
    return {
        "name": config.task,
        "loss": config.loss,
        "metric": config.metric,
        "ignore_index": config.ignore_index,
        "margin": config.margin,
        "embedding_loss": config.embedding_loss,
        "recall_k": config.recall_k,
    }


def task_data_options(config: FinetuneConfig) -> dict[str, Any]:
    """What load_data needs to know of the task (targets that are not one label per example)."""
    if config.task == "classification":
        return {}
    return {"task": config.task, "ignore_index": config.ignore_index}


# ----------------------------------------------------------------------------------------------
# Resume: the run's settings, and what a resume call may change
# ----------------------------------------------------------------------------------------------


def per_process_batch(config: FinetuneConfig, saved_world_size: int, world_size: int) -> int:
    """The batch of each of `world_size` processes continuing a run saved by `saved_world_size`: the global
    batch stays the same, so the data order and the schedules carry on."""
    global_batch = config.batch_size * saved_world_size
    if global_batch % world_size:
        raise BrnError(
            f"`resume`: the run's global batch {global_batch} does not split over {world_size} processes"
        )
    return global_batch // world_size


def data_options(config: FinetuneConfig) -> dict[str, Any]:
    """The data settings of a run, as load_data and check_data_spec take them (besides the spec itself)."""
    return {
        "val_split": config.val_split,
        "normalize": config.normalize,
        "image_size": config.image_size,
        "resize_size": config.resize_size,
        "channels": config.channels,
        "augment": config.augment,
    }


def resume_path(config: FinetuneConfig) -> Path:
    """RUNDIR/last.pt of resume=RUNDIR; one line when there is none."""
    run_dir = Path(config.resume)
    last = run_dir / LAST
    if not run_dir.is_dir():
        raise BrnError(f"resume {run_dir}: no such run directory", param="resume")
    if not last.is_file():
        raise BrnError(f"resume {run_dir}: no {LAST} there to resume from", param="resume")
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


def _check_fixed_settings(config: FinetuneConfig, recorded: dict[str, Any], given: set[str]) -> None:
    """An option given on resume that decides the trajectory must repeat the run's value."""
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    fixed = given - set(RESUME_OVERRIDABLE) - set(RESUME_LOADING) - set(_RESUME_STRUCTURAL) - {"data"}
    for name in sorted(fixed):
        if name not in defaults:
            continue
        value, before = getattr(config, name), recorded.get(name, defaults[name])
        if not _same_setting(name, value, before):
            raise BrnError(
                f"{name} {value} cannot change on resume: the run in {config.resume} used {before} "
                f"(see its {CONFIG})",
                param=name,
            )


def resumed_config(config: FinetuneConfig, recorded: dict[str, Any]) -> FinetuneConfig:
    """On resume: the run's own settings (`recorded`, from last.pt) and what this call may change.

    Given again, a RESUME_OVERRIDABLE option takes its new value; `data` may name the run's data at a new
    location (checked to be the same data once loaded: :func:`brn_cli.train.runfolder.check_same_data`);
    RESUME_LOADING is the loader's business; any other option must repeat the run's value, or it would
    silently be ignored.
    """
    run_dir = Path(config.resume)
    if config.output and Path(config.output).resolve() != run_dir.resolve():
        raise BrnError(
            f"output {config.output} differs from `resume` {run_dir}; a resumed run stays in its folder",
            param="output",
        )
    given = _given_fields(config)
    _check_fixed_settings(config, recorded, given)
    # Structural keys always come from this call; the rest only when given, so an option left out on
    # resume keeps the run's value (e.g. its save_every) instead of silently taking the default.
    keys = given | {"resume", "output", "force"}
    overrides = {k: getattr(config, k) for k in RESUME_OVERRIDABLE if k in keys}
    if config.data:
        overrides["data"] = config.data
    specs = _resume_specs(config, recorded, run_dir / LAST)
    return FinetuneConfig.from_dict({**recorded, **overrides, **specs, "output": str(run_dir)})


def _resume_specs(config: FinetuneConfig, recorded: dict[str, Any], last: Path) -> dict[str, Any]:
    """The run's architecture, data and trust_pickle as a resume may use them. A spec read from last.pt
    names code, so it is used only when brn may build it from a file (a known builder; data that is a path,
    not package.module:callable); anything else must be given again. trust_pickle comes only from `config`
    (the caller)."""
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
    for name in ("loss", "metric"):  # code named in the file: imported only when named again
        if recorded.get(name) and getattr(config, name) != recorded[name]:
            raise BrnError(
                f"the run in {config.resume} used its own {name} {recorded[name]}; name it again "
                f"(`{name}`) to resume (brn imports no code named only in a file)",
                param=name,
            )
        specs[name] = getattr(config, name)
    return specs
