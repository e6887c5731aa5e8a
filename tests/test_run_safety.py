"""No failure loses a run: inputs and old outputs survive until the new ones are complete, the final checkpoint
comes before the final validation, no checkpoint holds NaN weights, one process per run folder, and --resume
accepts the same options and the same data again.

Models are tiny (`test_finetune.tiny_cnn`, untrained) and the data a synthetic .npz of 40 + 20 digits-sized
images, so every run here takes a fraction of a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune import tiny_cnn
from torch import nn

from brn_cli.data.datasets import ArrayDataset
from brn_cli.errors import BrnError
from brn_cli.storage.atomic import write_atomic
from brn_cli.train.finetune import FinetuneConfig, run_finetune

ARCH = "test_finetune:tiny_cnn"
HERE = "test_run_safety"


def _digits(seed: int, n_train: int = 40, n_val: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 1, 28, 28), dtype=np.uint8),
        "y_train": np.tile(np.arange(10), n_train // 10),
        "x_val": rng.integers(0, 256, (n_val, 1, 28, 28), dtype=np.uint8),
        "y_val": np.tile(np.arange(10), n_val // 10),
    }


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "digits.npz"
    np.savez(path, **_digits(0))
    return path


@pytest.fixture
def bn_model(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "bn.pt"
    torch.save(tiny_cnn().state_dict(), path)
    return path


def _config(ckpt: Path, data: Path | str, out: Path, **kw) -> FinetuneConfig:
    settings = {"arch": ARCH, "steps": 2, "batch_size": 8, "lr": 0.01, "log_every": 1, **kw}
    return FinetuneConfig(checkpoint=str(ckpt), data=str(data), output=str(out), **settings)


def _resume(out: Path, *, data: str = "", arch: str = ARCH) -> FinetuneConfig:
    return FinetuneConfig(checkpoint="", data=data, output="", resume=str(out), arch=arch)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def _training(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["training"]


# ----------------------------------------------------------------------------------------------
# Models that fail on purpose
# ----------------------------------------------------------------------------------------------


class _NanGradient(torch.autograd.Function):
    """Identity forward; an all-NaN gradient (the loss stays finite, the update poisons every weight)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class Faulty(nn.Sequential):
    """tiny_cnn (same state_dict keys) that misbehaves at training forward number `at`: `raise` an error,
    return NaN logits (`nan_loss`), pass NaN gradients back (`nan_grad`), or wait for GATE (`wait`)."""

    def __init__(self, fault: str = "raise", at: int = 1, **kwargs) -> None:
        super().__init__(*tiny_cnn(**kwargs))
        self.fault, self.at, self.forwards = fault, at, 0

    def forward(self, x):
        out = super().forward(x)
        if not self.training:
            return out
        self.forwards += 1
        if self.forwards != self.at:
            return out
        if self.fault == "raise":
            raise RuntimeError("the model failed")
        if self.fault == "nan_loss":
            return out * float("nan")
        if self.fault == "nan_grad":
            return _NanGradient.apply(out)
        GATE.wait(timeout=60)
        return out


GATE = threading.Event()


