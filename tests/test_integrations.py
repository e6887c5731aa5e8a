"""The optional trainer integrations with the real packages: Lightning's and Hugging Face's callbacks.

Tiny models (two conv layers with BatchNorm, or a two-stage ResNetForImageClassification built from a small
config, random weights, nothing downloaded), 8 steps on CPU. Each test checks what a user relies on: the
layers are converted, the limits at every step are the schedule's at the trainer's global step, the
telemetry reaches the trainer's log, a resume from the trainer's checkpoint continues limits and weights
exactly as the uninterrupted run, and under DDP (2 processes, gloo: Lightning's strategy with
``sync_batchnorm=True``, transformers' Trainer under torchrun) the renorm layers survive and compute the
statistics of the global batch (weights equal to one process with the whole batch).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import brn_cli
from brn_cli.train.schedule import parse_schedule, preset_schedules

REPO = Path(__file__).resolve().parents[1]
# Random weights and 8 steps: the limits open on far-off statistics on purpose (the warning is tested in
# test_schedule.py).
pytestmark = pytest.mark.filterwarnings("ignore::brn_cli.train.schedule.RenormOpeningWarning")
SPECS = ("2:1,10:3", "2:0,12:5")  # limits that move at every step after the BatchNorm phase


def expected_limits(steps: range) -> list[tuple[float, float]]:
    rmax, dmax = (parse_schedule(spec, kind=kind) for spec, kind in zip(SPECS, ("rmax", "dmax"), strict=True))
    return [(rmax(s), dmax(s)) for s in steps]


def images(n: int = 32, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    return torch.randn(n, 3, 8, 8, generator=gen) + labels.view(-1, 1, 1, 1) * 0.5, labels


def conv_net(classes: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` as a user would (brn importable, one thread a process) and require success."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------------------
# Lightning
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pl():
    return pytest.importorskip("pytorch_lightning")


def lightning_parts(pl):
    """A LightningModule around conv_net and a recorder of the limits each step ran with."""

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = conv_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.limits: dict[int, tuple[float, float]] = {}
            self.layer_types: set[str] = set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            layers = brn_cli.renorm_layers(pl_module)
            self.layer_types |= {type(m).__name__ for m in pl_module.modules()}
            assert len({(m.rmax, m.dmax) for _, m in layers}) == 1
            self.limits[trainer.global_step] = (layers[0][1].rmax, layers[0][1].dmax)

    return Module, Recorder


def loader(batch_size: int = 4, n: int = 16):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(*images(n)), batch_size=batch_size, shuffle=False)


def trainer_for(pl, tmp_path: Path, callbacks: list, **kwargs):
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 8,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "logger": False,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    return pl.Trainer(callbacks=callbacks, **options)


@pytest.mark.slow
def test_lightning_callback_converts_follows_the_schedule_and_logs_telemetry(pl, tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    from brn_cli.integrations.lightning import BatchRenormCallback

    Module, Recorder = lightning_parts(pl)
    module, recorder = Module(), Recorder()
    renorm = BatchRenormCallback(SPECS)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    trainer = trainer_for(pl, tmp_path, [renorm, recorder], logger=logger)
    trainer.fit(module, loader())

    assert {"BatchRenorm2d"} <= recorder.layer_types and "BatchNorm2d" not in recorder.layer_types
    assert list(recorder.limits.items()) == list(zip(range(8), expected_limits(range(8)), strict=True))
    with open(tmp_path / "logs" / "version_0" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("brn/rmax")]
    assert [int(r["step"]) for r in rows] == list(range(8))
    logged = [(float(r["brn/rmax"]), float(r["brn/dmax"])) for r in rows]
    assert logged == expected_limits(range(8))  # the limits each step ran with
    assert [float(r["brn/batchnorm_phase"]) for r in rows] == [1.0, 1.0, 1.0] + [0.0] * 5
    assert all(float(r["brn/mean_abs_log_r"]) > 0 for r in rows)
    assert trainer.callback_metrics["brn/rmax"] == pytest.approx(expected_limits(range(7, 8))[0][0])


@pytest.mark.slow
def test_lightning_preset_spans_the_estimated_optimizer_steps(pl, tmp_path):
    """No total_steps: paper-scaled stretches to trainer.estimated_stepping_batches (2 epochs of 4 batches,
    accumulating 2: 4 optimizer steps), and microbatches do not move the schedule."""
    from brn_cli.integrations.lightning import BatchRenormCallback

    Module, Recorder = lightning_parts(pl)
    renorm, recorder = BatchRenormCallback(), Recorder()
    trainer = trainer_for(
        pl, tmp_path, [renorm, recorder], max_steps=-1, max_epochs=2, accumulate_grad_batches=2
    )
    trainer.fit(Module(), loader())
    rmax, dmax = preset_schedules("paper-scaled", total_steps=4)
    assert renorm.scheduler.rmax.knots == rmax.knots and renorm.scheduler.dmax.knots == dmax.knots
    assert trainer.global_step == 4 and sorted(recorder.limits) == [0, 1, 2, 3]
    assert recorder.limits == {s: (rmax(s), dmax(s)) for s in range(4)}


@pytest.mark.slow
def test_lightning_resume_from_ckpt_path_continues_exactly(pl, tmp_path):
    """Run 8 steps saving at each epoch's end; a new trainer, module and callback resumed from the step-4
    checkpoint runs steps 4..7 with the same limits and ends with the same weights and statistics. One batch
    per epoch: Lightning replays a plain DataLoader's epoch from its start on resume, which would change
    the data, not anything brn holds."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from brn_cli.integrations.lightning import BatchRenormCallback

    Module, Recorder = lightning_parts(pl)
    saves = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    full, full_recorder = Module(), Recorder()
    trainer_for(
        pl, tmp_path, [BatchRenormCallback(SPECS), full_recorder, saves], enable_checkpointing=True
    ).fit(full, loader(n=4))
    checkpoint = tmp_path / "ckpt" / "epoch=3-step=4.ckpt"
    saved = torch.load(checkpoint, weights_only=True)["callbacks"]["BatchRenormCallback"]
    assert saved["scheduler"]["step"] == 4

    resumed, recorder = Module(), Recorder()
    renorm = BatchRenormCallback()  # another schedule: the checkpoint's wins
    trainer_for(pl, tmp_path, [renorm, recorder]).fit(resumed, loader(n=4), ckpt_path=checkpoint)
    assert sorted(recorder.limits) == [4, 5, 6, 7]
    assert recorder.limits == {s: full_recorder.limits[s] for s in range(4, 8)}
    assert recorder.limits == dict(zip(range(4, 8), expected_limits(range(4, 8)), strict=True))
    assert renorm.scheduler.step == 8
    assert_same_state(state_of(resumed), state_of(full))


