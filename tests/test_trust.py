"""A checkpoint never runs code, never downloads, and a damaged or hostile checkpoint gives one clear line.

The hostile checkpoints are brn's own format written by the real save path and then edited, as an attacker
would: ``arch.spec`` is plain strings, so the file passes weights-only loading. Every command that loads a
checkpoint is run through the real CLI entry point (``brn_cli.cli.app.main``; one case also as ``python -m
brn_cli``), and each case asserts a non-zero exit, one stderr line and that the marker file the payload would
create does not exist.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from brn_cli.errors import BrnError
from brn_cli.nn.convert import convert_batchnorm
from brn_cli.samples import SAMPLE_DATA
from brn_cli.samples.models import mlp
from brn_cli.storage.checkpoint import build_arch, load_checkpoint, save_brn_checkpoint

REPO = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
SAMPLE_ARCH = "brn_cli.samples.models:mlp"
SAMPLE_KWARGS = {"width": 8}


def tiny_bn(width: int = 4, config_path: str | None = None) -> nn.Module:
    """A model outside the allow-list (arch spec ``test_trust:tiny_bn``): usable only when named on the CLI.
    (`config_path` stands for the arguments of a user's own builder, which are the user's business.)"""
    return nn.Sequential(nn.Flatten(1), nn.Linear(784, width), nn.BatchNorm1d(width), nn.Linear(width, 10))


def odd_names() -> nn.Module:
    """A model whose layer name carries Rich markup and an escape sequence (``test_trust:odd_names``)."""
    model = nn.Sequential()
    model.add_module("flat", nn.Flatten(1))
    model.add_module("fc", nn.Linear(784, 4))
    model.add_module("[red]x[/red]\x1b[31m", nn.BatchNorm1d(4))
    return model


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def brn_ckpt(tmp_path_factory) -> Path:
    """A genuine brn checkpoint of the sample MLP, written by brn's own save path."""
    path = tmp_path_factory.mktemp("good") / "mlp.pt"
    torch.manual_seed(0)
    save_brn_checkpoint(
        convert_batchnorm(mlp(**SAMPLE_KWARGS)),
        path,
        arch_spec=SAMPLE_ARCH,
        arch_kwargs=SAMPLE_KWARGS,
        input_shape=[2, 1, 28, 28],
        command="test",
    )
    return path


def _edited(src: Path, dest: Path, **changes) -> Path:
    """`src` (a brn checkpoint) with top-level entries replaced, saved as a weights-only-loadable file."""
    raw = torch.load(src, map_location="cpu", weights_only=True)
    raw.update(changes)
    torch.save(raw, dest)
    return dest


def _hubconf(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hubconf.py").write_text(
        "import torch\n"
        f"open({str(marker)!r}, 'w').close()\n"
        "def tiny(**kwargs):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    return torch.nn.Linear(1, 1)\n",
        encoding="utf-8",
    )
    return folder


def _hostile_arch(kind: str, tmp: Path) -> tuple[dict, Path]:
    """(the `arch` entry of a hostile checkpoint, the file whose existence proves the payload ran)."""
    marker = tmp / "marker"
    if kind == "subprocess-run":
        return {"spec": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}}, marker
    if kind == "os-system":
        return {"spec": "os:system", "kwargs": {"command": f"touch {marker}"}}, marker
    if kind == "builtins-exec":
        code = f"open({str(marker)!r}, 'w').close()"
        return {"spec": "builtins:exec", "kwargs": {"source": code}}, marker
    if kind == "torch-hub-local":
        hub = _hubconf(tmp / "hub", marker)
        kwargs = {"repo_or_dir": str(hub), "model": "tiny", "source": "local", "trust_repo": True}
        return {"spec": "torch.hub:load", "kwargs": kwargs}, marker
    if kind == "torchvision-download":
        # A download would first create TORCH_HOME/hub/checkpoints (TORCH_HOME points at the marker).
        return {"spec": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}, tmp / "torch_home"
    raise AssertionError(kind)


HOSTILE = ["subprocess-run", "os-system", "builtins-exec", "torch-hub-local", "torchvision-download"]


