"""One device resolution for every command: what it accepts, what it refuses, and that commands agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from brn_cli.errors import BrnError
from brn_cli.nn.device import resolve_device


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, the first one current (torch.device needs no GPU to be built)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _refusal(spec: str, **kw) -> BrnError:
    with pytest.raises(BrnError) as info:
        resolve_device(spec, **kw)
    assert info.value.param == "device" and "\n" not in str(info.value)
    return info.value


def test_cpu_and_auto_without_a_gpu(no_gpu):
    assert resolve_device("auto") == resolve_device(None) == resolve_device("") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert "CUDA is not available" in str(_refusal("cuda"))
    assert "CUDA is not available" in str(_refusal("cuda:7"))
    assert "MPS is not available" in str(_refusal("mps"))


def test_unknown_and_dataless_devices_are_refused(no_gpu):
    assert str(_refusal("tpu")).startswith("device 'tpu' is not a device torch knows")
    assert "cuda, cuda:N or mps" in str(_refusal("gpu0"))
    assert "holds no data" in str(_refusal("meta"))


def test_cuda_comes_back_with_its_index(two_gpus):
    # torch.cuda.set_device refuses a bare "cuda", so the index is always filled in.
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert "only 2 CUDA device(s) visible" in str(_refusal("cuda:2"))


def test_local_rank_takes_its_own_gpu(two_gpus):
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")
    assert "local rank 2 has no GPU, this node has 2" in str(_refusal("cuda", local_rank=2))


def test_an_unavailable_device_is_the_same_one_line_error_from_evaluate_and_finetune(
    no_gpu, tmp_path, run_cli
):
    g = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(
        data,
        x_train=g.normal(size=(24, 4)).astype(np.float32),
        y_train=np.arange(24) % 3,
        x_val=g.normal(size=(12, 4)).astype(np.float32),
        y_val=np.arange(12) % 3,
    )
    model = tmp_path / "m.pt"
    torch.save(_tiny().state_dict(), model)
    common = [str(model), "--data", str(data), "--arch", "tests.test_device:_tiny", "--device", "mps"]
    evaluated = run_cli("evaluate", *common)
    run = tmp_path / "run"
    finetuned = run_cli("finetune", *common, "-o", run, "--steps", "2", "--batch-size", "6")
    expected = ["brn: error: --device 'mps': MPS is not available on this machine"]
    assert (evaluated.code, evaluated.err_lines) == (2, expected), evaluated.err
    assert (finetuned.code, finetuned.err_lines) == (2, expected), finetuned.err
    assert not run.exists()
