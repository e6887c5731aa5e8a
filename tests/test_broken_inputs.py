"""Broken inputs, one table: every (file kind, defect, command) case gives one clear line and loses nothing.

Each case runs the real CLI: ``brn_cli.cli.app.main`` in-process (the console script's code path without a fresh
torch import, captured at the file descriptors), some as ``python -m brn_cli`` in a subprocess (the real
entry point; a file-size limit there stands in for a full disk). Every case asserts:

* the exit code: 2, for bad input and for typer's usage errors alike;
* stderr is one line, ``brn: error: ...`` -- or, for a usage error, typer's own usage message (its
  ``Usage:`` and ``Try ... --help`` lines, then one ``Error: ...`` line) -- with no traceback, no Python
  warning (in-process they are recorded and counted as the stderr lines a user would see), no control
  characters, and nothing on stdout;
* that line names what is wrong: the file, the layer or the option (the case's ``needles``; a word saying
  what is wrong must appear outside the paths, which could hold it by accident);
* nothing was written or removed: the output folder (previous good outputs of each command and an old run)
  and every input are byte-for-byte, size- and mtime-identical afterwards, and the command a hostile
  checkpoint records as its architecture never ran.

The model is the bundled sample ``small_resnet`` (width 4, 10 classes) with non-trivial BatchNorm
statistics; the data are a slice of the bundled MNIST digits. Every broken file is made once per module.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import re
import struct
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from brn_cli.samples import SAMPLE_DATA

REPO = Path(__file__).resolve().parents[1]
ARCH_SPEC = "brn_cli.samples.models:small_resnet"
ARCH_KWARGS = {"num_classes": 10, "width": 4}
# Plain state_dicts need the architecture on the command line.
ARCH = ["--arch", ARCH_SPEC, "--arch-kwargs", json.dumps(ARCH_KWARGS)]
INPUT_SHAPE = [2, 1, 28, 28]
# A lock file is how a run folder is locked (flock on RUNDIR/.brn.lock); it is never deleted by design (a
# process may be waiting on its inode), so its appearance is not a change to the folder's contents.
LOCK_NAME = ".brn.lock"
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


# ----------------------------------------------------------------------------------------------
# The broken files (made once)
# ----------------------------------------------------------------------------------------------


def _sample_model() -> nn.Module:
    from brn_cli.storage.checkpoint import build_arch

    model = build_arch(ARCH_SPEC, dict(ARCH_KWARGS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _brn_dict(model: nn.Module) -> dict:
    """The brn checkpoint dict of `model` converted to Batch Renorm, as `brn convert` writes it."""
    from brn_cli.nn.convert import convert_batchnorm
    from brn_cli.storage.checkpoint import make_brn_checkpoint

    renorm = convert_batchnorm(copy.deepcopy(model), momentum=0.01)
    return make_brn_checkpoint(
        renorm, arch_spec=ARCH_SPEC, arch_kwargs=dict(ARCH_KWARGS), input_shape=INPUT_SHAPE, command="convert"
    )


def _save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(28 * 28).reshape(28, 28) * (value + 1) % 256).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path)


def _image_folder(root: Path, bad_split: str) -> Path:
    """train/ and val/ with the model's 10 classes; in `bad_split`, each class also holds a bad.png cut in
    half (one in every class, so that a short run meets one whatever order it draws)."""
    for split, count in (("train", 1), ("val", 1)):
        for label in range(ARCH_KWARGS["num_classes"]):
            for i in range(count):
                _png(root / split / str(label) / f"img{i}.png", 10 * label + i)
            if split == bad_split:
                bad = root / split / str(label) / "bad.png"
                _png(bad, 7)
                bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """name -> path of every input the table uses: good ones and broken ones."""
    root = tmp_path_factory.mktemp("broken_inputs")
    f: dict[str, Path] = {}
    model = _sample_model()
    state = model.state_dict()

    # Good inputs: a plain BatchNorm checkpoint, its brn conversion, a small slice of the sample digits.
    f["bn"] = root / "bn.pt"
    torch.save({"state_dict": state, "epoch": 1}, f["bn"])
    brn = _brn_dict(model)
    f["brn"] = root / "brn.pt"
    torch.save(brn, f["brn"])
    digits = np.load(SAMPLE_DATA)
    x_train, y_train = digits["x_train"][::20], digits["y_train"][::20]  # 200 examples, every class
    x_val, y_val = digits["x_val"][::10], digits["y_val"][::10]  # 100
    f["data"] = _save_npz(root / "data.npz", x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val)

    f["train_only_npz"] = _save_npz(root / "train_only.npz", x_train=x_train, y_train=y_train)

    # Checkpoints.
    f["empty_pt"] = root / "empty.pt"
    f["empty_pt"].write_bytes(b"")
    f["random_pt"] = root / "random.pt"
    f["random_pt"].write_bytes(random.Random(0).randbytes(4096))
    f["truncated_pt"] = root / "truncated.pt"
    whole = f["bn"].read_bytes()
    f["truncated_pt"].write_bytes(whole[: len(whole) // 2])
    f["legacy_pt"] = root / "legacy.pt"  # torch's pre-1.6 (non-zip) format, holding a Python object
    torch.save(
        {"state_dict": state, "args": argparse.Namespace(lr=0.1)},
        f["legacy_pt"],
        _use_new_zipfile_serialization=False,
    )
    f["module_pt"] = root / "module.pt"  # a whole pickled nn.Module
    torch.save(model, f["module_pt"])
    f["wrong_keys_pt"] = root / "wrong_keys.pt"
    torch.save({k.replace("layer1.", "block1."): v for k, v in state.items()}, f["wrong_keys_pt"])
    f["wrong_shapes_pt"] = root / "wrong_shapes.pt"  # the same architecture at width 8
    from brn_cli.storage.checkpoint import build_arch

    torch.save(build_arch(ARCH_SPEC, {**ARCH_KWARGS, "width": 8}).state_dict(), f["wrong_shapes_pt"])
    f["nan_var_pt"] = root / "nan_var.pt"
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["stem.1.running_var"][0] = float("nan")
    torch.save(nan_state, f["nan_var_pt"])
    f["nan_var_brn"] = root / "nan_var_brn.pt"
    bad = copy.deepcopy(brn)
    bad["state_dict"]["layer1.bn1.running_var"][0] = float("nan")
    torch.save(bad, f["nan_var_brn"])
    f["inf_var_brn"] = root / "inf_var_brn.pt"
    bad = copy.deepcopy(brn)
    bad["state_dict"]["layer2.bn2.running_var"][1] = float("inf")
    torch.save(bad, f["inf_var_brn"])
    f["eps0_brn"] = root / "eps0_brn.pt"
    bad = copy.deepcopy(brn)
    bad["renorm_layers"]["layer1.bn2"]["eps"] = 0.0
    torch.save(bad, f["eps0_brn"])
    f["huge_shape_brn"] = root / "huge_shape_brn.pt"
    bad = copy.deepcopy(brn)
    bad["input_shape"] = [4096, 3, 4096, 4096]  # 2e11 elements: 800 GB if allocated
    torch.save(bad, f["huge_shape_brn"])
    f["future_brn"] = root / "future_brn.pt"
    bad = copy.deepcopy(brn)
    bad["format_version"] = 999
    torch.save(bad, f["future_brn"])
    f["marker"] = root / "MARKER"  # must never exist: the hostile checkpoint's command would create it
    f["hostile_brn"] = root / "hostile_brn.pt"
    bad = copy.deepcopy(brn)
    bad["arch"] = {"spec": "os:system", "kwargs": {"command": f"touch {f['marker']}"}}
    torch.save(bad, f["hostile_brn"])
    f["download_brn"] = root / "download_brn.pt"  # a known builder, but asked to download weights
    bad = copy.deepcopy(brn)
    bad["arch"] = {"spec": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}
    torch.save(bad, f["download_brn"])
    f["no_weights_brn"] = root / "no_weights_brn.pt"
    bad = copy.deepcopy(brn)
    del bad["state_dict"]
    torch.save(bad, f["no_weights_brn"])
    f["bad_header_st"] = root / "bad_header.safetensors"
    header = b'{"stem.0.weight": {"dtype": "F32", "shape": [4, 1'  # JSON cut off
    f["bad_header_st"].write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    f["escape_keys_pt"] = root / "escape_keys.pt"  # key names that would drive the terminal or Rich markup
    hostile_key = "\x1b]0;owned\x07\x1b[2J[bold red]fc.weight[/]"
    torch.save({**state, hostile_key: torch.zeros(1)}, f["escape_keys_pt"])
    f["no_state_dict_pt"] = root / "no_state_dict.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "notes": "best so far"}, f["no_state_dict_pt"])

    # Data files.
    f["empty_npz"] = root / "empty.npz"
    f["empty_npz"].write_bytes(b"")
    f["no_ytrain_npz"] = _save_npz(root / "no_ytrain.npz", x_train=x_train, x_val=x_val, y_val=y_val)
    f["len_mismatch_npz"] = _save_npz(root / "len_mismatch.npz", x_train=x_train, y_train=y_train[:-10])
    ragged = np.empty(len(y_train), dtype=object)
    for i in range(len(ragged)):
        ragged[i] = x_train[i, 0, : 10 + i % 5]  # ragged rows: only an object array holds them
    f["object_npz"] = _save_npz(
        root / "object.npz", x_train=ragged, y_train=y_train, x_val=ragged, y_val=y_train
    )
    f["corrupt_npz"] = root / "corrupt.npz"
    whole = f["data"].read_bytes()
    f["corrupt_npz"].write_bytes(whole[: len(whole) // 3])
    many = np.arange(len(y_train)) % 15  # 15 classes for a 10-class model
    f["many_classes_npz"] = _save_npz(
        root / "many_classes.npz",
        x_train=x_train,
        y_train=many,
        x_val=x_val,
        y_val=np.arange(len(y_val)) % 15,
    )
    f["float_labels_npz"] = _save_npz(
        root / "float_labels.npz", x_train=x_train, y_train=y_train + 0.5, x_val=x_val, y_val=y_val + 0.5
    )
    negative = y_val.copy()
    negative[3] = -1
    f["negative_labels_npz"] = _save_npz(
        root / "negative_labels.npz", x_train=x_train, y_train=y_train, x_val=x_val, y_val=negative
    )
    nan_pixels = x_train.astype(np.float32) / 255
    nan_pixels[5, 0, 3, 3] = np.nan
    f["nan_pixels_npz"] = _save_npz(root / "nan_pixels.npz", x_train=nan_pixels, y_train=y_train)
    rgb = np.zeros((len(y_val), 3, 32, 32), dtype=np.uint8)
    f["rgb_npz"] = _save_npz(root / "rgb32.npz", x_train=rgb, y_train=y_val, x_val=rgb, y_val=y_val)
    f["images_bad_val"] = _image_folder(root / "images_bad_val", "val")
    f["images_bad_train"] = _image_folder(root / "images_bad_train", "train")
    f["empty_dir"] = root / "empty_dir"
    f["empty_dir"].mkdir()
    f["missing"] = root / "nonexistent.pt"
    f["missing_npz"] = root / "nonexistent.npz"
    return f


def _out_folder(tmp_path: Path, files: dict[str, Path]) -> Path:
    """The case's output folder: previous good outputs of each command and an old run with a damaged last.pt."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.pt").write_bytes(files["brn"].read_bytes())
    (out / "previous.onnx").write_bytes(b"previous good export " * 50)
    (out / "previous.png").write_bytes(b"\x89PNG previous plot " * 20)
    run = out / "oldrun"
    run.mkdir()
    whole = files["brn"].read_bytes()
    (run / "last.pt").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 10, "loss": 0.5}\n')
    return out


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    args: list[str]  # after `brn`; {name} is a path from `files`, {out} the output folder
    needles: list[str | tuple[str, ...]]  # each must be in the error line (a tuple: any one of them)
    code: int = 2
    subprocess: bool = False
    file_size_limit: int | None = None  # RLIMIT_FSIZE of the subprocess: a write beyond it fails (EFBIG)


