"""GPU checks: run only where CUDA is available (they are skipped on CPU-only machines and CI).

What the CPU suite cannot show: the layer on CUDA (cuDNN batch-norm kernels) against nn.BatchNorm2d and the
paper's invariants, statistics kept in fp32 under fp16/bf16 autocast, `brn finetune --device cuda` with
`--amp fp16` (GradScaler) and `--channels-last`, and onnxruntime's CUDA provider in the export check.
Run them on a GPU machine with `python -m pytest -q tests/test_gpu.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from brn_cli.nn.convert import convert_batchnorm
from brn_cli.nn.layer import BatchRenorm2d
from brn_cli.samples import SAMPLE_DATA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _pair(c: int = 16) -> tuple[nn.BatchNorm2d, BatchRenorm2d]:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(c, momentum=0.01).cuda()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    brn = BatchRenorm2d(c).cuda()
    brn.load_state_dict(bn.state_dict())
    return bn, brn


@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_rmax1_dmax0_is_batchnorm(channels_last):
    bn, brn = _pair()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(8, 16, 12, 12, device="cuda").to(memory_format=fmt)
    g = torch.randn_like(x)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = bn(a), brn(b)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)


def test_cuda_unbounded_training_output_is_the_inference_output():
    _, brn = _pair()
    brn.rmax, brn.dmax = float("inf"), float("inf")
    x = torch.randn(8, 16, 12, 12, device="cuda") * 3 + 1
    with torch.no_grad():
        expected = brn.eval()(x)
        y = brn.train()(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_keeps_statistics_fp32(dtype):
    conv = nn.Conv2d(3, 16, 3).cuda()
    brn = BatchRenorm2d(16, rmax=3.0, dmax=5.0).cuda()
    x = torch.randn(8, 3, 20, 20, device="cuda") * 100  # fp16 would overflow a sum of squares
    with torch.autocast("cuda", dtype=dtype):
        y = brn(conv(x))
    y.float().sum().backward()
    assert y.dtype == dtype
    assert brn.running_var.dtype == torch.float32 and torch.isfinite(brn.running_var).all()
    assert torch.isfinite(brn.weight.grad).all()


@pytest.mark.slow
def test_cuda_finetune_fp16_channels_last(tmp_path, run_cli):
    from test_finetune import ARCH, _pretrain

    ckpt = tmp_path / "bn.pt"
    _pretrain(ckpt, seed=0, steps=50)
    out = tmp_path / "run"
    result = run_cli(
        "finetune", str(ckpt), "--data", str(SAMPLE_DATA), "-o", str(out), "--arch", ARCH, "--steps", "20",
        "--device", "cuda", "--amp", "fp16", "--channels-last", "--sampler", "grouped:8", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["device"].startswith("cuda") and report["final"]["val_accuracy"] > 0.5
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_onnx_verification_uses_the_cuda_provider_when_it_works(tmp_path):
    from brn_cli.deploy.export import export_onnx_checked
    from brn_cli.deploy.verify import ort_providers

    if "CUDAExecutionProvider" not in ort_providers():
        pytest.skip("onnxruntime's CUDA provider does not start on this machine")
    model = convert_batchnorm(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4)
        )
    ).eval()
    report = export_onnx_checked(model, [2, 3, 16, 16], tmp_path / "m.onnx")
    assert report.verify.passed
    assert any(check.provider == "CUDAExecutionProvider" for check in report.verify.checks)


def test_cuda_bench_times_with_cuda_events():
    """On a GPU each timed call is bracketed by CUDA events: a kernel that sleeps on the device for
    ~2 ms reads as at least that long, although its launch returns to the host at once."""
    from brn_cli.recipes.bench import interleaved_times

    dev = torch.device("cuda")
    cycles = int(torch.cuda.get_device_properties(dev).clock_rate * 1000 * 0.002)  # ~2 ms of GPU clock
    times = interleaved_times({"sleep": lambda: torch.cuda._sleep(cycles)}, reps=3, warmup=1, device=dev)
    assert min(times["sleep"]) > 0.001