def _commands(ckpt: Path, out: Path) -> dict[str, list[str]]:
    data = str(SAMPLE_DATA)
    return {
        "inspect": ["inspect", str(ckpt)],
        "convert": ["convert", str(ckpt), "-o", str(out / "converted.pt"), "--input-shape", "2,1,28,28"],
        "evaluate": ["evaluate", str(ckpt), "--data", data],
        "calibrate": ["calibrate", str(ckpt), "--data", data, "--batches", "1", "-o", str(out / "cal.pt")],
        "export-onnx": ["export", "onnx", str(ckpt), "-o", str(out / "model.onnx")],
        "export-state-dict": ["export", "state-dict", str(ckpt), "-o", str(out / "plain.pt")],
        "finetune": ["finetune", str(ckpt), "--data", data, "-o", str(out / "run"), "--steps", "1"],
    }


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_arch_spec_runs_nothing_in_any_command(run_cli, brn_ckpt, tmp_path, monkeypatch, kind):
    arch, marker = _hostile_arch(kind, tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    evil = _edited(brn_ckpt, tmp_path / "evil.pt", arch=arch)
    out = tmp_path / "out"
    out.mkdir()
    for name, args in _commands(evil, out).items():
        res = run_cli(*args)
        assert res.code != 0, (kind, name, res.out)
        assert len(res.err_lines) == 1, (kind, name, res.err)
        assert not marker.exists(), (kind, name, "the checkpoint ran code or downloaded")
        assert "Traceback" not in res.err, (kind, name)
        assert _files_under(out) == [], (kind, name)
        if kind == "torchvision-download":
            assert "never downloads" in res.err, (name, res.err)
        else:
            assert f"records arch '{arch['spec']}'" in res.err, (name, res.err)
            assert "does not run from a file" in res.err and "pass --arch" in res.err, (name, res.err)
            assert "evil.pt" in res.err, (name, res.err)


@pytest.mark.slow
def test_hostile_arch_spec_through_the_console_script(brn_ckpt, tmp_path):
    arch, marker = _hostile_arch("subprocess-run", tmp_path)
    evil = _edited(brn_ckpt, tmp_path / "evil.pt", arch=arch)
    proc = subprocess.run(
        [sys.executable, "-m", "brn_cli", "inspect", str(evil)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "pass --arch" in proc.stderr
    assert not marker.exists()


def test_arch_named_on_the_command_line_is_still_honoured(run_cli, brn_ckpt, tmp_path):
    arch, marker = _hostile_arch("subprocess-run", tmp_path)
    evil = _edited(brn_ckpt, tmp_path / "evil.pt", arch=arch)
    # The user names the architecture: the recorded spec is not used (nor its kwargs: the user gave some).
    res = run_cli("inspect", evil, "--arch", SAMPLE_ARCH, "--arch-kwargs", json.dumps(SAMPLE_KWARGS))
    assert res.code == 0, res.err
    assert not marker.exists()

    # A model outside the allow-list, recorded by a convert that the user ran with --arch (and the arguments
    # of the user's own builder are not second-guessed).
    torch.save(tiny_bn(width=6).state_dict(), tmp_path / "bn.pt")
    converted = tmp_path / "tiny.pt"
    kwargs = '{"width": 6, "config_path": "model.yaml"}'
    arch = ["--arch", "test_trust:tiny_bn", "--arch-kwargs", kwargs]
    res = run_cli("convert", tmp_path / "bn.pt", "-o", converted, *arch, "--input-shape", "2,1,28,28")
    assert res.code == 0, res.err
    res = run_cli("inspect", converted)
    assert res.code != 0 and len(res.err_lines) == 1
    assert "tiny.pt records arch 'test_trust:tiny_bn', which brn does not run from a file" in res.err
    # Named again: the recorded kwargs (width 6) go with the same spec; a path-like argument from the file is
    # refused, though, since the file chose it.
    res = run_cli("inspect", converted, "--arch", "test_trust:tiny_bn")
    assert res.code != 0 and "config_path" in res.err and "tiny.pt" in res.err, res.err
    res = run_cli("inspect", converted, "--arch", "test_trust:tiny_bn", "--arch-kwargs", kwargs)
    assert res.code == 0, res.err
    raw = torch.load(converted, weights_only=True)
    raw["arch"]["kwargs"] = {"width": 6}
    torch.save(raw, converted)
    res = run_cli("inspect", converted, "--arch", "test_trust:tiny_bn")
    assert res.code == 0, res.err


def test_recorded_allow_listed_builders_load_without_arch(tmp_path):
    # torchvision, timm and brn's samples are honoured from a file, with plain-data kwargs.
    pytest.importorskip("torchvision", reason="torchvision (a test extra) is not installed")
    pytest.importorskip("timm", reason="timm (a test extra) is not installed")
    cases = [
        ("torchvision:shufflenet_v2_x0_5", {"num_classes": 3}),
        ("timm:test_resnet", {"num_classes": 3}),
        (SAMPLE_ARCH, {"width": 4, "num_classes": 3}),
    ]
    for spec, kwargs in cases:
        path = tmp_path / (spec.replace(":", "_") + ".pt")
        model = build_arch(spec, kwargs)
        save_brn_checkpoint(convert_batchnorm(model), path, arch_spec=spec, arch_kwargs=kwargs)
        ckpt = load_checkpoint(path)
        assert ckpt.arch_spec == spec and ckpt.arch_kwargs == kwargs


@pytest.mark.parametrize(
    ("arch", "words"),
    [
        ({"spec": SAMPLE_ARCH, "kwargs": {"width": torch.tensor(8)}}, "plain data"),
        ({"spec": SAMPLE_ARCH, "kwargs": ["width", 8]}, "plain data"),
        ({"spec": "brn_cli.recipes.pretrain:pretrain_batchnorm", "kwargs": {}}, "pass `arch`"),
        ({"spec": "brn_cli.samples.models:SAMPLE_ARCHS", "kwargs": {}}, "pass `arch`"),
        ({"spec": "torchvision:get_model", "kwargs": {}}, "pass `arch`"),
        ({"spec": "timm:create_model", "kwargs": {}}, "pass `arch`"),
        ({"spec": "timm:resnet18", "kwargs": {"pretrained": True}}, "never downloads"),
        ({"spec": "timm:resnet18", "kwargs": {"checkpoint_path": "/etc/passwd"}}, "never downloads"),
        (
            {"spec": "timm:resnet18", "kwargs": {"pretrained_cfg_overlay": {"file": "x.pth"}}},
            "never downloads",
        ),
        ({"spec": "torchvision:fcn_resnet50", "kwargs": {"weights_backbone": "DEFAULT"}}, "never downloads"),
        ({"spec": ["subprocess:run"], "kwargs": {}}, "pass `arch`"),
    ],
)
def test_recorded_specs_outside_the_allow_list_are_refused(brn_ckpt, tmp_path, monkeypatch, arch, words):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    bad = _edited(brn_ckpt, tmp_path / "bad.pt", arch=arch)
    with pytest.raises(BrnError, match=words) as info:
        load_checkpoint(bad)
    assert "bad.pt" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "torch_home").exists()


def test_builders_never_download(tmp_path, monkeypatch):
    # Detectors and segmenters default to downloading ImageNet backbone weights; brn builds them without.
    pytest.importorskip("torchvision", reason="torchvision (a test extra) is not installed")
    pytest.importorskip("timm", reason="timm (a test extra) is not installed")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for name in ("lraspp_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"):
        model = build_arch(f"torchvision:{name}", {"num_classes": 3})
        assert isinstance(model, nn.Module)
    assert not (tmp_path / "torch_home").exists()
    # Asked for on the command line: refused with one line, nothing fetched.
    for kwargs in ({"weights": "DEFAULT"}, {"weights_backbone": "IMAGENET1K_V1"}):
        with pytest.raises(BrnError, match="brn never downloads"):
            build_arch("torchvision:lraspp_mobilenet_v3_large", kwargs)
    with pytest.raises(BrnError, match="brn never downloads"):
        build_arch("timm:test_resnet", {"pretrained": True})
    # Unset values are accepted (and stay unset).
    build_arch("torchvision:shufflenet_v2_x0_5", {"weights": None, "num_classes": 3})
    build_arch("timm:test_resnet", {"pretrained": False})
    assert not (tmp_path / "torch_home").exists()


def test_cli_refuses_a_download_asked_for_with_arch_kwargs(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    res = run_cli(
        "inspect",
        tmp_path / "w.pt",
        "--arch",
        "torchvision:resnet18",
        "--arch-kwargs",
        '{"weights": "DEFAULT"}',
    )
    assert res.code != 0 and len(res.err_lines) == 1 and "brn never downloads" in res.err
    assert not (tmp_path / "torch_home").exists()


# ----------------------------------------------------------------------------------------------
# --resume: the run's recorded arch / data specs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A two-step fine-tuning run of a model outside the allow-list (named with --arch by its user)."""
    from brn_cli.cli.app import main

    folder = tmp_path_factory.mktemp("run")
    torch.save(tiny_bn().state_dict(), folder / "bn.pt")
    run = folder / "run"
    args = ["finetune", str(folder / "bn.pt"), "--arch", "test_trust:tiny_bn", "--data", str(SAMPLE_DATA)]
    with pytest.raises(SystemExit) as info:
        main([*args, "-o", str(run), "--steps", "2", "--batch-size", "16"])
    assert info.value.code == 0
    return run


def _copy_run(run: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in run.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def _tamper_run(run: Path, **config_changes) -> None:
    """Edit the run's recorded settings where --resume reads them (last.pt) and in config.json."""
    raw = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    raw["training"]["config"].update(config_changes)
    torch.save(raw, run / "last.pt")
    config = json.loads((run / "config.json").read_text())
    config.update(config_changes)
    (run / "config.json").write_text(json.dumps(config))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_resume_with_a_tampered_arch_runs_nothing(run_cli, finished_run, tmp_path):
    marker = tmp_path / "marker"
    run = _copy_run(finished_run, tmp_path / "run")
    _tamper_run(run, arch="subprocess:run", arch_kwargs={"args": ["touch", str(marker)]})
    before = _snapshot(run)
    res = run_cli("finetune", "--resume", run)
    assert res.code != 0 and len(res.err_lines) == 1, res.err
    assert "records arch 'subprocess:run', which brn does not run from a file" in res.err
    assert "pass --arch" in res.err and "last.pt" in res.err
    assert not marker.exists()
    assert _snapshot(run) == before


def test_resume_with_a_tampered_trust_pickle_is_not_trusted(run_cli, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path / "run")
    _tamper_run(run, trust_pickle=True)
    res = run_cli("finetune", "--resume", run, "--arch", "test_trust:tiny_bn")
    assert res.code == 0, res.err
    raw = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert raw["training"]["config"]["trust_pickle"] is False  # only the command line grants it


def test_resume_with_a_tampered_data_spec_runs_nothing(run_cli, finished_run, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    (tmp_path / "trust_evil_data.py").write_text(
        f"def make():\n    open({str(marker)!r}, 'w').close()\n    return [], []\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _copy_run(finished_run, tmp_path / "run")
    _tamper_run(run, data="trust_evil_data:make")
    before = _snapshot(run)
    res = run_cli("finetune", "--resume", run, "--arch", "test_trust:tiny_bn")
    assert res.code != 0 and len(res.err_lines) == 1, res.err
    assert "records data 'trust_evil_data:make'" in res.err and "pass --data" in res.err
    assert not marker.exists()
    assert _snapshot(run) == before


def test_resume_of_a_run_outside_the_allow_list_needs_arch_again(run_cli, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path / "run")
    res = run_cli("finetune", "--resume", run)
    assert res.code != 0 and len(res.err_lines) == 1
    assert "records arch 'test_trust:tiny_bn'" in res.err and "pass --arch" in res.err
    res = run_cli("finetune", "--resume", run, "--arch", "test_trust:tiny_bn")
    assert res.code == 0, res.err


# ----------------------------------------------------------------------------------------------
# Damaged files: one line naming the file
# ----------------------------------------------------------------------------------------------


def test_brn_checkpoint_without_state_dict(run_cli, brn_ckpt, tmp_path):
    raw = torch.load(brn_ckpt, map_location="cpu", weights_only=True)
    del raw["state_dict"]
    torch.save(raw, tmp_path / "nosd.pt")
    for extra in ([], ["--key", "state_dict"]):
        res = run_cli("inspect", tmp_path / "nosd.pt", *extra)
        assert res.code == 2 and len(res.err_lines) == 1, res.err
        assert "nosd.pt" in res.err and "state_dict" in res.err and "KeyError" not in res.err
    for name, value in [
        ("arch", "mlp"),
        ("renorm_layers", [1]),
        ("state_dict", {"w": 3}),
        ("input_shape", "2x3"),
    ]:
        bad = _edited(brn_ckpt, tmp_path / f"bad_{name}.pt", **{name: value})
        res = run_cli("inspect", bad)
        assert res.code == 2 and len(res.err_lines) == 1, (name, res.err)
        assert f"bad_{name}.pt" in res.err and name.replace("_", " ")[:11] in res.err.replace("_", " "), (
            res.err
        )
        assert "Error:" not in res.err, (name, res.err)  # no raw exception type


def test_state_key_errors_name_the_file(run_cli, tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 1}, tmp_path / "w.pt")
    res = run_cli("inspect", tmp_path / "w.pt", "--key", "state_dict", "--arch", SAMPLE_ARCH)
    assert res.code == 2 and len(res.err_lines) == 1
    assert "w.pt" in res.err and "'state_dict'" in res.err and "model, epoch" in res.err


def test_truncated_and_corrupt_zip_checkpoints(run_cli, brn_ckpt, tmp_path):
    data = brn_ckpt.read_bytes()
    cases = {f"cut{i}.pt": data[: int(len(data) * f)] for i, f in enumerate((0.05, 0.5, 0.9, 0.999))}
    broken_directory = bytearray(data)
    end = broken_directory.rfind(b"PK\x05\x06")  # end of central directory record
    broken_directory[end : end + 4] = b"XXXX"
    cases["no_directory.pt"] = bytes(broken_directory)
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        res = run_cli("inspect", tmp_path / name)
        assert res.code == 2 and len(res.err_lines) == 1, (name, res.err)
        assert name in res.err and "truncated or damaged" in res.err, (name, res.err)
        assert "Errno" not in res.err and "miniz" not in res.err, (name, res.err)


def test_legacy_format_pickles_name_what_they_import(run_cli, tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"hook": os.system, "w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    res = run_cli("inspect", path, "--arch", SAMPLE_ARCH)
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert "legacy.pt" in res.err and "--trust-pickle" in res.err
    assert "posix.system" in res.err or "os.system" in res.err, res.err
    assert "Weights only load failed" not in res.err
    # A legacy-format module names its classes too.
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt", _use_new_zipfile_serialization=False)
    res = run_cli("inspect", tmp_path / "module.pt")
    assert "torch.nn.modules.linear.Linear" in res.err and "--trust-pickle" in res.err


# ----------------------------------------------------------------------------------------------
# Writing: a full disk is one line, and leaves nothing behind
# ----------------------------------------------------------------------------------------------


def _small_file_limit() -> None:  # runs in the child before exec: writes past 64 KiB fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory) -> Path:
    """A brn checkpoint of about 0.8 MB (more than the 64 KiB the write tests allow)."""
    path = tmp_path_factory.mktemp("big") / "big.pt"
    save_brn_checkpoint(
        convert_batchnorm(mlp(width=256)), path, arch_spec=SAMPLE_ARCH, arch_kwargs={"width": 256}
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        [
            "convert",
            "{bn}",
            "--arch",
            SAMPLE_ARCH,
            "--arch-kwargs",
            '{"width": 256}',
            "-o",
            "{out}/c.pt",
            "--input-shape",
            "2,1,28,28",
        ],
        ["export", "state-dict", "{brn}", "-o", "{out}/plain.pt"],
        ["export", "state-dict", "{brn}", "-o", "{out}/plain.safetensors"],
    ],
)
def test_a_write_that_stops_part_way_is_one_line(big_ckpt, tmp_path, args):
    # RLIMIT_FSIZE makes the write fail part-way with a real OS error, as a full disk does.
    torch.save(mlp(width=256).state_dict(), tmp_path / "bn.pt")
    out = tmp_path / "out"
    out.mkdir()
    names = {"{bn}": str(tmp_path / "bn.pt"), "{brn}": str(big_ckpt), "{out}": str(out)}
    argv = [names.get(a, a).replace("{out}", str(out)) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "brn_cli", *argv],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        preexec_fn=_small_file_limit,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"brn: error: cannot write {out}/"), lines[0]
    assert "unexpected pos" not in lines[0] and "RuntimeError" not in lines[0], lines[0]
    assert _files_under(out) == []  # no partial file, no temporary


def _mount_tiny_tmpfs(folder: Path) -> bool:
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs is Linux")
def test_disk_full_on_save_is_one_line(big_ckpt, tmp_path):
    full = tmp_path / "full"
    if not _mount_tiny_tmpfs(full):
        pytest.skip(
            "mounting a tmpfs needs root; test_a_write_that_stops_part_way_is_one_line covers the path"
        )
    try:
        for out in (full / "plain.pt", full / "plain.safetensors"):
            proc = subprocess.run(
                [sys.executable, "-m", "brn_cli", "export", "state-dict", str(big_ckpt), "-o", str(out)],
                capture_output=True,
                text=True,
                env=_env(),
                timeout=300,
            )
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.strip() == f"brn: error: cannot write {out}: no space left on device", (
                proc.stderr
            )
            assert list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", str(full)], check=False)


# ----------------------------------------------------------------------------------------------
# Text from files is printed as text; shapes from files are bounded
# ----------------------------------------------------------------------------------------------


def test_printable_escapes_control_and_format_characters():
    from brn_cli.storage.checkpoint import printable

    assert printable("a\x1b[31mb") == "a\\x1b[31mb"
    assert printable("x\ny\u202ez") == "x\\ny\\u202ez"
    assert printable("plain [red]x[/red] ünïcode") == "plain [red]x[/red] ünïcode"


def test_inspect_prints_names_from_files_as_plain_text(run_cli, tmp_path):
    state = {k: v for k, v in odd_names().state_dict().items()}
    torch.save({"state_dict": state, "[red]x[/red]\x1b[31m": 1}, tmp_path / "odd.pt")
    res = run_cli("inspect", tmp_path / "odd.pt", "--arch", "test_trust:odd_names")
    assert res.code == 0, res.err
    assert "\x1b" not in res.out
    assert "[red]x[/red]\\x1b[31m" in res.out  # the key, and the layer name in the table, shown literally
    assert res.out.count("[red]x[/red]") >= 2
    res = run_cli("inspect", tmp_path / "odd.pt", "--arch", "test_trust:odd_names", "--json")
    report = json.loads(res.out)  # JSON keeps the real names (escaped by JSON itself)
    assert report["norms"][0]["name"] == "[red]x[/red]\x1b[31m"
    assert "\x1b" not in res.out


def test_convert_prints_names_from_files_as_plain_text(run_cli, tmp_path):
    torch.save(odd_names().state_dict(), tmp_path / "odd.pt")
    res = run_cli("convert", tmp_path / "odd.pt", "--arch", "test_trust:odd_names", "--dry-run")
    assert res.code == 0, res.err
    assert "\x1b" not in res.out
    assert "[red]x[/red]\\x1b[31m" in res.out  # the layer name in the table, shown literally


def test_error_lines_show_names_from_files_as_plain_text(run_cli, tmp_path):
    torch.save({"\x1b[2J\x1b[31mevil": torch.zeros(1)}, tmp_path / "keys.pt")
    res = run_cli("inspect", tmp_path / "keys.pt", "--arch", SAMPLE_ARCH)
    assert res.code == 2 and len(res.err_lines) == 1
    assert "\x1b" not in res.err and "\\x1b[2J" in res.err


def test_a_huge_recorded_input_shape_is_refused_before_allocating(run_cli, brn_ckpt, tmp_path):
    huge = _edited(brn_ckpt, tmp_path / "huge.pt", input_shape=[1000000, 3, 100000, 100000])
    for args in (["inspect", huge], ["export", "onnx", huge, "-o", tmp_path / "m.onnx"]):
        res = run_cli(*args)
        assert res.code == 2 and len(res.err_lines) == 1, res.err
        assert "huge.pt" in res.err and "--input-shape" in res.err and "2**28" in res.err, res.err
    assert not (tmp_path / "m.onnx").exists()
    # The user's own shape replaces the recorded one.
    res = run_cli("inspect", huge, "--input-shape", "2,1,28,28")
    assert res.code == 0, res.err
    for bad in ([2, -1, 28, 28], [2, "1", 28], [True, 1], [7]):
        path = _edited(brn_ckpt, tmp_path / "bad.pt", input_shape=bad)
        res = run_cli("inspect", path)
        assert res.code == 2 and len(res.err_lines) == 1 and "bad.pt" in res.err, (bad, res.err)
    from brn_cli.storage.checkpoint import MAX_RECORDED_INPUT_ELEMENTS

    assert MAX_RECORDED_INPUT_ELEMENTS == 2**28


def test_recorded_kwargs_that_would_allocate_a_huge_model_are_refused(brn_ckpt, tmp_path):
    # The architecture is built on the meta device first: a recorded num_classes of 10**9 would allocate 32 GB.
    bad = _edited(
        brn_ckpt,
        tmp_path / "wide.pt",
        arch={"spec": SAMPLE_ARCH, "kwargs": {"width": 8, "num_classes": 10**9}},
    )
    with pytest.raises(BrnError, match="do not match") as info:
        load_checkpoint(bad)
    assert "wide.pt" in str(info.value)
