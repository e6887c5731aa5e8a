"""`brn inspect` and `brn convert` through the real CLI entry point (brn_cli.cli.app.main).

Most runs are in-process (`run_cli` in conftest.py: same code path as the console script, without paying
for a fresh torch import); the malicious-pickle check also runs `python -m brn_cli` in a subprocess.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from brn_cli.errors import BrnError

app_module = importlib.import_module("brn_cli.cli.app")  # the module: brn_cli.cli.app is the Typer app

ARCH = ["--arch", "torchvision:shufflenet_v2_x0_5", "--arch-kwargs", '{"num_classes": 10}']
SHAPE = ["--input-shape", "2,3,64,64"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(shufflenet_bn, tmp_path_factory) -> Path:
    """A training-script style file of the shared BatchNorm model (conftest): a DataParallel-prefixed
    state_dict under "state_dict", next to other entries."""
    state = {"module." + k: v for k, v in shufflenet_bn.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "shufflenet.pth"
    torch.save({"state_dict": state, "epoch": 1}, path)
    return path


def test_convert_then_inspect_without_arch(run_cli, weights, tmp_path):
    out = tmp_path / "out.pt"
    res = run_cli("convert", weights, "-o", out, *ARCH, *SHAPE, "--momentum", "0.05")
    assert res.code == 0, res.err
    assert "max |original - converted| = 0" in res.out
    assert "converted 56 of 56" in res.out
    assert out.exists()
    ckpt = torch.load(out, weights_only=True)
    assert {s["momentum"] for s in ckpt["renorm_layers"].values()} == {0.05}

    res = run_cli("inspect", out, "--json")  # arch and input shape come from the brn checkpoint
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["file_format"] == "brn" and report["arch"] == "torchvision:shufflenet_v2_x0_5"
    assert report["input_shape"] == [2, 3, 64, 64]
    assert len(report["norms"]) == 56
    first = report["norms"][0]
    assert first["name"] == "conv1.1" and first["type"] == "BatchRenorm2d" and first["channels"] == 24
    assert first["eps"] == 1e-5 and first["momentum"] == 0.05 and first["health"] == "ok"
    assert first["fold_into"] == "conv1.0"  # Conv -> BN pair found on the traced graph
    from brn_cli.storage.checkpoint import build_arch

    n_params = sum(
        p.numel() for p in build_arch("torchvision:shufflenet_v2_x0_5", {"num_classes": 10}).parameters()
    )
    assert report["parameters"] == n_params

    # No overwrite without --force; with --force it goes through.
    before = out.read_bytes()
    res = run_cli("convert", weights, "-o", out, *ARCH, *SHAPE)
    assert res.code != 0 and len(res.err_lines) == 1 and "--force" in res.err
    assert out.read_bytes() == before
    res = run_cli("convert", weights, "-o", out, *ARCH, *SHAPE, "--force", "--momentum", "0.1")
    assert res.code == 0, res.err
    assert {s["momentum"] for s in torch.load(out, weights_only=True)["renorm_layers"].values()} == {0.1}


def test_convert_json_include_exclude_and_dry_run(run_cli, weights, tmp_path):
    out = tmp_path / "sel.pt"
    res = run_cli(
        "convert",
        weights,
        "-o",
        out,
        *ARCH,
        *SHAPE,
        "--include",
        "stage2.*",
        "--exclude",
        "*.branch1.*",
        "--json",
    )
    assert res.code == 0, res.err
    result = json.loads(res.out)
    converted = [d["name"] for d in result["layers"] if d["action"] == "convert"]
    assert converted and all(n.startswith("stage2.") and ".branch1." not in n for n in converted)
    reasons = {d["reason"] for d in result["layers"] if d["action"] == "skip"}
    assert reasons == {"not matched by --include", "matched by --exclude"}
    assert result["max_abs_diff"] <= 1e-5 and result["output"] == str(out)
    assert set(torch.load(out, weights_only=True)["renorm_layers"]) == set(converted)

    dry = tmp_path / "dry.pt"
    res = run_cli("convert", weights, "-o", dry, *ARCH, "--dry-run")
    assert res.code == 0, res.err
    assert "would convert 56 of 56" in res.out
    assert not dry.exists() and sorted(os.listdir(tmp_path)) == ["sel.pt"]


def test_inspect_state_dict_reports_unhealthy_statistics(run_cli, weights, tmp_path):
    state = torch.load(weights, weights_only=True)["state_dict"]
    state["module.conv1.1.running_var"][:3] = float("nan")
    state["module.stage2.0.branch1.1.running_var"][0] = -1.0
    state["module.stage2.0.branch1.3.running_mean"][:2] = float("inf")
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    res = run_cli("inspect", bad, *ARCH, *SHAPE, "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["file_format"] == "state_dict"
    health = {n["name"]: n["health"] for n in report["norms"]}
    assert health["conv1.1"] == "3 NaN in running_var"
    assert health["stage2.0.branch1.1"] == "1 negative running_var"
    assert health["stage2.0.branch1.3"] == "2 inf in running_mean"
    assert sum(h == "ok" for h in health.values()) == 53
    res = run_cli("inspect", bad, *ARCH, *SHAPE)  # the table view
    assert res.code == 0 and "3 with unhealthy running statistics" in res.out


class Payload:
    """Unpickling this calls open(marker, 'w'): the file's existence proves the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_inputs(tmp_path: Path, weights: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI args after 'convert', a word the one error line must contain)."""
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pt"
    data = weights.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(random.Random(0).randbytes(4096))
    text = tmp_path / "notes.bin"
    text.write_text("this is not a checkpoint\n")
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    no_bn = tmp_path / "linear.pt"
    torch.save(nn.Linear(4, 2).state_dict(), no_bn)
    fake_st = tmp_path / "fake.safetensors"
    fake_st.write_bytes(random.Random(1).randbytes(64))
    lin_arch = ["--arch", "torch.nn:Linear", "--arch-kwargs", '{"in_features": 4, "out_features": 2}']
    return {
        "missing": ([str(tmp_path / "nope.pt")], "no such file"),
        "empty": ([str(empty)], "empty"),
        "truncated": ([str(truncated)], "not a readable"),
        "random": ([str(random_bytes)], "not a"),
        "text": ([str(text)], "not a"),
        "not-a-checkpoint": ([str(listing)], "list"),
        "bad-safetensors": ([str(fake_st), *ARCH], "safetensors"),
        "directory": ([str(tmp_path)], "directory"),
        "arch-mismatch": ([str(weights), "--arch", "torchvision:resnet18"], "do not match"),
        "no-arch": ([str(weights)], "--arch"),
        "bad-arch-kwargs": (
            [str(weights), "--arch", "torchvision:resnet18", "--arch-kwargs", "{oops"],
            "JSON",
        ),
        "no-batchnorm": ([str(no_bn), *lin_arch], "no BatchNorm"),
        "bad-input-shape": ([str(weights), *ARCH, "--input-shape", "2,5,9"], "input shape"),
        "bad-momentum": ([str(weights), *ARCH, "--momentum", "1.5"], "momentum"),
    }


