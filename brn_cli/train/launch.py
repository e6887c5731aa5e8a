"""Fine-tuning on ``nproc`` local processes: starts ``python -m torch.distributed.run`` on this machine and
collects rank 0's result (each worker runs :func:`brn_cli.train.finetune.run_finetune`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brn_cli.errors import BrnError

if TYPE_CHECKING:  # pragma: no cover
    from brn_cli.train.config import FinetuneConfig


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """The torchrun command line that starts `nproc` copies of ``python -m <module_args...>``.

    torchrun's standalone mode runs a local rendezvous on a free port, so parallel jobs on one machine do
    not collide.
    """
    if nproc < 1:
        raise BrnError(f"`nproc` must be >= 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        *module_args,
    ]


def check_launch(config: FinetuneConfig, nproc: int) -> None:
    """Check, once and before any process starts, what each of the `nproc` processes would check before it
    trains: the settings, the run to resume (its folder, the settings it recorded and what may change), the
    split of its global batch over `nproc` processes, the data options and that the data and the
    checkpoint exist. A mistake is then one BrnError here, rather than one message per process followed by
    torchrun's failure report. Reads no data, builds no model, writes nothing.
    """
    from brn_cli.data.samplers import parse_sampler
    from brn_cli.data.specs import check_data_spec
    from brn_cli.storage.checkpoint import _check_file
    from brn_cli.train.config import data_options, per_process_batch, validate
    from brn_cli.train.distributed import launched_by_torchrun
    from brn_cli.train.trainer import read_resume_state

    if nproc < 1:
        raise BrnError(f"`nproc` must be >= 1, got {nproc}")
    if launched_by_torchrun():
        raise BrnError("`nproc` launches torchrun itself; under torchrun leave it out")
    config, resume_state = read_resume_state(config)
    validate(config)
    parse_sampler(config.sampler)
    if resume_state is not None:
        batch = per_process_batch(config, int(resume_state.get("world_size", 1)), nproc)
        validate(dataclasses.replace(config, batch_size=batch))
    check_data_spec(config.data, **data_options(config))
    if resume_state is None:  # a resumed run starts from its own last.pt, read above
        _check_file(Path(config.checkpoint))


def launch_finetune(config: Any, nproc: int, *, timeout_s: float | None = None, progress: bool = True) -> Any:
    """Run :func:`brn_cli.train.finetune.run_finetune` on `nproc` local processes via torchrun; return its result.

    The config travels as JSON (it is JSON-serialisable by contract) and rank 0 writes the FinetuneResult
    back as JSON. If a rank fails, torchrun stops the others; we raise one BrnError naming the newest
    complete checkpoint in the run folder. `timeout_s` bounds the whole launch (None: no bound). The
    configuration is checked first (:func:`check_launch`), so a mistake is reported once.
    """
    from dataclasses import asdict

    check_launch(config, nproc)
    with tempfile.TemporaryDirectory(prefix="brn-launch-") as tmp:
        config_path = Path(tmp) / "config.json"
        result_path = Path(tmp) / "result.json"
        config_path.write_text(json.dumps(asdict(config)))
        cmd = torchrun_command(nproc, ["brn_cli.train.launch", str(config_path), str(result_path)])
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        env["BRN_PROGRESS"] = "1" if progress else "0"
        proc = subprocess.Popen(cmd, env=env)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            _stop(proc)
            raise BrnError(f"the {nproc}-process run did not finish within {timeout_s:g}s") from exc
        except KeyboardInterrupt:
            # The workers got the same SIGINT: they finish the step, save last.pt and exit. Wait for that.
            _stop(proc, grace_s=120.0, signal_first=False)
            from brn_cli.train.finetune import FinetuneInterrupted

            last = last_complete_checkpoint(config.output)
            raise FinetuneInterrupted(
                f"interrupted; the last complete checkpoint is {last} (continue with "
                f"`resume={config.output}`)",
                2,
            ) from None
        if returncode != 0 or not result_path.exists():
            last = last_complete_checkpoint(config.output)
            where = f"; the last complete checkpoint is {last}" if last else "; no checkpoint was written"
            raise BrnError(
                f"the {nproc}-process run failed (torchrun exit code {returncode}, see the rank "
                f"messages above){where}"
            )
        data = json.loads(result_path.read_text())
    from brn_cli.train.finetune import FinetuneResult

    return FinetuneResult(**data)


def _stop(proc: subprocess.Popen, grace_s: float = 30.0, signal_first: bool = True) -> None:
    """End a launched torchrun: SIGTERM (it forwards it to the workers), then SIGKILL after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        if signal_first:
            proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()


def last_complete_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """``last.pt`` of the run (what ``resume`` continues from), else its newest ``*.pt``.

    Checkpoints are written atomically, so any file that exists is complete.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        return None
    if (folder / "last.pt").is_file():
        return str(folder / "last.pt")
    files = [p for p in folder.rglob("*.pt") if not p.name.startswith(".")]
    if not files:
        return None
    return str(max(files, key=lambda p: p.stat().st_mtime))


def _worker_main(argv: list[str]) -> int:
    """Entry of each torchrun worker started by :func:`launch_finetune`: run, report BrnError in one line."""
    from dataclasses import asdict

    if len(argv) != 2:
        sys.stderr.write("usage: python -m brn_cli.train.launch CONFIG.json RESULT.json\n")
        return 2
    from brn_cli.train.finetune import FinetuneConfig, run_finetune

    rank = os.environ.get("RANK", "0")
    try:
        config = FinetuneConfig(**json.loads(Path(argv[0]).read_text()))
        result = run_finetune(config, progress=rank == "0" and os.environ.get("BRN_PROGRESS") != "0")
    except BrnError as exc:
        sys.stderr.write(f"brn: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"brn: rank {rank} interrupted\n")
        return 130
    if rank == "0":
        Path(argv[1]).write_text(json.dumps(asdict(result), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