@pytest.mark.slow
def test_lightning_callback_refuses_a_model_it_cannot_drive(pl, tmp_path):
    from brn_cli.integrations.lightning import BatchRenormCallback

    Module, _ = lightning_parts(pl)
    trainer = trainer_for(pl, tmp_path, [BatchRenormCallback(convert=False)], max_steps=1)
    with pytest.raises(brn_cli.BrnError, match=r"no Batch Renorm layers.*convert=True"):
        trainer.fit(Module(), loader())
    with pytest.raises(brn_cli.BrnError, match="`schedule`"):
        BatchRenormCallback(("3",))


DDP_SCRIPT = """
import json, sys
import torch
import pytorch_lightning as pl
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import brn_cli
from brn_cli.integrations.lightning import BatchRenormCallback

GLOBAL_BATCH = 8


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        )
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        layer = self.net[1]
        self.seen.append([type(layer).__name__, layer.process_group is not None, layer.rmax])
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        labels = torch.arange(64) % 4
        data = TensorDataset(torch.randn(64, 3, 8, 8, generator=gen) + labels.view(-1, 1, 1, 1) * 0.5, labels)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        # In order, split by rank: the union of the ranks' batches is one process's batch of 8.
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def run(devices, out=None):
    torch.set_num_threads(1)
    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        sync_batchnorm=devices > 1, use_distributed_sampler=False, max_steps=8,
        callbacks=[BatchRenormCallback(("2:1,10:3", "2:0,12:5"))], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(module)
    assert all(layer.process_group is None for _, layer in brn_cli.renorm_layers(module))  # given back
    if out and trainer.is_global_zero:
        torch.save(module.state_dict(), out + "/model.pt")
        with open(out + "/seen.json", "w") as f:
            json.dump(module.seen, f)
    return module


if __name__ == "__main__":
    run(2, sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_lightning_ddp_with_sync_batchnorm_keeps_renorm_and_global_statistics(pl, tmp_path):
    """strategy="ddp" on 2 CPU processes with sync_batchnorm=True: Lightning's SyncBatchNorm conversion
    leaves the renorm layers alone, brn's global statistics sync is on, and the weights and moving
    averages equal one process trained on the whole batch."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    run_python([str(script), str(tmp_path)], cwd=tmp_path)
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert len(seen) == 8 and all(kind == "BatchRenorm2d" and synced for kind, synced, _ in seen)
    assert [rmax for _, _, rmax in seen] == [r for r, _ in expected_limits(range(8))]

    spec = importlib.util.spec_from_file_location("ddp_run", script)
    single = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(single)
    reference = single.run(1)
    assert all(not synced for _, synced, _ in reference.seen)
    assert_same_state(torch.load(tmp_path / "model.pt", weights_only=True), state_of(reference), atol=2e-5)


