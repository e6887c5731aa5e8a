"""Tests of `brn finetune`: exact resume after SIGKILL, signals, microbatches, the paper's non-i.i.d. effect.

The model is `tiny_cnn` below (arch spec ``test_finetune:tiny_cnn``; subprocesses get this folder on
PYTHONPATH). The "user's existing checkpoint" is a plain BatchNorm state_dict trained briefly on i.i.d.
batches of the bundled MNIST digits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brn_cli.data.datasets import load_data
from brn_cli.data.samplers import LabelBatchSampler
from brn_cli.errors import BrnError
from brn_cli.nn.layer import BatchRenormNd
from brn_cli.samples import SAMPLE_DATA
from brn_cli.train.finetune import FinetuneConfig, lr_at, run_finetune

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
ARCH = "test_finetune:tiny_cnn"


def tiny_cnn(num_classes: int = 10, width: int = 8, dropout: float = 0.0) -> nn.Module:
    """Two strided conv-BN-ReLU stages, a Linear-BN1d-ReLU hidden layer, a linear classifier (~28k params)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(2 * width * 49, 32, bias=False),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, num_classes),
    )


def _pretrain(path: Path, *, seed: int, steps: int, dropout: float = 0.0) -> float:
    """The user's BatchNorm model: SGD on i.i.d. batches; returns its inference-mode val accuracy.

    One thread, so the starting point is the same on every machine (see test_grouped_batches_...)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain_one_thread(path, seed=seed, steps=steps, dropout=dropout)
    finally:
        torch.set_num_threads(threads)


def _pretrain_one_thread(path: Path, *, seed: int, steps: int, dropout: float) -> float:
    torch.manual_seed(seed)
    data = load_data(str(SAMPLE_DATA))
    model = tiny_cnn(dropout=dropout)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = LabelBatchSampler(data.train_labels, 32, "iid", seed=seed)
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        epoch += 1
        for idx in sampler:
            x, y = data.train.x[idx], data.train.y[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    model.eval()
    with torch.no_grad():
        acc = (model(data.val.x).argmax(1) == data.val.y).float().mean().item()
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, path)
    return acc


@pytest.fixture(scope="module")
def bn_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pre") / "bn.pt"
    acc = _pretrain(path, seed=0, steps=200)
    assert acc > 0.85  # a working model to start from
    return path


@pytest.fixture(scope="module")
def bn_checkpoint_dropout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pre_dropout") / "bn_dropout.pt"
    _pretrain(path, seed=1, steps=50, dropout=0.2)
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO), env.get("PYTHONPATH", "")])
    return env


def _cli(*args: str, **kw) -> list[str]:
    return [sys.executable, "-m", "brn_cli", "finetune", *args]


def _resume_args(ckpt: Path, out: Path) -> list[str]:
    # Dropout (python RNG via torch), grouped batches, AdamW state, a warm-up: all must survive a kill.
    return [
        str(ckpt),
        "--data",
        str(SAMPLE_DATA),
        "-o",
        str(out),
        "--arch",
        ARCH,
        "--arch-kwargs",
        '{"dropout": 0.2}',
        "--steps",
        "250",
        "--batch-size",
        "32",
        "--sampler",
        "grouped:8",
        "--optimizer",
        "adamw",
        "--lr",
        "0.003",
        "--warmup-steps",
        "20",
        "--save-every",
        "5",
        "--log-every",
        "5",
        "--eval-every",
        "100",
        "--json",
    ]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _saved_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["training"]["step"])
    except Exception:  # not there yet
        return None


def _train_records(run: Path) -> list[dict]:
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"
    ]


@pytest.fixture(scope="module")
def uninterrupted_run(bn_checkpoint_dropout, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    proc = subprocess.run(
        _cli(*_resume_args(bn_checkpoint_dropout, out)), env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["steps"] == 250
    return out


def _start_and_wait(args: list[str], out: Path, min_step: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        _cli(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        step = _saved_step(out / "last.pt")
        if step is not None and step >= min_step:
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no last.pt at step >= {min_step} appeared: {proc.communicate()[1]}")


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(uninterrupted_run, bn_checkpoint_dropout, tmp_path):
    out = tmp_path / "killed"
    proc = _start_and_wait(_resume_args(bn_checkpoint_dropout, out), out, min_step=20)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _saved_step(out / "last.pt")
    assert killed_at is not None and killed_at < 250, "the run finished before it could be killed"

    resumed = subprocess.run(
        _cli("--resume", str(out), "--arch", ARCH, "--json"), env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from"] == killed_at

    a, b = _state(uninterrupted_run / "last.pt"), _state(out / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # metrics.jsonl reads as if the run had never stopped (train loss/accuracy of every logged window).
    ra, rb = _train_records(uninterrupted_run), _train_records(out)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(5, 251, 5))
    for x, y in zip(ra, rb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["accuracy"] == y["accuracy"]
    assert (out / "curves.png").stat().st_size > 0 and (out / "best.pt").is_file()


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(uninterrupted_run, bn_checkpoint_dropout, tmp_path):
    out = tmp_path / "term"
    proc = _start_and_wait(_resume_args(bn_checkpoint_dropout, out), out, min_step=10)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143
    lines = [ln for ln in stderr.splitlines() if ln.startswith("brn:")]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in stderr
    stopped_at = _saved_step(out / "last.pt")
    assert stopped_at is not None and 10 <= stopped_at < 250
    # The signal checkpoint is a valid resume point too.
    resumed = subprocess.run(
        _cli("--resume", str(out), "--arch", ARCH, "--json"), env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = _state(uninterrupted_run / "last.pt"), _state(out / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_run_folder_contents_and_checkpoints(uninterrupted_run):
    from brn_cli.storage.checkpoint import load_checkpoint

    names = {p.name for p in uninterrupted_run.iterdir()}
    assert {"last.pt", "best.pt", "metrics.jsonl", "config.json", "curves.png"} <= names
    config = json.loads((uninterrupted_run / "config.json").read_text())
    assert config["sampler"] == "grouped:8" and config["steps"] == 250
    raw = torch.load(uninterrupted_run / "last.pt", map_location="cpu", weights_only=True)  # no pickle
    training = raw["training"]
    assert training["step"] == 250 and training["optimizer"]["state"]
    assert {"torch", "numpy", "python"} <= set(training["rng"])
    assert training["renorm_schedule"]["step"] == 250
    best_raw = torch.load(uninterrupted_run / "best.pt", map_location="cpu", weights_only=True)
    assert best_raw["arch"] == {"spec": ARCH, "kwargs": {"dropout": 0.2}}
    # A test module's arch is not allow-listed, so it is named again; its kwargs come from the file.
    loaded = load_checkpoint(uninterrupted_run / "best.pt", arch=ARCH)
    assert loaded.arch_kwargs == {"dropout": 0.2}
    layers = [m for m in loaded.model.modules() if isinstance(m, BatchRenormNd)]
    assert len(layers) == 3 and all(m.momentum == 0.01 for m in layers)
    evals = [
        r
        for r in map(json.loads, (uninterrupted_run / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "eval"
    ]
    assert [r["step"] for r in evals] == [100, 200, 250]
    best = torch.load(uninterrupted_run / "best.pt", map_location="cpu", weights_only=True)["training"]
    assert best["best"]["val_accuracy"] == max(r["val_accuracy"] for r in evals)
    # paper-scaled relaxes the limits: by the end rmax > 1 and dmax > 0, and telemetry was recorded.
    last = _train_records(uninterrupted_run)[-1]
    assert last["rmax"] > 1 and last["dmax"] > 0 and 0 <= last["r_clip_frac"] <= 1


def test_microbatch_groups_are_normalized_separately(bn_checkpoint, tmp_path, monkeypatch):
    """With momentum 1 one step leaves the first layer's sigma = mean over groups of each group's sigma_B."""
    import brn_cli.nn.layer as layer_mod

    calls = []
    original = layer_mod._microbatch_renorm

    def spy(x, *args, **kwargs):
        calls.append((x.shape[0], args[8]))  # (batch, microbatch): args are weight, bias, ..., microbatch
        return original(x, *args, **kwargs)

    monkeypatch.setattr(layer_mod, "_microbatch_renorm", spy)
    cfg = FinetuneConfig(
        checkpoint=str(bn_checkpoint),
        data=str(SAMPLE_DATA),
        output=str(tmp_path / "mb"),
        arch=ARCH,
        steps=1,
        microbatch=4,
        momentum=1.0,
        seed=3,
    )
    run_finetune(cfg, progress=False)
    assert calls and all(c == (32, 4) for c in calls) and len(calls) == 3  # every renorm layer, groups of 4

    # Recompute what the first layer saw: conv1 of the first batch, statistics per group of 4.
    data = load_data(str(SAMPLE_DATA), seed=3)
    sampler = LabelBatchSampler(data.train_labels, 32, "iid", seed=3)
    sampler.set_epoch(0)
    first = next(iter(sampler))
    model = tiny_cnn()
    model.load_state_dict(torch.load(bn_checkpoint, weights_only=True)["model_state_dict"])
    with torch.no_grad():
        h = model[0](data.train.x[first]).double()  # conv1 output, before any update
    groups = h.reshape(8, 4, *h.shape[1:])
    group_sigma = torch.sqrt(groups.var(dim=(1, 3, 4), unbiased=False) + 1e-5)  # [8, C]
    whole_sigma = torch.sqrt(h.var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    saved = _state(tmp_path / "mb" / "last.pt")
    sigma_after = torch.sqrt(saved["1.running_var"].double() + 1e-5)
    assert torch.allclose(sigma_after, group_sigma.mean(0), rtol=1e-4)
    assert not torch.allclose(sigma_after, whole_sigma, rtol=1e-2)  # per-group, not whole-batch, statistics


@pytest.mark.slow
@pytest.mark.science
def test_grouped_batches_renorm_beats_batchnorm_in_inference(bn_checkpoint, tmp_path, one_thread):
    """The paper's section 4.3 on MNIST: batches of 2 labels x 16 examples (grouped:16).

    Both fine-tunes start from the same i.i.d.-trained BatchNorm model with the same data order, optimizer
    (SGD, constant lr 0.1) and length; only the rmax/dmax schedule differs. BatchNorm (``off``) learns to
    classify relative to its 2-label batch and its inference-mode accuracy collapses; renorm
    (``paper-scaled``: batchnorm for the first 1/8 of the run, then relaxing to rmax 3, dmax 5) trains the
    function it uses at inference. Measured locally at 1000 steps: seed 0 off 0.40 / renorm 0.80
    (this test), seed 1 0.73 / 0.93, seed 2 0.77 / 0.94; batchnorm's batch-statistics training accuracy
    0.3-0.6 vs renorm's 0.95+. The inference gap is noisy across seeds (constant lr 0.1 makes batchnorm's
    running statistics jump), so the test fixes seed 0 and one thread (with 2 threads seed 0 measured
    0.11 / 0.91: the trajectory, not the conclusion, depends on the reduction order).
    """
    results = {}
    for schedule in ("off", "paper-scaled"):
        cfg = FinetuneConfig(
            checkpoint=str(bn_checkpoint),
            data=str(SAMPLE_DATA),
            output=str(tmp_path / schedule),
            arch=ARCH,
            steps=1000,
            lr=0.1,
            lr_schedule="constant",
            sampler="grouped:16",
            rmax_schedule=schedule,
            seed=0,
            log_every=50,
        )
        results[schedule] = run_finetune(cfg, progress=False).final
    off, renorm = results["off"]["val_accuracy"], results["paper-scaled"]["val_accuracy"]
    assert renorm >= 0.75, results
    assert renorm - off >= 0.15, results
    # The telltale of the collapse: batchnorm's own (batch-statistics) training accuracy stays low too.
    assert results["off"]["train_accuracy"] < results["paper-scaled"]["train_accuracy"] - 0.2


# ----------------------------------------------------------------------------------------------
# Options and errors
# ----------------------------------------------------------------------------------------------


def test_lr_schedule_shapes():
    kw = {"base_lr": 1.0, "total_steps": 110, "warmup_steps": 10}
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0) and lr_at(60, **kw) == pytest.approx(0.5)
    assert lr_at(60, **kw, kind="linear") == pytest.approx(0.5) and lr_at(109, **kw, kind="constant") == 1.0
    assert lr_at(110, **kw) == pytest.approx(0.0, abs=1e-12)


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True)


def _cli_error_cases(bn_checkpoint: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    """Bad `brn finetune` arguments and the words their one-line error must contain."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    base = [str(bn_checkpoint), "--data", str(SAMPLE_DATA), "--arch", ARCH, "--steps", "2"]
    cases = [
        (base + ["-o", str(busy)], "not empty"),
        (
            base + ["-o", str(tmp_path / "a"), "--device", "cuda:7" if torch.cuda.is_available() else "cuda"],
            "CUDA",
        ),
        (base + ["-o", str(tmp_path / "b"), "--microbatch", "5"], "does not divide"),
        (base + ["-o", str(tmp_path / "c"), "--epochs", "1"], "not both"),
        (base + ["-o", str(tmp_path / "d"), "--optimizer", "lion"], "--optimizer"),
        (
            [str(bn_checkpoint), "--data", str(SAMPLE_DATA), "-o", str(tmp_path / "e"), "--steps", "2"],
            "--arch",
        ),
        (["--resume", str(busy), "--lr", "0.5"], "no last.pt there"),
        (["--resume", str(tmp_path / "nothing")], "no such run directory"),
    ]
    return cases