def case(
    id: str,
    args: str | list[str],
    *needles,
    code: int = 2,
    sub: bool = False,
    file_size_limit: int | None = None,
):
    parts = args.split() if isinstance(args, str) else args
    sub = sub or file_size_limit is not None
    # A case run through `python -m brn_cli` pays for a fresh interpreter and torch import: slow tier.
    marks = [pytest.mark.slow] if sub else []
    return pytest.param(Case(parts, list(needles), code, sub, file_size_limit), id=id, marks=marks)


DATA = "--data {data}"
RUN = "-o {out}/newrun --steps 2"

CASES = [
    # ---- checkpoints: file kind x defect x command
    case("ckpt-empty-inspect", "inspect {empty_pt}", "empty.pt", "empty", sub=True),
    case("ckpt-empty-export-state-dict", "export state-dict {empty_pt} -o {out}/plain.pt", "empty.pt"),
    case("ckpt-random-bytes-convert", "convert {random_pt} -o {out}/new.pt", "random.pt"),
    case("ckpt-random-bytes-calibrate", f"calibrate {{random_pt}} {DATA} -o {{out}}/new.pt", "random.pt"),
    case(
        "ckpt-truncated-zip-evaluate",
        f"evaluate {{truncated_pt}} {DATA}",
        "truncated.pt",
        ("truncated", "damaged"),
    ),
    case("ckpt-truncated-zip-finetune", f"finetune {{truncated_pt}} {DATA} {RUN}", "truncated.pt"),
    case(
        "ckpt-legacy-pickle-inspect",
        "inspect {legacy_pt}",
        "legacy.pt",
        "--trust-pickle",
        "argparse",
        sub=True,
    ),
    case("ckpt-legacy-pickle-convert", "convert {legacy_pt} -o {out}/new.pt", "legacy.pt", "--trust-pickle"),
    case("ckpt-pickled-module-convert", "convert {module_pt} -o {out}/new.pt", "module.pt", "--trust-pickle"),
    case("ckpt-pickled-module-export-onnx", "export onnx {module_pt} -o {out}/model.onnx", "--trust-pickle"),
    case(
        "ckpt-wrong-keys-convert",
        ["convert", "{wrong_keys_pt}", *ARCH, "-o", "{out}/new.pt"],
        "wrong_keys.pt",
        "block1.",
    ),
    case(
        "ckpt-wrong-shapes-export-state-dict",
        ["export", "state-dict", "{wrong_shapes_pt}", *ARCH, "-o", "{out}/plain.pt"],
        "wrong_shapes.pt",
        "shape",
    ),
    case(
        "ckpt-nan-running-var-convert",
        ["convert", "{nan_var_pt}", *ARCH, "-o", "{out}/new.pt"],
        "stem.1",
        "NaN",
    ),
    case("ckpt-nan-running-var-brn-evaluate", f"evaluate {{nan_var_brn}} {DATA}", "layer1.bn1", "NaN"),
    case(
        "ckpt-nan-running-var-brn-export-onnx",
        "export onnx {nan_var_brn} -o {out}/model.onnx",
        "layer1.bn1",
        "NaN",
    ),
    case("ckpt-nan-running-var-brn-finetune", f"finetune {{nan_var_brn}} {DATA} {RUN}", "layer1.bn1", "NaN"),
    case(
        "ckpt-inf-running-var-brn-export-state-dict",
        "export state-dict {inf_var_brn} -o {out}/plain.pt",
        "layer2.bn2",
        "inf",
    ),
    case("ckpt-eps-zero-brn-evaluate", f"evaluate {{eps0_brn}} {DATA}", "eps0_brn.pt", "layer1.bn2", "eps"),
    case(
        "ckpt-bad-header-safetensors-inspect", ["inspect", "{bad_header_st}", *ARCH], "bad_header.safetensors"
    ),
    case(
        "ckpt-bad-header-safetensors-convert",
        ["convert", "{bad_header_st}", *ARCH, "-o", "{out}/new.pt"],
        "bad_header.safetensors",
    ),
    case(
        "ckpt-escape-codes-in-keys-convert",
        ["convert", "{escape_keys_pt}", *ARCH, "-o", "{out}/new.pt"],
        "escape_keys.pt",
        "unexpected",
    ),
    case("ckpt-no-state-dict-inspect", ["inspect", "{no_state_dict_pt}", *ARCH], "no_state_dict.pt", "--key"),
    case(
        "ckpt-huge-input-shape-export-onnx",
        "export onnx {huge_shape_brn} -o {out}/model.onnx",
        "huge_shape_brn.pt",
        "input shape",
    ),
    case("ckpt-huge-input-shape-inspect", "inspect {huge_shape_brn}", "huge_shape_brn.pt", "input shape"),
    case("ckpt-future-format-inspect", "inspect {future_brn}", "future_brn.pt", "version"),
    case("ckpt-recorded-command-as-arch-inspect", "inspect {hostile_brn}", "hostile_brn.pt", "--arch"),
    case(
        "ckpt-recorded-command-as-arch-evaluate",
        f"evaluate {{hostile_brn}} {DATA}",
        "hostile_brn.pt",
        "--arch",
    ),
    case(
        "ckpt-recorded-weight-download-export-onnx",
        "export onnx {download_brn} -o {out}/model.onnx",
        "download_brn.pt",
        "weights",
    ),
    case(
        "ckpt-brn-without-state-dict-inspect", "inspect {no_weights_brn}", "no_weights_brn.pt", "state_dict"
    ),
    case(
        "ckpt-plain-state-dict-no-arch-export-onnx", "export onnx {bn} -o {out}/model.onnx", "bn.pt", "--arch"
    ),
    case(
        "ckpt-nonexistent-export-state-dict",
        "export state-dict {missing} -o {out}/plain.pt",
        "nonexistent.pt",
        "no such file",
    ),
    case(
        "ckpt-damaged-last-pt-finetune-resume",
        "finetune --resume {out}/oldrun",
        "last.pt",
        ("truncated", "damaged"),
    ),
    # ---- data: file kind x defect x command (with a good brn checkpoint)
    case("npz-empty-evaluate", "evaluate {brn} --data {empty_npz}", "empty.npz"),
    case(
        "npz-missing-y-train-finetune",
        f"finetune {{brn}} --data {{no_ytrain_npz}} {RUN}",
        "no_ytrain.npz",
        "y_train",
    ),
    case(  # calibrate reads inputs only (y is never opened there), so the labels' reader is evaluate
        "npz-length-mismatch-evaluate",
        "evaluate {brn} --data {len_mismatch_npz}",
        "len_mismatch.npz",
        "x_train",
    ),
    case("npz-object-arrays-evaluate", "evaluate {brn} --data {object_npz}", "object.npz"),
    case("npz-corrupt-zip-evaluate", "evaluate {brn} --data {corrupt_npz}", "corrupt.npz", sub=True),
    case("npz-corrupt-zip-calibrate", "calibrate {brn} --data {corrupt_npz} -o {out}/new.pt", "corrupt.npz"),
    case(
        "npz-labels-beyond-classes-evaluate",
        "evaluate {brn} --data {many_classes_npz}",
        "many_classes.npz",
        "classes",
    ),
    case(
        "npz-labels-beyond-classes-finetune",
        f"finetune {{brn}} --data {{many_classes_npz}} {RUN}",
        "many_classes.npz",
        "classes",
        sub=True,
    ),
    case(
        "npz-float-labels-finetune",
        f"finetune {{brn}} --data {{float_labels_npz}} {RUN}",
        "float_labels.npz",
        "label",
    ),
    case(
        "npz-negative-labels-evaluate",
        "evaluate {brn} --data {negative_labels_npz}",
        "negative_labels.npz",
        "-1",
    ),
    case(
        "npz-nan-pixels-calibrate",
        "calibrate {brn} --data {nan_pixels_npz} -o {out}/new.pt",
        "nan_pixels.npz",
        "NaN",
    ),
    case(
        "npz-wrong-channels-evaluate", "evaluate {brn} --data {rgb_npz}", "rgb32.npz", ("stem.0", "channel")
    ),
    case(
        "npz-nonexistent-calibrate", "calibrate {brn} --data {missing_npz} -o {out}/new.pt", "nonexistent.npz"
    ),
    case("images-truncated-png-evaluate", "evaluate {brn} --data {images_bad_val}", "bad.png"),
    case(
        "images-truncated-png-calibrate",
        "calibrate {brn} --data {images_bad_train} -o {out}/new.pt --batch-size 4 --batches 2",
        "bad.png",
    ),
    case(
        "images-truncated-png-finetune",
        f"finetune {{brn}} --data {{images_bad_train}} {RUN} --batch-size 4",
        "bad.png",
    ),
    case("images-empty-folder-evaluate", "evaluate {brn} --data {empty_dir}", "empty_dir"),
    # ---- options: defect x command
    case("opt-bad-input-shape-inspect", "inspect {brn} --input-shape 2,x,28", "--input-shape"),
    case(
        "opt-input-shape-model-rejects-export-onnx",
        "export onnx {brn} -o {out}/model.onnx --input-shape 2,5,9",
        "input shape",
    ),
    case("opt-negative-batch-size-evaluate", f"evaluate {{brn}} {DATA} --batch-size -4", "--batch-size"),
    case(
        "opt-zero-batch-size-calibrate",
        f"calibrate {{brn}} {DATA} -o {{out}}/new.pt --batch-size 0",
        "--batch-size",
    ),
    case(
        "opt-negative-batch-size-finetune", f"finetune {{brn}} {DATA} {RUN} --batch-size -1", "--batch-size"
    ),
    case(
        "opt-zero-batches-calibrate", f"calibrate {{brn}} {DATA} -o {{out}}/new.pt --batches 0", "--batches"
    ),
    case(
        "opt-unknown-split-calibrate", f"calibrate {{brn}} {DATA} -o {{out}}/new.pt --split test", "--split"
    ),
    case(
        "opt-unknown-sampler-evaluate",
        f"evaluate {{brn}} {DATA} --batch-stats --sampler shuffled",
        "--sampler",
    ),
    case("opt-unknown-sampler-finetune", f"finetune {{brn}} {DATA} {RUN} --sampler bogus", "--sampler"),
    case(
        "opt-momentum-zero-convert",
        ["convert", "{bn}", *ARCH, "-o", "{out}/new.pt", "--momentum", "0"],
        "--momentum",
    ),
    case("opt-momentum-zero-finetune", f"finetune {{brn}} {DATA} {RUN} --momentum 0", "--momentum"),
    case("opt-zero-steps-finetune", f"finetune {{brn}} {DATA} -o {{out}}/newrun --steps 0", "--steps"),
    case("opt-negative-lr-finetune", f"finetune {{brn}} {DATA} {RUN} --lr -1", "--lr"),
    case(
        "opt-bad-rmax-schedule-finetune",
        f"finetune {{brn}} {DATA} {RUN} --rmax-schedule sometimes",
        ("--rmax-schedule", "rmax schedule"),
        "sometimes",
    ),
    case(
        "opt-val-split-above-one-finetune",
        f"finetune {{brn}} --data {{train_only_npz}} {RUN} --val-split 1.5",
        "--val-split",
    ),
    case("opt-unknown-device-evaluate", f"evaluate {{brn}} {DATA} --device tpu", "tpu"),
    case("opt-bad-normalize-evaluate", f"evaluate {{brn}} {DATA} --normalize 1,2,3", "--normalize"),
    case("opt-unsupported-opset-export-onnx", "export onnx {brn} -o {out}/model.onnx --opset 3", "--opset"),
    case(
        "opt-unknown-exporter-export-onnx",
        "export onnx {brn} -o {out}/model.onnx --exporter magic",
        "--exporter",
    ),
    case("opt-negative-atol-export-onnx", "export onnx {brn} -o {out}/model.onnx --atol -1", "--atol"),
    case(
        "opt-unknown-format-export-state-dict",
        "export state-dict {brn} -o {out}/plain.zip --format zip",
        "--format",
    ),
    case("out-is-a-directory-convert", ["convert", "{bn}", *ARCH, "-o", "{out}"], "directory"),
    case(
        "out-exists-no-force-calibrate",
        f"calibrate {{brn}} {DATA} -o {{out}}/previous.pt",
        "previous.pt",
        "--force",
    ),
    case(
        "out-exists-no-force-export-onnx",
        "export onnx {brn} -o {out}/previous.onnx",
        "previous.onnx",
        "--force",
    ),
    case(
        "out-exists-no-force-schedule",
        "schedule paper --steps 100 --plot {out}/previous.png",
        "previous.png",
        "--force",
    ),
    case(
        "out-folder-missing-export-state-dict",
        "export state-dict {brn} -o {out}/nofolder/plain.pt",
        "nofolder",
    ),
    case(
        "out-folder-unwritable-convert",
        ["convert", "{bn}", *ARCH, "-o", "{out}/previous.pt/new.pt"],
        "previous.pt",
    ),
    case(
        "out-run-folder-not-empty-finetune",
        f"finetune {{brn}} {DATA} -o {{out}}/oldrun --steps 2",
        "oldrun",
        "--force",
    ),
    case("opt-schedule-steps-decrease-schedule", "schedule 5k:3,1k:2 --steps 10000", "5k"),
    case("opt-zero-steps-schedule", "schedule paper --steps 0", "--steps"),
    case("opt-unknown-kind-schedule", "schedule 3 --steps 100 --kind gamma", "--kind"),
    case(
        "out-exists-no-force-export-state-dict",
        "export state-dict {brn} -o {out}/previous.pt",
        "previous.pt",
        "--force",
    ),
    case(
        "out-is-a-file-finetune", f"finetune {{brn}} {DATA} -o {{out}}/previous.pt --steps 2", "previous.pt"
    ),
    # A full disk, as a file-size limit: the write fails part-way; no partial file, no temporary left.
    case(
        "out-disk-full-convert",
        ["convert", "{bn}", *ARCH, "-o", "{out}/new.pt"],
        "new.pt",
        ("file-size limit", "no space"),
        file_size_limit=16 * 1024,
    ),
    case(
        "out-disk-full-export-state-dict-safetensors",
        "export state-dict {brn} -o {out}/plain.safetensors",
        "plain.safetensors",
        ("file-size limit", "no space"),
        file_size_limit=16 * 1024,
    ),
    # ---- usage errors: typer's usage message, exit 2
    case("usage-unknown-option-convert", "convert {bn} --no-such-option", "--no-such-option", sub=True),
    case("usage-missing-data-evaluate", "evaluate {brn}", "--data"),
    case(
        "usage-not-an-integer-batch-size-evaluate",
        f"evaluate {{brn}} {DATA} --batch-size abc",
        "--batch-size",
    ),
]