@pytest.mark.slow
def test_lightning_example_runs(tmp_path):
    pytest.importorskip("pytorch_lightning")
    example = REPO / "examples" / "lightning_module.py"
    proc = run_python([str(example), "--steps", "4", "--out", str(tmp_path)], cwd=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rmax, dmax = preset_schedules("paper-scaled", total_steps=4)
    assert summary["steps"] == 4 and summary["limits"] == [rmax(4), dmax(4)]
    assert set(summary["norm_layers"].values()) == {"BatchRenorm2d"}
    with open(tmp_path / "logs" / "version_0" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("brn/rmax")]
    assert len(rows) == 4 and all(row["brn/mean_abs_d"] for row in rows)
    assert "RenormOpeningWarning" not in proc.stderr  # calibrated before the limits open


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ------------------------------------------------------------------------------------------------


def tiny_resnet():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=4,
    )
    return transformers.ResNetForImageClassification(config)


class ImageSet(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        self.x, self.y = images(n)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i] * 0.5, "labels": self.y[i]}


def hf_run(output_dir: Path, callback, resume: Path | None = None):
    """transformers' own Trainer: 8 steps of batch 4 over 8 images (2 steps an epoch), a checkpoint every 4."""
    transformers = pytest.importorskip("transformers")
    model = tiny_resnet()
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        optim="sgd",
        logging_steps=1,
        save_steps=4,
        save_strategy="steps",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ImageSet(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model, trainer


@pytest.mark.slow
def test_hf_callback_converts_follows_global_step_logs_and_resumes_exactly(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the hf extra has it)")
    from brn_cli.integrations.hf import BatchRenormCallback

    full, trainer = hf_run(tmp_path / "full", BatchRenormCallback(SPECS))
    kinds = {type(m).__name__ for m in full.modules()}
    assert "BatchRenorm2d" in kinds and "BatchNorm2d" not in kinds
    logged = [entry for entry in trainer.state.log_history if "brn/rmax" in entry]
    assert [e["step"] for e in logged] == list(range(1, 9))
    # Step s's log describes the step that ran with the limits of global step s - 1.
    assert [(e["brn/rmax"], e["brn/dmax"]) for e in logged] == expected_limits(range(8))
    assert [e["brn/batchnorm_phase"] for e in logged] == [1.0, 1.0, 1.0] + [0.0] * 5
    saved = json.loads((tmp_path / "full" / "checkpoint-4" / "trainer_state.json").read_text())
    assert (
        saved["stateful_callbacks"]["BatchRenormCallback"]["attributes"]["brn_state"]["scheduler"]["step"]
        == 4
    )

    # A new process would build the model and a callback again (here with another schedule: the
    # checkpoint's wins) and resume from the step-4 checkpoint.
    resumed, trainer = hf_run(
        tmp_path / "full", BatchRenormCallback(), resume=tmp_path / "full" / "checkpoint-4"
    )
    logged = [entry for entry in trainer.state.log_history if "brn/rmax" in entry and entry["step"] > 4]
    assert [(e["brn/rmax"], e["brn/dmax"]) for e in logged] == expected_limits(range(4, 8))
    assert_same_state(state_of(resumed), state_of(full))


@pytest.mark.slow
def test_hf_callback_converts_before_the_optimizer_and_refuses_after(tmp_path):
    """Runs without accelerate: the events the Trainer calls, on a real ResNetForImageClassification."""
    from transformers import TrainerControl, TrainerState

    from brn_cli.integrations.hf import BatchRenormCallback

    model = tiny_resnet().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(pixel_values=x).logits
    BatchRenormCallback().on_init_end(None, TrainerState(), TrainerControl(), model=model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "BatchRenorm2d" in kinds and "BatchNorm2d" not in kinds
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, before)

    late = tiny_resnet()
    optimizer = torch.optim.SGD(late.parameters(), lr=0.1)
    state = TrainerState(max_steps=8)
    with pytest.raises(brn_cli.BrnError, match="after the optimizer was built"):
        BatchRenormCallback().on_train_begin(None, state, TrainerControl(), model=late, optimizer=optimizer)
    assert {type(m).__name__ for m in late.modules()} >= {"BatchNorm2d"}  # left as it was

    # restore_callback_states_from_checkpoint rebuilds the callback from the JSON of its arguments.
    callback = BatchRenormCallback(list(SPECS), rmax=2, stats_sync="LOCAL", log_telemetry=False)
    rebuilt = BatchRenormCallback(**json.loads(json.dumps(callback.state()["args"])))
    assert rebuilt.state() == callback.state()
    assert (rebuilt.schedule, rebuilt.rmax, rebuilt.stats_sync, rebuilt.log_telemetry) == (
        SPECS,
        2.0,
        "local",
        False,
    )


HF_DDP_SCRIPT = """
import gc, json, os, sys
import torch
import transformers

import brn_cli
from brn_cli.integrations.hf import BatchRenormCallback

GLOBAL_BATCH = 8


class Images(torch.utils.data.Dataset):
    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.y = torch.arange(32) % 4
        self.x = torch.randn(32, 3, 8, 8, generator=gen) + self.y.view(-1, 1, 1, 1) * 0.5

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def run(world, out):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=4
    )
    model = transformers.ResNetForImageClassification(config)
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=8, per_device_train_batch_size=GLOBAL_BATCH // world, learning_rate=0.05,
        lr_scheduler_type="constant", optim="sgd", logging_steps=1, save_strategy="steps", save_steps=4,
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        # In order, split by rank: the union of the ranks' batches is one process's batch of 8.
        train_sampling_strategy="sequential", ddp_backend="gloo" if world > 1 else None,
        # Unclipped gradients, so that their size is compared too, and no loss scaled by the process count
        # (the Trainer does so for a forward taking **kwargs; ResNet's loss, a plain mean, does not undo it).
        max_grad_norm=0.0, average_tokens_across_devices=False,
    )
    renorm = BatchRenormCallback(("2:1,10:3", "2:0,12:5"))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Images(), callbacks=[renorm])
    seen = []

    def record(layer, inputs):
        if layer.training:
            synced = layer.process_group is not None
            seen.append([type(layer).__name__, synced, layer.rmax, inputs[0].shape[0]])

    brn_cli.renorm_layers(model)[0][1].register_forward_pre_hook(record)  # converted by Trainer.__init__
    trainer.train()
    return model, trainer, seen


if __name__ == "__main__":
    model, trainer, seen = run(int(os.environ["WORLD_SIZE"]), sys.argv[1])
    with open(f"{sys.argv[1]}/seen-{os.environ['RANK']}.json", "w") as f:
        json.dump(seen, f)
    if trainer.is_world_process_zero():
        torch.save(model.state_dict(), sys.argv[1] + "/model.pt")
        with open(sys.argv[1] + "/logs.json", "w") as f:
            json.dump([e for e in trainer.state.log_history if "brn/rmax" in e], f)
    # Training over, the callback gave the group back; the script ends as a torchrun script should: nothing
    # holds the group any more when it is destroyed, so gloo's threads end before the interpreter does.
    assert all(layer.process_group is None for _, layer in brn_cli.renorm_layers(model))
    del trainer, model
    gc.collect()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_hf_trainer_under_torchrun_keeps_renorm_and_global_statistics(tmp_path):
    """transformers' Trainer on 2 CPU processes (torchrun, gloo), batch 4 each: the callback converts before
    the optimizer and the DDP wrapper exist, brn's global statistics sync is on over the Trainer's process
    group, the limits follow the global step, the checkpoint holds the schedule, and the weights, moving
    averages and logged telemetry equal one process trained with batch 8."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the hf extra has it)")
    script = tmp_path / "hf_ddp_run.py"
    script.write_text(HF_DDP_SCRIPT)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_python([*torchrun, str(script), str(tmp_path / "ddp")], cwd=tmp_path)
    limits = [r for r, _ in expected_limits(range(8))]
    for rank in (0, 1):
        seen = json.loads((tmp_path / "ddp" / f"seen-{rank}.json").read_text())
        assert seen == [["BatchRenorm2d", True, rmax, 4] for rmax in limits], f"rank {rank}"
    saved = json.loads((tmp_path / "ddp" / "checkpoint-4" / "trainer_state.json").read_text())
    brn_state = saved["stateful_callbacks"]["BatchRenormCallback"]["attributes"]["brn_state"]
    assert brn_state["scheduler"]["step"] == 4

    spec = importlib.util.spec_from_file_location("hf_ddp_run", script)
    single = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(single)
    reference, trainer, seen = single.run(1, str(tmp_path / "single"))
    assert seen == [["BatchRenorm2d", False, rmax, 8] for rmax in limits]
    assert_same_state(
        torch.load(tmp_path / "ddp" / "model.pt", weights_only=True), state_of(reference), atol=2e-5
    )
    logged = json.loads((tmp_path / "ddp" / "logs.json").read_text())
    expected = [e for e in trainer.state.log_history if "brn/rmax" in e]
    assert [e["step"] for e in logged] == [e["step"] for e in expected] == list(range(1, 9))
    for name in ("brn/rmax", "brn/dmax", "brn/mean_abs_log_r", "brn/mean_abs_d", "brn/r_clip_frac"):
        assert [e[name] for e in logged] == pytest.approx([e[name] for e in expected], abs=1e-5), name


def doc_blocks() -> list[str]:
    """The ```py blocks of docs/own-loop.md's "Lightning and Hugging Face" section, in order."""
    import re

    text = (REPO / "docs" / "own-loop.md").read_text(encoding="utf-8")
    start = text.index("## Lightning and Hugging Face")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"^```py\n(.*?)^```", section, re.S | re.M)


@pytest.mark.slow
@pytest.mark.parametrize(
    "index,needs", [(0, "pytorch_lightning"), (1, "accelerate")], ids=["lightning", "hf"]
)
def test_doc_section_blocks_run_as_written(index, needs, tmp_path, monkeypatch):
    pytest.importorskip(needs)
    blocks = doc_blocks()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    exec(
        compile(blocks[index], f"docs/own-loop.md (Lightning and Hugging Face, block {index + 1})", "exec"),
        {},
    )