def test_cli_errors_are_one_line(bn_checkpoint, tmp_path, run_cli):
    for args, needle in _cli_error_cases(bn_checkpoint, tmp_path):
        res = run_cli("finetune", *args)
        assert res.code == 2, (args, res.err)
        assert len(res.err_lines) == 1 and needle in res.err_lines[0], (args, res.err)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


@pytest.mark.slow
def test_cli_errors_are_one_line_through_python_m_brn_cli(bn_checkpoint, tmp_path):
    """The same cases through the real entry point, one process each (the in-process twin is the fast one)."""
    for args, needle in _cli_error_cases(bn_checkpoint, tmp_path):
        proc = _run_cli(args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_unwritable_run_dir(bn_checkpoint, tmp_path):
    # A path below a regular file cannot be created by anyone (root included): one clear BrnError.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = FinetuneConfig(
        checkpoint=str(bn_checkpoint), data=str(SAMPLE_DATA), output=str(blocker / "run"), arch=ARCH, steps=1
    )
    with pytest.raises(BrnError, match="cannot create output folder"):
        run_finetune(cfg, progress=False)
    cfg.output = str(blocker)
    with pytest.raises(BrnError, match="not a directory"):
        run_finetune(cfg, progress=False)


@pytest.mark.slow
def test_force_restarts_and_off_schedule_keeps_batchnorm(bn_checkpoint, tmp_path):
    out = tmp_path / "run"
    cfg = FinetuneConfig(
        checkpoint=str(bn_checkpoint),
        data=str(SAMPLE_DATA),
        output=str(out),
        arch=ARCH,
        steps=6,
        rmax_schedule="off",
        log_every=3,
    )
    run_finetune(cfg, progress=False)
    with pytest.raises(BrnError, match="not empty"):
        run_finetune(cfg, progress=False)
    cfg.force = True
    cfg.steps = 3
    result = run_finetune(cfg, progress=False)
    records = _train_records(out)
    assert [r["step"] for r in records] == [3]  # a fresh run: the old metrics are gone
    assert records[0]["rmax"] == 1.0 and records[0]["dmax"] == 0.0
    assert records[0]["r_clip_frac"] >= 0 and result.best["step"] == 3
    assert np.isfinite(result.final["train_loss"])