# ----------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry below `folder`: kind, size, mtime and content hash (a lock file excepted, see LOCK_NAME)."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        if path.name == LOCK_NAME:
            continue
        st = path.lstat()
        if path.is_dir():
            entries[str(path.relative_to(folder))] = ("dir",)
        else:
            entries[str(path.relative_to(folder))] = ("file", st.st_size, st.st_mtime_ns, _digest(path))
    return entries


def _input_digests(args: list[str], out: Path) -> dict[str, dict]:
    """The inputs named on the command line, as they are now (files and folders outside the output folder)."""
    found = {}
    for arg in args:
        path = Path(arg)
        if not path.is_absolute() or not path.exists() or path == out or out in path.parents:
            continue
        found[arg] = _snapshot(path) if path.is_dir() else {"": ("file", path.stat().st_size, _digest(path))}
    return found


def _error_lines(err: str) -> list[str]:
    """stderr's lines, less typer's usage preamble ("Usage: ..." and "Try '... --help' for help.")."""
    lines = [line for line in err.splitlines() if line.strip()]
    if lines and lines[0].startswith("Usage: "):
        lines = [
            line
            for line in lines
            if not line.startswith("Usage: ")
            and not (line.startswith("Try '") and line.endswith("for help."))
        ]
    return lines