class BrokenImages(torch.utils.data.Dataset):
    """A validation set whose labels read fine but whose every image fails to decode."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        raise OSError("image file is truncated")


def _arrays(seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    arrays = _digits(seed)
    to_x = lambda a: torch.from_numpy(a).float() / 255  # noqa: E731
    train = ArrayDataset(to_x(arrays["x_train"]), torch.from_numpy(arrays["y_train"]))
    val = ArrayDataset(to_x(arrays["x_val"]), torch.from_numpy(arrays["y_val"]))
    return train, val


def broken_val_data():
    train, val = _arrays(0)
    return train, BrokenImages(val.y)


def repaired_val_data():
    return _arrays(0)


# ----------------------------------------------------------------------------------------------
# --force never loses an input or the old run before the new one has something
# ----------------------------------------------------------------------------------------------


def test_force_refuses_an_input_the_run_would_overwrite(bn_model, data, tmp_path, run_cli):
    out = tmp_path / "run"
    run_finetune(_config(bn_model, data, out), progress=False)
    before = _snapshot(out)
    result = run_cli(
        "finetune", out / "best.pt", "--data", data, "-o", out, "--arch", ARCH, "--steps", "2",
        "--batch-size", "8", "--force",
    )  # fmt: skip
    assert result.code == 2 and len(result.err_lines) == 1, result.err
    assert "best.pt" in result.err_lines[0] and "copy it" in result.err_lines[0]
    assert _snapshot(out) == before


def test_force_keeps_the_old_run_until_the_new_one_saves(bn_model, data, tmp_path):
    out = tmp_path / "run"
    run_finetune(_config(bn_model, data, out, eval_every=1), progress=False)
    before = _snapshot(out)
    assert {"last.pt", "best.pt", "metrics.jsonl", "config.json"} <= set(before)
    failing = _config(bn_model, data, out, force=True, arch=f"{HERE}:Faulty", steps=4, save_every=2)
    with pytest.raises(RuntimeError, match="the model failed"):
        run_finetune(failing, progress=False)
    assert _snapshot(out) == before  # nothing of the old run deleted, nothing of the new one written
    # A --force run that saves replaces the whole old run: no file of the old run stays beside the new.
    failing.arch_kwargs = {"at": 3}
    with pytest.raises(RuntimeError, match="the model failed"):
        run_finetune(failing, progress=False)
    after = _snapshot(out)
    assert set(after) == {"last.pt", "metrics.jsonl", "config.json"}
    assert _training(out / "last.pt")["step"] == 2
    assert [json.loads(line)["step"] for line in after["metrics.jsonl"].decode().splitlines()] == [1, 2]


# ----------------------------------------------------------------------------------------------
# The final checkpoint is saved before the final validation
# ----------------------------------------------------------------------------------------------


def test_failed_final_validation_keeps_the_run_and_resume_redoes_it(bn_model, tmp_path):
    out = tmp_path / "run"
    cfg = _config(bn_model, f"{HERE}:broken_val_data", out, steps=3, save_every=0)
    with pytest.raises(Exception, match="truncated"):
        run_finetune(cfg, progress=False)
    training = _training(out / "last.pt")
    assert training["step"] == 3 and training["eval_pending"]
    assert not (out / "best.pt").exists()
    # The same data with the validation images repaired: the run resumes and validates its final model.
    result = run_finetune(_resume(out, data=f"{HERE}:repaired_val_data"), progress=False)
    assert result.resumed_from == 3 and result.steps == 3
    assert result.best["step"] == 3 and result.final["val_accuracy"] is not None
    assert (out / "best.pt").is_file() and not _training(out / "last.pt")["eval_pending"]


# ----------------------------------------------------------------------------------------------
# No checkpoint with non-finite weights; NaN caught between log steps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["nan_loss", "nan_grad"])
def test_nan_is_never_saved_nor_called_good(bn_model, data, tmp_path, fault):
    """NaN logits (a NaN loss) or NaN gradients (a finite loss, NaN weights after the update) at step 4, a
    save every 2 steps, a log line every 10: step 2 is the last good checkpoint, step 4 must not be saved."""
    out = tmp_path / "run"
    cfg = _config(bn_model, data, out, arch=f"{HERE}:Faulty", arch_kwargs={"fault": fault, "at": 4})
    cfg.steps, cfg.save_every, cfg.log_every = 8, 2, 10
    with pytest.raises(BrnError) as info:
        run_finetune(cfg, progress=False)
    message = str(info.value)
    assert "step" in message and "last.pt (step 2)" in message, message
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert saved["training"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_nan_before_any_checkpoint_says_none_was_saved(bn_model, data, tmp_path):
    out = tmp_path / "run"
    cfg = _config(bn_model, data, out, arch=f"{HERE}:Faulty", arch_kwargs={"fault": "nan_grad", "at": 1})
    cfg.steps, cfg.save_every, cfg.log_every = 4, 1, 10
    with pytest.raises(BrnError, match="no checkpoint was saved") as info:
        run_finetune(cfg, progress=False)
    assert "last good" not in str(info.value)
    assert not (out / "last.pt").exists()


# ----------------------------------------------------------------------------------------------
# One process per run folder
# ----------------------------------------------------------------------------------------------


def test_a_run_folder_in_use_refuses_a_second_process(bn_model, data, tmp_path, run_cli):
    out = tmp_path / "run"
    cfg = _config(bn_model, data, out, arch=f"{HERE}:Faulty", arch_kwargs={"fault": "wait", "at": 3})
    cfg.steps, cfg.save_every = 4, 1
    GATE.clear()
    errors: list[BaseException] = []

    def train() -> None:
        try:
            run_finetune(cfg, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    worker = threading.Thread(target=train)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not (out / "last.pt").exists() and time.monotonic() < deadline and worker.is_alive():
            time.sleep(0.01)
        result = run_cli("finetune", "--resume", out, "--arch", f"{HERE}:Faulty")
        assert result.code == 2 and len(result.err_lines) == 1, result.err
        assert str(out) in result.err_lines[0] and f"pid {os.getpid()}" in result.err_lines[0]
        fresh = run_cli(
            "finetune", bn_model, "--data", data, "-o", out, "--arch", ARCH, "--steps", "2", "--force"
        )
        assert fresh.code == 2 and "in use" in fresh.err, fresh.err
    finally:
        GATE.set()
        worker.join(timeout=60)
    assert not errors, errors
    assert _training(out / "last.pt")["step"] == 4
    # The lock dies with its holder: a lock file left by a process that is gone blocks nothing.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    from brn_cli.storage.atomic import LOCK_NAME

    (out / LOCK_NAME).write_text(dead.stdout.strip() + "\n")
    assert run_finetune(_resume(out, arch=f"{HERE}:Faulty"), progress=False).resumed_from == 4


# ----------------------------------------------------------------------------------------------
# --resume: the same values again, and the same data somewhere else
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_accepts_repeated_options_and_moved_data(bn_model, data, tmp_path, run_cli):
    out = tmp_path / "run"
    first = ["--data", data, "-o", out, "--arch", ARCH, "--steps", "2", "--batch-size", "8", "--lr", "0.02"]
    assert run_cli("finetune", bn_model, *first).code == 0
    same = run_cli("finetune", bn_model, "--resume", out, "--arch", ARCH, "--lr", "0.02", "--steps", "2")
    assert same.code == 0, same.err
    changed = run_cli("finetune", "--resume", out, "--arch", ARCH, "--lr", "0.5")
    assert changed.code == 2 and len(changed.err_lines) == 1 and "--lr" in changed.err_lines[0], changed.err

    moved = tmp_path / "elsewhere" / "digits.npz"
    moved.parent.mkdir()
    shutil.move(data, moved)
    result = run_cli("finetune", "--resume", out, "--arch", ARCH, "--data", moved)
    assert result.code == 0, result.err
    assert run_finetune(_resume(out, data=str(moved)), progress=False).resumed_from == 2

    other = tmp_path / "other.npz"
    np.savez(other, **_digits(1))  # same sizes and labels, other images
    refused = run_cli("finetune", "--resume", out, "--arch", ARCH, "--data", other)
    assert refused.code == 2 and len(refused.err_lines) == 1, refused.err
    assert "--data" in refused.err_lines[0] and "not the data" in refused.err_lines[0]
    smaller = tmp_path / "smaller.npz"
    np.savez(smaller, **_digits(0, n_train=30))
    refused = run_cli("finetune", "--resume", out, "--arch", ARCH, "--data", smaller)
    assert refused.code == 2 and "30" in refused.err_lines[0] and "40" in refused.err_lines[0], refused.err


def test_resume_of_a_run_without_a_data_hash_checks_what_it_can(bn_model, data, tmp_path, capsys):
    out = tmp_path / "run"
    run_finetune(_config(bn_model, data, out), progress=False)
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    del saved["training"]["data_fingerprint"]  # as written before runs recorded their data
    torch.save(saved, out / "last.pt")
    moved = tmp_path / "moved.npz"
    shutil.move(data, moved)
    capsys.readouterr()
    assert run_finetune(_resume(out, data=str(moved)), progress=False).resumed_from == 2
    assert "cannot check" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# A run that fails before its first checkpoint leaves a folder that can be used again
# ----------------------------------------------------------------------------------------------


def test_failure_before_the_first_checkpoint_leaves_the_folder_reusable(bn_model, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the model failed"):
        run_finetune(_config(bn_model, data, out, arch=f"{HERE}:Faulty"), progress=False)
    assert not out.exists()  # the folder the failed run created is gone again
    out.mkdir()
    with pytest.raises(RuntimeError, match="the model failed"):
        run_finetune(_config(bn_model, data, out, arch=f"{HERE}:Faulty"), progress=False)
    assert _snapshot(out) == {}  # a folder that was there stays, as it was
    result = run_finetune(_config(bn_model, data, out), progress=False)  # no --force needed
    assert result.steps == 2 and {"last.pt", "config.json", "metrics.jsonl"} <= set(result.files)


# ----------------------------------------------------------------------------------------------
# atomic.py: the umask, and temporary files of killed writers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = write_atomic(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = tmp_path / f".out.bin.{gone.stdout.strip()}.k1ll3d.tmp"
    alive = tmp_path / f".out.bin.{os.getppid()}.w0rk1n.tmp"  # a writer that still runs
    other = tmp_path / f".other.bin.{gone.stdout.strip()}.k1ll3d.tmp"  # another target's: not ours to judge
    for path in (dead, alive, other):
        path.write_bytes(b"partial")
    write_atomic(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"x"))
    assert not dead.exists() and alive.exists() and other.exists()
    assert (tmp_path / "out.bin").read_bytes() == b"x"


def test_an_image_folder_is_the_same_data_wherever_it_lies(tmp_path):
    """Image folders are fingerprinted by their files' relative paths and sizes: a moved copy matches, a
    training image replaced by another (of another size) does not."""
    from PIL import Image

    from brn_cli.data.datasets import load_data
    from brn_cli.train.runfolder import check_same_data as _check_same_data
    from brn_cli.train.runfolder import data_fingerprint as _data_fingerprint

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    recorded = _data_fingerprint(load_data(root))
    assert recorded["train"]["hashed"] == "file names and sizes" and recorded["train"]["examples"] == 4
    moved = shutil.copytree(root, tmp_path / "moved")
    check = {"given": True, "run_dir": tmp_path, "note": True}
    _check_same_data(recorded, _data_fingerprint(load_data(moved)), str(moved), **check)
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(moved / "train" / "a" / "0.png")
    with pytest.raises(BrnError, match="same size and labels but other content"):
        _check_same_data(recorded, _data_fingerprint(load_data(moved)), str(moved), **check)