@pytest.mark.slow
def test_resume_keeps_the_runs_options_unless_given_again(bn_checkpoint, tmp_path, run_cli):
    """An option left out on --resume keeps the run's value; one given on the command line replaces it."""
    out = tmp_path / "run"
    first = [str(bn_checkpoint), "--data", str(SAMPLE_DATA), "-o", str(out), "--arch", ARCH]
    result = run_cli("finetune", *first, "--steps", "4", "--save-every", "2", "--eval-every", "2")
    assert result.code == 0, result.err

    def used_config() -> dict:
        return torch.load(out / "last.pt", map_location="cpu", weights_only=True)["training"]["config"]

    result = run_cli("finetune", "--resume", str(out), "--arch", ARCH)
    assert result.code == 0, result.err
    assert used_config()["save_every"] == 2 and used_config()["eval_every"] == 2
    result = run_cli("finetune", "--resume", str(out), "--arch", ARCH, "--eval-every", "1")
    assert result.code == 0, result.err
    assert used_config()["save_every"] == 2 and used_config()["eval_every"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sampler", "grouped:500"], "not a multiple of K=500"),
        (["--batch-size", "9000"], "batch larger than the data"),
        (["--rmax-schedule", "5k:3,1k:2"], "steps must increase"),
        (["--rmax-schedule", "0.5"], "rmax must be >= 1"),
        (["--dmax-schedule", "-1", "--rmax-schedule", "3"], "dmax"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "cuda"),
    ],
)
def test_bad_input_leaves_no_run_folder(bn_checkpoint, tmp_path, run_cli, args, message):
    out = tmp_path / "run"
    base = [str(bn_checkpoint), "--data", str(SAMPLE_DATA), "-o", str(out), "--arch", ARCH, "--steps", "2"]
    result = run_cli("finetune", *base, *args)
    assert result.code == 2 and len(result.err_lines) == 1, result.err
    assert message in result.err_lines[0].lower() or message in result.err_lines[0]
    assert "Traceback" not in result.err
    assert not out.exists()