def _fill(text: str, names: dict[str, str]) -> str:
    """`text` with each {name} of `names` replaced by its path (other braces, as in JSON, stay as they are)."""
    return re.sub(r"\{(\w+)\}", lambda m: names.get(m.group(1), m.group(0)), text)


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(case: Case, args: list[str], out: Path, capfd) -> tuple[int, str, str]:
    if case.subprocess:
        proc = subprocess.run(
            [sys.executable, "-m", "brn_cli", *args],
            cwd=out,
            env=_subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=None if case.file_size_limit is None else _limit_file_size(case.file_size_limit),
        )
        return proc.returncode, proc.stdout, proc.stderr
    return _run_in_process(args, capfd)


def _limit_file_size(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _run_in_process(args: list[str], capfd) -> tuple[int, str, str]:
    """`brn_cli.cli.app.main(args)` as the console script runs it. Captured at the file descriptors (capfd, not
    capsys): torch's C++ code writes to fd 2 directly. A console script prints Python warnings on stderr;
    in-process pytest would swallow them, so they are recorded and added as the lines a user would see."""
    from brn_cli.cli.app import DEBUG, main

    capfd.readouterr()
    DEBUG["on"] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:  # pragma: no cover - main() always exits
            code = 0
    captured = capfd.readouterr()
    shown = [
        f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)
    ]
    return code, captured.out, captured.err + "".join(line + "\n" for line in shown)


