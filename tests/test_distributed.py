"""Distributed renorm (issue 6): 2 gloo processes on CPU against single-process references.

One torch.multiprocessing.spawn runs every layer-level check (a spawn costs a few seconds of imports):
- global stats, 2 ranks x B/2 == one process with batch B (parameters and buffers after several SGD steps);
- local stats, 2 ranks x B/2 == one process with microbatch B/2 (the same math: each half normalized on its
  own, moving averages stepped towards the mean of the halves), and buffers bitwise equal on both ranks;
- the buffer check catches a perturbed buffer; plain BatchNorm buffers are averaged; a rendezvous that can
  never complete and a rank that dies both end in one clear BrnError.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from brn_cli.errors import BrnError
from brn_cli.nn.layer import BatchRenorm1d, BatchRenorm2d, BatchRenormNd

B = 8  # global batch; each of the 2 ranks gets B // 2
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        BatchRenorm2d(4, momentum=0.1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        BatchRenorm1d(6, momentum=0.1),
        nn.ReLU(),
        nn.Linear(6, 3),
    )
    for m in model.modules():
        if isinstance(m, BatchRenormNd):
            # Tight limits so that r and d are actually clipped in some channels.
            m.rmax, m.dmax = 1.5, 0.5
    return model


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(B, 3, 5, 5, generator=g) * 2.0 + 0.7
    y = torch.randint(0, 3, (B,), generator=g)
    return x, y


def _train(model: nn.Module, rows: slice, steps: int = STEPS) -> list[float]:
    """SGD on rows `rows` of each global batch; returns the clip fractions seen (to prove r/d clipped)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clips = []
    for step in range(steps):
        x, y = _batch(step)
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        inner = model.module if hasattr(model, "module") else model
        tele = [m.last_telemetry() for m in inner.modules() if isinstance(m, BatchRenormNd)]
        clips.append(max(t.r_clip_frac + t.d_clip_frac for t in tele if t is not None))
    return clips


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = model.module if hasattr(model, "module") else model
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def _worker(rank: int, out_dir: str, bad_port: int, port: int) -> None:
    from brn_cli.train import distributed as D

    torch.set_num_threads(1)
    out: dict = {}
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE="3", RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["MASTER_PORT"] = str(bad_port)
    # A rendezvous that cannot complete (3 ranks expected, 2 come) must end with one clear error.
    try:
        D.init_distributed("cpu", timeout_s=2)
        out["rdzv_error"] = None
    except BrnError as exc:
        out["rdzv_error"] = str(exc)

    os.environ.update(WORLD_SIZE="2", MASTER_PORT=str(port))
    ctx = D.init_distributed("cpu", timeout_s=20)
    out["ctx"] = (ctx.rank, ctx.world_size, ctx.backend, ctx.device)
    rows = slice(rank * (B // 2), (rank + 1) * (B // 2))

    for mode in ("global", "local"):
        model = _make_model()
        report = D.configure_stats_sync(model, mode, ctx)
        out[f"{mode}_renorm_layers"] = report.renorm_layers
        ddp = D.wrap_model(model, ctx)
        out[f"{mode}_clips"] = _train(ddp, rows)
        out[f"{mode}_state"] = _state(ddp)
        out[f"{mode}_diffs"] = D.buffer_differences(ddp, ctx, parameters=True)
        out[f"{mode}_check"] = D.check_buffers_equal(ddp, ctx)
        out[f"{mode}_deepcopy"] = copy.deepcopy(model).training  # a synced model must still deep-copy

    # Microbatches (section 4.2) under DDP: each rank's groups are local, the moving-average step is shared.
    model = _make_model()
    D.configure_stats_sync(model, "global", ctx)
    for m in model.modules():
        if isinstance(m, BatchRenormNd):
            m.microbatch = 2
    ddp = D.wrap_model(model, ctx)
    _train(ddp, rows, steps=2)
    out["microbatch_diffs"] = D.buffer_differences(ddp, ctx)

    # Consistency check: perturb one buffer on rank 1 -> every rank refuses.
    model = _make_model()
    D.configure_stats_sync(model, "local", ctx)
    if rank == 1:
        with torch.no_grad():
            model[1].running_mean[2] += 1e-3
    try:
        D.check_buffers_equal(model, ctx)
        out["perturbed_error"] = None
    except BrnError as exc:
        out["perturbed_error"] = str(exc)

    # Plain BatchNorm left unconverted normalizes per rank on CPU; its buffers get averaged.
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    rep = D.configure_stats_sync(plain, "global", ctx)
    out["plain_local"] = rep.local_batchnorm
    with torch.no_grad():
        plain[1].running_mean.fill_(float(rank))
    out["plain_averaged"] = D.average_batchnorm_buffers(plain, ctx)
    out["plain_mean"] = plain[1].running_mean.clone()

    # Metrics collectives.
    out["sum"] = ctx.sum([1.0, float(rank)])
    out["bcast"] = ctx.broadcast_object({"from": rank})

    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    ctx.barrier()
    # A rank that dies: rank 1 leaves (exit code 0, so spawn does not kill rank 0 first).
    if rank == 1:
        sys.stdout.flush()
        os._exit(0)
    try:
        with D.peer_failures(ctx, last_checkpoint="run/last.pt"):
            ctx.sum([1.0])
            ctx.sum([1.0])
        dead = None
    except BrnError as exc:
        dead = str(exc)
    torch.save(dead, Path(out_dir) / "dead.pt")
    os._exit(0)  # skip destroy_process_group, whose peer is gone


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict, dict, str | None]:
    out_dir = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(
        _worker, args=(str(out_dir), _free_port(), _free_port()), nprocs=2, join=False, start_method="spawn"
    )
    # Bounded wait: never leave processes behind.
    deadline_s = 90
    import time

    start = time.monotonic()
    while not ctx.join(timeout=1):
        if time.monotonic() - start > deadline_s:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("distributed workers did not finish in time")
    r0 = torch.load(out_dir / "rank0.pt", weights_only=False)
    r1 = torch.load(out_dir / "rank1.pt", weights_only=False)
    dead = torch.load(out_dir / "dead.pt", weights_only=False)
    return r0, r1, dead


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.distributed
@pytest.mark.slow
def test_process_group_setup(ranks):
    r0, r1, _ = ranks
    assert r0["ctx"] == (0, 2, "gloo", "cpu")
    assert r1["ctx"] == (1, 2, "gloo", "cpu")
    assert r0["global_renorm_layers"] == 2
    assert r0["sum"] == [2.0, 1.0] == r1["sum"]
    assert r1["bcast"] == {"from": 0}


@pytest.mark.distributed
@pytest.mark.slow
def test_global_matches_single_process_with_full_batch(ranks):
    r0, r1, _ = ranks
    ref = _make_model()
    clips = _train(ref, slice(0, B))
    assert max(clips) > 0, "the test must exercise clipped r/d"
    assert max(r0["global_clips"]) > 0
    ref_state = _state(ref)
    # Both ranks hold the single-process model with the full batch, parameters and buffers.
    assert _max_diff(r0["global_state"], ref_state) < 1e-5
    assert _max_diff(r1["global_state"], ref_state) < 1e-5
    # Moving averages moved away from their initial (0, 1), so the comparison is not vacuous.
    assert ref_state["1.running_mean"].abs().max() > 0.05
    assert max(r0["global_diffs"].values()) == 0.0
    assert r0["global_check"] == 0.0
    assert r0["global_deepcopy"] is True


@pytest.mark.distributed
@pytest.mark.slow
def test_local_keeps_buffers_identical_and_matches_microbatch_reference(ranks):
    r0, r1, _ = ranks
    # Bitwise identical buffers (and parameters) on both ranks.
    assert max(r0["local_diffs"].values()) == 0.0
    assert _max_diff(r0["local_state"], r1["local_state"]) == 0.0
    # Same math in one process: each half of the batch normalized on its own (microbatch = B/2),
    # moving averages stepped towards the mean over halves of mu_B and sigma_B.
    ref = _make_model()
    for m in ref.modules():
        if isinstance(m, BatchRenormNd):
            m.microbatch = B // 2
    _train(ref, slice(0, B))
    assert _max_diff(r0["local_state"], _state(ref)) < 1e-5
    # ... and it is not the global computation.
    assert _max_diff(r0["local_state"], r0["global_state"]) > 1e-4


@pytest.mark.distributed
@pytest.mark.slow
def test_microbatch_under_ddp_keeps_buffers_identical(ranks):
    r0, _, _ = ranks
    assert "1.running_mean" in r0["microbatch_diffs"]
    assert max(r0["microbatch_diffs"].values()) == 0.0


@pytest.mark.distributed
@pytest.mark.slow
def test_buffer_check_catches_divergence(ranks):
    r0, r1, _ = ranks
    for r in (r0, r1):
        assert r["perturbed_error"] is not None
        assert "1.running_mean" in r["perturbed_error"] and "differ across ranks" in r["perturbed_error"]


@pytest.mark.distributed
@pytest.mark.slow
def test_plain_batchnorm_buffers_averaged(ranks):
    r0, r1, _ = ranks
    assert r0["plain_local"] == ["1"]
    assert r0["plain_averaged"] == 1
    assert torch.equal(r0["plain_mean"], torch.full((4,), 0.5))
    assert torch.equal(r1["plain_mean"], r0["plain_mean"])


@pytest.mark.distributed
@pytest.mark.slow
def test_failures_end_with_one_clear_message(ranks):
    r0, r1, dead = ranks
    for r in (r0, r1):
        assert r["rdzv_error"] is not None and "could not join the 3-process group" in r["rdzv_error"]
    assert dead is not None
    assert "lost contact with another rank" in dead and "run/last.pt" in dead
    assert "pair.cc" not in dead and "\n" not in dead  # the backend's reason, without its source location


def test_single_process_context_is_a_no_op(monkeypatch):
    from brn_cli.train import distributed as D
    from brn_cli.train import launch as D_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = D.init_distributed("cpu")
    assert not ctx.distributed and ctx.is_main
    model = _make_model()
    assert D.wrap_model(model, ctx) is model
    assert D.configure_stats_sync(model, "global", ctx).renorm_layers == 2
    assert all(m.process_group is None for m in model.modules() if isinstance(m, BatchRenormNd))
    assert ctx.sum([1.5]) == [1.5]
    with pytest.raises(BrnError, match="`stats_sync`"):
        D.parse_stats_sync("sometimes")
    with pytest.raises(BrnError, match="`nproc`"):
        D_launch.torchrun_command(0, ["brn_cli"])
    # Under torchrun an explicit GPU index would put every rank on the same GPU.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(BrnError, match="every rank on one GPU"):
        D.init_distributed("cuda:1")


# ----------------------------------------------------------------------------------------------
# brn finetune on torchrun (2 gloo processes): global == one process, resume across world sizes, a dying rank
# ----------------------------------------------------------------------------------------------


class _DieAt(nn.Module):
    """Identity that ends the process of rank `rank` at its `at`-th training forward (a crashing worker)."""

    def __init__(self, at: int, rank: int = 1) -> None:
        super().__init__()
        self.at, self.rank, self.calls = at, rank, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.at and os.environ.get("RANK") == str(self.rank):
            self.calls += 1
            if self.calls == self.at:
                os._exit(7)
        return x


def tiny_mlp(die_at: int = 0) -> nn.Module:
    """Arch `test_distributed:tiny_mlp`: Linear-BN1d-ReLU twice, then a classifier (16 -> 4 classes)."""
    return nn.Sequential(
        nn.Linear(16, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        _DieAt(die_at),
        nn.Linear(12, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 4),
    )


@pytest.fixture(scope="module")
def ft_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ftdist")
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 1.5
    y = torch.randint(0, 4, (320,), generator=g)
    x = centers[y] + torch.randn(320, 16, generator=g) * 2.0 + 0.5
    import numpy as np

    np.savez(
        folder / "data.npz",
        x_train=x[:256].numpy(),
        y_train=y[:256].numpy(),
        x_val=x[256:].numpy(),
        y_val=y[256:].numpy(),
    )
    torch.manual_seed(0)
    torch.save({"model_state_dict": tiny_mlp().state_dict()}, folder / "bn.pt")
    return folder


def _ft_config(files: Path, out: Path, **kw):
    from brn_cli.train.finetune import FinetuneConfig

    base = {
        "checkpoint": str(files / "bn.pt"),
        "data": str(files / "data.npz"),
        "output": str(out),
        "arch": "test_distributed:tiny_mlp",
        "steps": 8,
        "batch_size": 32,
        "lr": 0.05,
        "lr_schedule": "constant",
        "rmax_schedule": "1.5",
        "dmax_schedule": "0.5",
        "momentum": 0.1,
        "eval_every": 4,
        "save_every": 4,
        "log_every": 2,
        "device": "cpu",
    }
    return FinetuneConfig(**{**base, **kw})


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _extend(last_pt: Path, steps: int) -> None:
    """Turn a finished run into one with `steps` total (the schedules here are constants)."""
    ckpt = torch.load(last_pt, map_location="cpu", weights_only=True)
    ckpt["training"]["config"]["steps"] = steps
    ckpt["training"]["total_steps"] = steps
    torch.save(ckpt, last_pt)


@pytest.fixture
def torchrun_env(monkeypatch):
    # Workers import the arch from this folder; one thread each on the shared cores.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.distributed
@pytest.mark.slow
def test_finetune_two_ranks_matches_one_and_resumes_on_one(ft_files, tmp_path, torchrun_env):
    from brn_cli.train.finetune import run_finetune
    from brn_cli.train.launch import torchrun_command

    ref8 = run_finetune(_ft_config(ft_files, tmp_path / "ref8"), progress=False)
    run_finetune(_ft_config(ft_files, tmp_path / "ref12", steps=12), progress=False)

    # 2 processes x 16 = the same global batch of 32: `torchrun --standalone --nproc-per-node 2 -m brn_cli ...`
    two = tmp_path / "two"
    args = [
        "brn_cli", "finetune", ft_files / "bn.pt", "--data", ft_files / "data.npz", "-o", two,
        "--arch", "test_distributed:tiny_mlp", "--steps", "8", "--batch-size", "16", "--lr", "0.05",
        "--lr-schedule", "constant", "--rmax-schedule", "1.5", "--dmax-schedule", "0.5", "--momentum", "0.1",
        "--eval-every", "4", "--save-every", "4", "--log-every", "2", "--device", "cpu",
        "--stats-sync", "global", "--json",
    ]  # fmt: skip
    proc = subprocess.run(
        torchrun_command(2, [str(a) for a in args]), capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # rank 0 alone prints (one JSON document)
    assert summary["steps"] == 8
    # global stats: the 2-rank run is the 1-process run with the full batch (weights and moving averages).
    diff = _max_diff(_model_state(two / "last.pt"), _model_state(tmp_path / "ref8" / "last.pt"))
    print(f"max |diff| {diff:.3g}")  # shown with pytest -s
    assert diff < 1e-5, diff
    assert _model_state(two / "last.pt")["1.running_mean"].abs().max() > 0.05  # the averages did move
    # Rank 0 alone wrote the metrics; validation over the two shards equals the full-set evaluation.
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]
    assert abs(summary["final"]["val_accuracy"] - ref8.final["val_accuracy"]) < 1e-9
    assert abs(summary["final"]["val_loss"] - ref8.final["val_loss"]) < 1e-5
    assert abs(summary["final"]["train_loss"] - ref8.final["train_loss"]) < 1e-5  # summed over ranks
    saved = torch.load(two / "last.pt", map_location="cpu", weights_only=True)["training"]
    assert saved["world_size"] == 2 and saved["config"]["batch_size"] == 16

    # The 2-rank checkpoint resumes on 1 process: the global batch (32) is kept, so the run carries on
    # exactly as the uninterrupted 1-process run of 12 steps.
    _extend(two / "last.pt", 12)
    resumed = run_finetune(_ft_config(ft_files, two, resume=str(two)), progress=False)
    assert resumed.resumed_from == 8 and resumed.steps == 12
    diff = _max_diff(_model_state(two / "last.pt"), _model_state(tmp_path / "ref12" / "last.pt"))
    print(f"max |diff| {diff:.3g}")  # shown with pytest -s
    assert diff < 1e-5, diff
    saved = torch.load(two / "last.pt", map_location="cpu", weights_only=True)["training"]
    assert saved["world_size"] == 1 and saved["config"]["batch_size"] == 32


@pytest.mark.distributed
@pytest.mark.slow
def test_finetune_one_rank_resumes_on_two_then_a_dead_rank_ends_the_run(
    ft_files, tmp_path, run_cli, torchrun_env
):
    from brn_cli.train.finetune import run_finetune

    # A 1-process run with grouped batches (4 labels x 8 examples), stopped at step 4.
    kw = {"sampler": "grouped:8", "save_every": 2, "eval_every": 0, "arch_kwargs": {"die_at": 3}}
    out = tmp_path / "one"
    run_finetune(_ft_config(ft_files, out, steps=4, **kw), progress=False)
    run_finetune(_ft_config(ft_files, tmp_path / "ref6", steps=6, **kw), progress=False)
    _extend(out / "last.pt", 12)

    # `brn finetune --resume --nproc 2`: 2 x 16 continue the global batch of 32 from step 4; rank 1 dies in
    # its 3rd training forward (step 7), after last.pt of step 6 was written.
    # (--save-every is one of the options a resume takes from the command line, defaults included.)
    # (--arch too: the recorded test arch is not allow-listed; its recorded kwargs, die_at, still apply.)
    result = run_cli(
        "finetune", "--resume", out, "--arch", "test_distributed:tiny_mlp", "--nproc", "2", "--device", "cpu",
        "--save-every", "2",
    )  # fmt: skip
    assert result.code != 0
    assert len(result.err_lines) == 1, result.err
    message = result.err_lines[0]
    assert message.startswith("brn: error: the 2-process run failed"), message
    assert f"last complete checkpoint is {out / 'last.pt'}" in message
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["training"]["step"] == 6
    assert ckpt["training"]["world_size"] == 2 and ckpt["training"]["config"]["batch_size"] == 16
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left
    # Steps 5-6 on 2 ranks (grouped batches sliced per rank, global stats) = steps 5-6 in one process.
    diff = _max_diff(ckpt["state_dict"], _model_state(tmp_path / "ref6" / "last.pt"))
    print(f"max |diff| {diff:.3g}")  # shown with pytest -s
    assert diff < 1e-5, diff


@pytest.mark.distributed
@pytest.mark.slow
def test_finetune_on_two_nodes_with_local_stats(ft_files, tmp_path, torchrun_env):
    """Two torchrun agents joined through the c10d rendezvous, as on two machines (here both on localhost,
    one process each: LOCAL_RANK is 0 on both, so only RANK may decide who writes). `--stats-sync local`:
    each rank normalizes its own 16 examples, which is one process normalizing microbatches of 16."""
    from brn_cli.train.finetune import run_finetune

    ref = run_finetune(_ft_config(ft_files, tmp_path / "ref", microbatch=16), progress=False)
    out, port = tmp_path / "nodes", _free_port()
    args = [
        "-m", "brn_cli", "finetune", ft_files / "bn.pt", "--data", ft_files / "data.npz", "-o", out,
        "--arch", "test_distributed:tiny_mlp", "--steps", "8", "--batch-size", "16", "--lr", "0.05",
        "--lr-schedule", "constant", "--rmax-schedule", "1.5", "--dmax-schedule", "0.5", "--momentum", "0.1",
        "--eval-every", "4", "--save-every", "4", "--log-every", "2", "--device", "cpu",
        "--stats-sync", "local", "--json",
    ]  # fmt: skip
    node = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"brn-test-{port}",
        "--rdzv-conf", "join_timeout=60", *[str(a) for a in args],
    ]  # fmt: skip
    procs = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    printed = [stdout for stdout, _ in outputs if stdout.strip()]
    assert len(printed) == 1  # global rank 0 alone reports
    summary = json.loads(printed[0])
    assert summary["steps"] == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]  # written once
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert saved["training"]["world_size"] == 2
    diff = _max_diff(saved["state_dict"], _model_state(tmp_path / "ref" / "last.pt"))
    print(f"max |diff| {diff:.3g}")  # shown with pytest -s
    assert diff < 1e-5, diff
    assert abs(summary["final"]["val_accuracy"] - ref.final["val_accuracy"]) < 1e-9