@pytest.mark.slow
def test_compile_matches_eager_while_the_limits_ramp(bn_checkpoint, tmp_path, one_thread):
    """--compile gives the eager run's weights while rmax/dmax change at every step (no baked-in limits, no
    stale r/d in the backward)."""
    states = {}
    for compiled in (False, True):
        cfg = FinetuneConfig(
            checkpoint=str(bn_checkpoint),
            data=str(SAMPLE_DATA),
            output=str(tmp_path / f"compile-{compiled}"),
            arch=ARCH,
            steps=6,
            lr=0.05,
            sampler="grouped:8",
            rmax_schedule="0:1,1:2,6:3",
            dmax_schedule="0:0,1:1,6:4",
            momentum=0.2,
            compile=compiled,
            log_every=1,
        )
        run_finetune(cfg, progress=False)
        states[compiled] = _state(tmp_path / f"compile-{compiled}" / "last.pt")
        records = _train_records(tmp_path / f"compile-{compiled}")
        assert [r["rmax"] for r in records][-1] == 3.0 and max(r["r_clip_frac"] for r in records) > 0
    for key, value in states[False].items():
        torch.testing.assert_close(states[True][key], value, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.slow
def test_evaluate_and_calibrate_use_the_normalization_the_run_recorded(bn_checkpoint, tmp_path, run_cli):
    """A run fine-tuned on normalized inputs records it; evaluate and calibrate apply it unless told otherwise."""
    out = tmp_path / "run"
    norm = "0.13,0.31"
    args = [str(bn_checkpoint), "--data", str(SAMPLE_DATA), "-o", str(out), "--arch", ARCH, "--steps", "3"]
    assert run_cli("finetune", *args, "--normalize", norm).code == 0
    assert torch.load(out / "best.pt", weights_only=True)["preprocessing"] == {"normalize": norm}

    def accuracy(*extra: str) -> tuple[float, str]:
        result = run_cli(
            "evaluate", str(out / "best.pt"), "--data", str(SAMPLE_DATA), "--arch", ARCH, "--json", *extra
        )
        assert result.code == 0, result.err
        return json.loads(result.out)["inference"]["accuracy"], result.err

    recorded, note = accuracy()
    assert accuracy("--normalize", norm)[0] == recorded and "as recorded in best.pt" in note
    assert accuracy("--normalize", "none")[0] != recorded
    cal = tmp_path / "cal.pt"
    result = run_cli(
        "calibrate", str(out / "best.pt"), "--data", str(SAMPLE_DATA), "--arch", ARCH, "-o", str(cal)
    )
    assert result.code == 0, result.err
    assert torch.load(cal, weights_only=True)["preprocessing"] == {"normalize": norm}


class _InfGradient(torch.autograd.Function):
    """Identity forward; an all-inf gradient backward (what an fp16 overflow looks like to a GradScaler)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class InfGradientFirst(nn.Sequential):
    """tiny_cnn (same state_dict keys) whose first `bad` training forwards get inf gradients; with `term_at`,
    the process sends itself SIGTERM during that training forward (as a user stopping the run would)."""

    def __init__(self, bad: int = 2, term_at: int = 0, **kwargs) -> None:
        super().__init__(*tiny_cnn(**kwargs))
        self.bad, self.term_at, self.forwards = bad, term_at, 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.forwards += 1
            if self.forwards == self.term_at:
                os.kill(os.getpid(), signal.SIGTERM)
            if self.bad > 0:
                self.bad -= 1
                out = _InfGradient.apply(out)
        return out


def test_fp16_skipped_updates_do_not_advance_the_schedules(bn_checkpoint, tmp_path, one_thread):
    """--amp fp16 (GradScaler; on the CPU here): a step whose gradients overflow changes no weight and moves
    neither lr nor rmax/dmax; the scaler's state is saved and restored on resume; statistics stay fp32."""
    from brn_cli.train.finetune import FinetuneInterrupted

    out = tmp_path / "run"
    cfg = FinetuneConfig(
        checkpoint=str(bn_checkpoint),
        data=str(SAMPLE_DATA),
        output=str(out),
        arch="test_finetune:InfGradientFirst",
        arch_kwargs={"term_at": 6},
        steps=9,
        amp="fp16",
        lr=0.01,
        warmup_steps=4,
        lr_schedule="constant",
        rmax_schedule="0:1,4:3",
        dmax_schedule="0:0,4:2",
        log_every=1,
        eval_every=0,
    )
    with pytest.raises(FinetuneInterrupted):  # SIGTERM during step 6: saved at step 6
        run_finetune(cfg, progress=False)
    records = _train_records(out)
    assert [r["skipped_updates"] for r in records] == [1, 2, 2, 2, 2, 2]
    # The limits and lr logged at step s were set for updates = s - skipped: two iterations behind.
    assert [r["rmax"] for r in records] == [1.0, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert [r["dmax"] for r in records] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]
    assert [round(r["lr"], 6) for r in records] == [0.0025, 0.0025, 0.0025, 0.005, 0.0075, 0.01]
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["training"]["step"] == 6 and saved["training"]["renorm_schedule"]["step"] == 4
    assert saved["training"]["scaler"]["scale"] == 2.0**14  # 2^16 halved once per overflow
    assert all(
        v.dtype == torch.float32
        for k, v in saved["state_dict"].items()
        if "running" in k or k.endswith("weight")
    )
    # The resumed run builds a new model, which overflows twice more: the scale halves from the SAVED value.
    resume = FinetuneConfig(checkpoint="", data="", output="", resume=str(out), arch=cfg.arch)
    result = run_finetune(resume, progress=False)
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["training"]["scaler"]["scale"] == 2.0**12
    assert saved["training"]["renorm_schedule"]["step"] == 9 - 4
    assert [r["skipped_updates"] for r in _train_records(out)] == [1, 2, 2, 2, 2, 2, 3, 4, 4]
    assert result.final["rmax"] == 3.0  # rmax(5): held flat after the last knot


@pytest.mark.slow
def test_augmented_run_resumes_exactly_with_other_workers(bn_checkpoint, tmp_path, one_thread):
    """--augment crop-flip: stopped at step 5 (SIGTERM) and resumed with 2 DataLoader workers, the run ends
    with the weights of an uninterrupted run without workers (each example's crop is seeded by
    (seed, epoch, index), not by a worker's or the process's RNG)."""
    from brn_cli.train.finetune import FinetuneInterrupted

    def config(out: Path, term_at: int) -> FinetuneConfig:
        return FinetuneConfig(
            checkpoint=str(bn_checkpoint),
            data=str(SAMPLE_DATA),
            output=str(out),
            arch="test_finetune:InfGradientFirst",
            arch_kwargs={"bad": 0, "term_at": term_at},
            steps=8,
            batch_size=16,
            lr=0.05,
            augment="crop-flip",
            log_every=2,
        )

    straight = run_finetune(config(tmp_path / "straight", 0), progress=False)
    stopped = tmp_path / "stopped"
    with pytest.raises(FinetuneInterrupted):
        run_finetune(config(stopped, 5), progress=False)
    assert torch.load(stopped / "last.pt", weights_only=True)["training"]["step"] == 5
    arch = "test_finetune:InfGradientFirst"  # the run's arch and kwargs, named again (not allow-listed)
    resume = FinetuneConfig(checkpoint="", data="", output="", resume=str(stopped), num_workers=2, arch=arch)
    resume.resume_overrides = ["num_workers"]
    resumed = run_finetune(resume, progress=False)
    assert resumed.resumed_from == 5 and resumed.steps == 8
    a, b = _state(tmp_path / "straight" / "last.pt"), _state(stopped / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "augmented resume is not exact"
    assert straight.final["train_loss"] == resumed.final["train_loss"]
    # The augmentation did something: the same run without it ends elsewhere.
    plain = config(tmp_path / "plain", 0)
    plain.augment = "none"
    run_finetune(plain, progress=False)
    c = _state(tmp_path / "plain" / "last.pt")
    assert not all(torch.equal(a[k], c[k]) for k in a)