def test_each_bad_input_gives_one_line_and_no_output(run_cli, weights, tmp_path):
    cases = _bad_inputs(tmp_path, weights)
    out = tmp_path / "out" / "converted.pt"
    out.parent.mkdir()
    for name, (args, word) in cases.items():
        res = run_cli("convert", *args, "-o", out)
        assert res.code != 0, name
        assert len(res.err_lines) == 1, (name, res.err)
        assert res.err.startswith("brn: error: "), (name, res.err)
        assert word.lower() in res.err.lower(), (name, res.err)
        assert "Traceback" not in res.err + res.out, name
        assert list(out.parent.iterdir()) == [], name  # no output, no temporary left behind
    # inspect shares the loader: one line too.
    res = run_cli("inspect", str(tmp_path / "random.pt"))
    assert res.code != 0 and len(res.err_lines) == 1 and "Traceback" not in res.err


def test_debug_shows_the_exception(run_cli, tmp_path):
    from brn_cli.cli.app import main
    from brn_cli.errors import BrnError

    with pytest.raises(BrnError, match="no such file"):
        main(["convert", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o.pt"), "--debug"])


def _evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint whose unpickling would create the file `marker`: (checkpoint, marker)."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(marker)}, evil)
    return evil, marker


def test_malicious_pickle_does_not_run(run_cli, tmp_path):
    evil, marker = _evil_checkpoint(tmp_path)
    out = tmp_path / "out.pt"

    res = run_cli("convert", evil, "-o", out, *ARCH)
    assert res.code != 0 and len(res.err_lines) == 1 and "--trust-pickle" in res.err
    assert "io.open" in res.err  # names what it would have imported
    assert not marker.exists() and not out.exists()

    # Control: with --trust-pickle the payload does run (so the checks above could have failed).
    res = run_cli("convert", evil, "-o", out, *ARCH, "--trust-pickle")
    assert marker.exists()
    assert res.code != 0 and not out.exists()


@pytest.mark.slow
def test_malicious_pickle_does_not_run_through_python_m_brn_cli(tmp_path):
    """The real console path, in a fresh interpreter (the in-process twin above is the fast one)."""
    evil, marker = _evil_checkpoint(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "brn_cli", "inspect", str(evil)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "--trust-pickle" in proc.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Plumbing: usage errors, --version, bare groups, interruptions, through the real entry point
# ----------------------------------------------------------------------------------------------


def _brn(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """`python -m brn_cli ARGS` in a fresh interpreter: the console script's code path."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "brn_cli", *args], capture_output=True, text=True, env=env, cwd=cwd, **kwargs
    )


USAGE_ERRORS = {
    "unknown-option": (["inspect", "x.pt", "--bogus"], "No such option: --bogus"),
    "missing-argument": (["inspect"], "Missing argument 'checkpoint'"),
    "bad-int": (["schedule", "paper-scaled", "--steps", "abc"], "'--steps'"),
    "unknown-command": (["nosuch"], "No such command 'nosuch'"),
    "unknown-subcommand": (["export", "tflite"], "No such command 'tflite'"),
}


@pytest.mark.parametrize("name", sorted(USAGE_ERRORS))
def test_usage_errors_print_typer_usage_and_exit_2(run_cli, name):
    args, message = USAGE_ERRORS[name]
    res = run_cli(*args)
    assert res.code == 2, (res.code, res.err)
    assert res.err.startswith("Usage: brn "), res.err
    assert "--help' for help." in res.err
    assert res.err_lines[-1].startswith("Error: ") and message in res.err_lines[-1], res.err
    assert "brn: error" not in res.err and "Traceback" not in res.err and res.out == ""


def test_usage_error_through_the_console_entry_point(tmp_path):
    proc = _brn("inspect", "x.pt", "--bogus", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("Usage: brn inspect [OPTIONS] "), proc.stderr
    assert proc.stderr.rstrip().endswith("Error: No such option: --bogus"), proc.stderr


def test_version_prints_the_version_and_exits_0(run_cli, tmp_path):
    from brn_cli._version import __version__

    res = run_cli("--version")
    assert (res.code, res.out, res.err) == (0, f"brn {__version__}\n", "")
    proc = _brn("--version", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"brn {__version__}\n", "")


@pytest.mark.parametrize("group", [[], ["export"]], ids=["brn", "brn-export"])
def test_a_bare_group_shows_its_help(run_cli, group):
    res = run_cli(*group)
    assert res.code == 2  # typer's no_args_is_help: the help text, exit code of a usage error
    text = res.out + res.err
    assert text.startswith(f"Usage: {' '.join(['brn', *group])} [OPTIONS] COMMAND [ARGS]..."), text
    assert "Commands:" in text and "--help" in text
    assert "onnx" in text if group else "finetune" in text
    assert "Error" not in text and "brn: error" not in text


def _fake_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, path)
    return path


LOADING_COMMANDS = {  # each reaches brn_cli.storage.checkpoint.load_checkpoint
    "inspect": ["inspect", "{ckpt}"],
    "convert": ["convert", "{ckpt}", "-o", "{tmp}/out.pt"],
    "evaluate": ["evaluate", "{ckpt}", "--data", "{tmp}/d.npz"],
    "calibrate": ["calibrate", "{ckpt}", "--data", "{tmp}/d.npz", "-o", "{tmp}/cal.pt"],
    "export-onnx": ["export", "onnx", "{ckpt}", "-o", "{tmp}/m.onnx"],
    "export-state-dict": ["export", "state-dict", "{ckpt}", "-o", "{tmp}/m.pth"],
}


@pytest.mark.parametrize("signal_exc", [KeyboardInterrupt, "typer.Abort"], ids=["ctrl-c", "abort"])
@pytest.mark.parametrize("command", sorted(LOADING_COMMANDS))
def test_an_interruption_inside_a_command_exits_130(run_cli, monkeypatch, tmp_path, command, signal_exc):
    import typer

    import brn_cli.storage.checkpoint

    exc_type = typer.Abort if signal_exc == "typer.Abort" else signal_exc

    def interrupted(*args, **kwargs):
        raise exc_type()

    monkeypatch.setattr(brn_cli.storage.checkpoint, "load_checkpoint", interrupted)
    ckpt = _fake_checkpoint(tmp_path)
    args = [a.format(ckpt=ckpt, tmp=tmp_path) for a in LOADING_COMMANDS[command]]
    res = run_cli(*args)
    assert (res.code, res.err_lines) == (130, ["brn: interrupted"]), (res.code, res.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # nothing written


def test_an_eof_inside_a_command_is_an_error_not_an_interruption(run_cli, monkeypatch, tmp_path):
    """typer turns an EOFError (end of input at a prompt) into Abort: brn has no prompts, so it is a file that
    ended early -- one error line, not "brn: interrupted" and not "Abort: Abort"."""
    import brn_cli.storage.checkpoint

    def truncated(*args, **kwargs):
        raise EOFError("No data left in file")

    monkeypatch.setattr(brn_cli.storage.checkpoint, "load_checkpoint", truncated)
    res = run_cli("inspect", _fake_checkpoint(tmp_path))
    assert res.code == 1, (res.code, res.err)
    assert res.err_lines == [
        "brn: error: EOFError: No data left in file (run with --debug for the traceback)"
    ], res.err
    from brn_cli.cli.app import DEBUG, main

    monkeypatch.setitem(DEBUG, "on", False)  # main() turns it on; restored after the test
    with pytest.raises(EOFError):  # --debug: the original exception, not typer's Abort
        main(["inspect", str(_fake_checkpoint(tmp_path)), "--debug"])


def test_an_empty_npz_is_one_line_naming_the_file(run_cli, tmp_path):
    from brn_cli.samples.models import mlp

    ckpt = tmp_path / "mlp.pt"
    torch.save(mlp().state_dict(), ckpt)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    res = run_cli("evaluate", ckpt, "--arch", "brn_cli.samples.models:mlp", "--data", empty)
    assert res.code == 2, (res.code, res.err)
    assert len(res.err_lines) == 1 and res.err_lines[0].startswith("brn: error: "), res.err
    assert "empty.npz" in res.err and "Abort" not in res.err and "interrupted" not in res.err


def _sigint_while_reading(args: list[str], fifo: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run `brn ARGS` whose --data is the FIFO `fifo`; SIGINT it once it is blocked reading that FIFO.

    Opening a FIFO for writing succeeds only once a reader has opened it, so when the open below returns
    the command is running (past parsing, inside its data loading): no sleeps, no race.
    """
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "brn_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )
    deadline = time.monotonic() + 300
    writer = None
    while writer is None:
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until the reader is there
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"brn never opened {fifo.name}: rc={proc.returncode}\n{err}")
            time.sleep(0.05)
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(writer)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "calibrate", "finetune"])
def test_ctrl_c_mid_command_exits_130_with_one_line(tmp_path, command):
    from brn_cli.samples.models import mlp

    ckpt = tmp_path / "mlp.pt"
    torch.save(mlp().state_dict(), ckpt)
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    arch = ["--arch", "brn_cli.samples.models:mlp"]
    args = {
        "evaluate": ["evaluate", str(ckpt), *arch, "--data", str(fifo)],
        "calibrate": ["calibrate", str(ckpt), *arch, "--data", str(fifo), "-o", "cal.pt"],
        "finetune": ["finetune", str(ckpt), *arch, "--data", str(fifo), "-o", "run", "--steps", "5"],
    }[command]
    proc = _sigint_while_reading(args, fifo, tmp_path)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert [line for line in proc.stderr.splitlines() if line.strip()] == ["brn: interrupted"], proc.stderr
    assert not (tmp_path / "cal.pt").exists()


@pytest.mark.slow
def test_debug_gives_the_traceback_through_the_console_entry_point(tmp_path):
    proc = _brn("convert", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o.pt"), "--debug", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "BrnError" in proc.stderr
    proc = _brn("convert", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o.pt"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("brn: error: ") and len(proc.stderr.splitlines()) == 1


@pytest.mark.slow
def test_demo_defaults_to_one_thread(run_cli, tmp_path):
    """A busy shared CPU makes extra OpenMP threads cost far more than they give: one thread by default."""
    threads_before = torch.get_num_threads()
    try:
        res = run_cli("demo", "--quick", "--pretrain-steps", "10", "--steps", "6", "-o", tmp_path / "d")
    finally:
        torch.set_num_threads(threads_before)
    assert res.code == 0, res.err
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["threads"] == 1
    assert "(1 thread)" in res.out


def test_sample_data_writes_the_bundled_digits(run_cli, tmp_path):
    import numpy as np

    from brn_cli.samples import SAMPLE_DATA

    out = tmp_path / "digits.npz"
    res = run_cli("sample-data", "-o", out)
    assert res.code == 0, res.err
    assert out.read_bytes() == SAMPLE_DATA.read_bytes()
    with np.load(out) as arrays:
        assert sorted(arrays.files) == ["x_train", "x_val", "y_train", "y_val"]
        assert arrays["x_train"].shape[1:] == (1, 28, 28)
    assert str(out) in res.out
    out.write_bytes(b"mine")  # never overwritten without --force
    res = run_cli("sample-data", "-o", out)
    assert res.code == 2 and len(res.err_lines) == 1 and "--force" in res.err
    assert out.read_bytes() == b"mine"
    assert run_cli("sample-data", "-o", out, "--force").code == 0
    assert out.read_bytes() == SAMPLE_DATA.read_bytes()


def test_library_errors_name_parameters_and_the_cli_shows_flags(run_cli, tmp_path):
    """One error, two spellings: a library caller reads the parameter it passed (`batch_size`), a command
    line user the flag (--batch-size); the exception records which parameter is at fault."""
    from brn_cli.data.datasets import load_data
    from brn_cli.errors import BrnError
    from brn_cli.evaluation.evaluate import evaluate_data
    from brn_cli.samples import SAMPLE_DATA
    from brn_cli.samples.models import mlp

    model = mlp()
    with pytest.raises(BrnError) as info:
        evaluate_data(model, load_data(str(SAMPLE_DATA)), batch_size=0)
    assert str(info.value) == "`batch_size` must be >= 1, got 0" and info.value.param == "batch_size"

    weights = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), weights)
    arch = ["--arch", "brn_cli.samples.models:mlp"]
    res = run_cli("evaluate", weights, *arch, "--data", SAMPLE_DATA, "--batch-size", "0")
    assert res.code == 2 and res.err_lines == ["brn: error: --batch-size must be >= 1, got 0"], res.err
    # A library parameter named differently from its flag (calibrate's num_batches is --batches).
    res = run_cli(
        "calibrate", weights, *arch, "--data", SAMPLE_DATA, "--batches", "0", "-o", tmp_path / "c.pt"
    )
    assert res.code == 2 and res.err_lines == ["brn: error: --batches must be >= 1, got 0"], res.err


def test_with_flags_spells_the_parameters_a_message_names_as_flags():
    from brn_cli.cli.app import with_flags
    from brn_cli.errors import BrnError

    # the invoked command's own option, whatever its function argument is called (fmt -> --format)
    assert (
        with_flags("`fmt` 'zip': choose one of pt", ["export", "state-dict"])
        == "--format 'zip': choose one of pt"
    )
    # a value to pass follows its flag; a switch becomes its on or off flag
    assert with_flags("pass `channels=3`", ["finetune"]) == "pass --channels 3"
    assert (
        with_flags("pass `force=True`; drop `fold=False`", ["export", "onnx"])
        == "pass --force; drop --no-fold"
    )
    assert with_flags("continue with `resume=runs/a b`", ["finetune"]) == "continue with --resume runs/a b"
    # the subject of a message that starts with the bare parameter name (param= set)
    assert with_flags("device 'gpu' is not a device", ["evaluate"], subject="device") == (
        "--device 'gpu' is not a device"
    )
    # anything else stays as written: plain words, paths, a name no flag sets, another subject
    plain = "runs/data/x.npz records data 'pkg:make'; pass `data` to name the data yourself"
    assert with_flags(plain, ["finetune"], subject="data") == (
        "runs/data/x.npz records data 'pkg:make'; pass --data to name the data yourself"
    )
    assert with_flags("`forward` failed", ["finetune"]) == "`forward` failed"
    assert with_flags("devices differ", ["evaluate"], subject="device") == "devices differ"
    assert with_flags("data/x.npz: no such file", ["evaluate"], subject="data") == "data/x.npz: no such file"

    error = BrnError("`resize_size` 10 is smaller than `image_size` 28")
    assert error.param == "resize_size" and error.params == ("resize_size", "image_size")
    assert BrnError("device 'x': no", param="device").params == ("device",)


# torchrun's own options, which the launcher passes to torchrun (brn has no such flags).
TORCHRUN_OPTIONS = {"--standalone", "--nproc-per-node"}
FLAG_PATTERN = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


def test_no_library_module_names_a_command_line_flag():
    """Only the command line (cli/) and the recipes it runs know flag names; the library names parameters
    (see brn_cli.errors). Scans every string constant, f-string parts and docstrings included."""
    package = REPO / "brn_cli"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] in ("cli", "recipes"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                flags = sorted(set(FLAG_PATTERN.findall(node.value)) - TORCHRUN_OPTIONS)
                offenders += [f"{path.relative_to(REPO)}:{node.lineno}: {flag}" for flag in flags]
    assert not offenders, "library strings that name command-line flags:\n" + "\n".join(offenders)


class _FailsInAWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise BrnError(f"example {index}: `channels` does not match", param="channels")


def test_an_error_raised_in_a_dataloader_worker_is_its_own_one_line(monkeypatch, capsys):
    loader = torch.utils.data.DataLoader(_FailsInAWorker(), num_workers=1)
    with pytest.raises(BrnError) as raised:
        next(iter(loader))
    assert "Original Traceback" in str(raised.value)  # what torch hands back: the worker's traceback

    def fails(*_args, **_kwargs):
        raise raised.value

    monkeypatch.setattr("brn_cli.data.samplers.parse_sampler", fails)  # evaluate's first library call
    with pytest.raises(SystemExit) as exited:
        app_module.main(["evaluate", "model.pt", "--data", "data.npz"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.splitlines() == ["brn: error: example 0: --channels does not match"]