@pytest.mark.parametrize("case", CASES)
def test_broken_input(case: Case, files, tmp_path, capfd, monkeypatch):
    out = _out_folder(tmp_path, files)
    names = {k: str(v) for k, v in files.items()} | {"out": str(out)}
    args = [_fill(arg, names) for arg in case.args]
    monkeypatch.chdir(out)  # anything written to the working directory shows up in the folder's listing
    before, inputs_before = _snapshot(out), _input_digests(args, out)

    code, stdout, stderr = _run(case, args, out, capfd)

    problems = _problems(case, code, stdout, stderr, names | {"tmp": str(tmp_path)})
    if stdout.strip() and code != 0:  # a refused input produces no results (nor a dump of internals)
        problems.append(f"{len(stdout.splitlines())} lines on stdout")
    after = _snapshot(out)
    if after != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        problems.append(f"output folder changed: {changed}")
    if _input_digests(args, out) != inputs_before:
        problems.append("an input file changed")
    if files["marker"].exists():
        problems.append("a command recorded in a checkpoint ran")
    # All of a case's problems at once, with what it printed: the report names everything to fix.
    assert not problems, "\n".join(problems) + f"\nexit {code}\nstderr:\n{stderr}\nstdout:\n{stdout[-1500:]}"


def _problems(case: Case, code: int, stdout: str, stderr: str, names: dict[str, str]) -> list[str]:
    """What is wrong with how the command reported the error (an empty list: nothing)."""
    problems = []
    if "Traceback" in stderr + stdout:
        problems.append("a traceback was printed")
    if code != case.code:
        problems.append(f"exit code {code}, expected {case.code}")
    lines = _error_lines(stderr)
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr, expected one")
    errors = [line for line in lines if line.startswith(("brn: error: ", "Error: "))]
    if len(errors) != 1:
        problems.append(
            f"{len(errors)} error lines ('brn: error: ...' or typer's 'Error: ...'), expected one"
        )
        return problems
    line = errors[0]
    if any(ord(c) < 32 or ord(c) == 127 for c in line):
        problems.append("the error line holds control characters (from a file, printed raw)")
    if "--debug for the traceback" in line:
        problems.append("reported as an unexpected internal error, not as a user error")
    for needle in case.needles:
        options = [_fill(n, names) for n in (needle if isinstance(needle, tuple) else (needle,))]
        if not any(o.lower() in _searched(line, o, names).lower() for o in options):
            problems.append(f"the error line does not name {' or '.join(map(repr, options))}")
    return problems


def _searched(line: str, needle: str, names: dict[str, str]) -> str:
    """The part of the error line a needle is looked for in. A file name is looked for in the whole line; a
    word that says what is wrong ("truncated", "classes") only outside the paths and file names, which
    could contain it by accident (the test's own folder is named after the case)."""
    basenames = {Path(p).name for key, p in names.items() if key not in ("out", "tmp")}
    if needle in basenames or needle in names.values():
        return line
    for path in sorted(names.values(), key=len, reverse=True):
        line = line.replace(path, "<path>")
    for name in sorted(basenames, key=len, reverse=True):
        line = line.replace(name, "<file>")
    return line
