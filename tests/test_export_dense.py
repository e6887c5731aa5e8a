"""ONNX export of dense-prediction models: dynamic spatial axes verified at two resolutions, verification on
real examples with tolerances scaled to each output, onnxruntime run-time errors reported as failed checks,
and an export that writes nothing raises."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brn_cli import convert_batchnorm
from brn_cli.deploy.export import OnnxVerificationError, export_onnx_checked
from brn_cli.deploy.verify import verify_onnx
from brn_cli.errors import BrnError
from brn_cli.storage.checkpoint import save_brn_checkpoint


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random, non-trivial running statistics (folding the defaults would be the identity), then renorm."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
    return convert_batchnorm(model.eval())


class TinyUNet(nn.Module):
    """Two scales, a skip connection, a transposed-convolution upsampling: runs at any multiple of 2."""

    def __init__(self, channels: int = 3, classes: int = 4, width: int = 8) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        torch.manual_seed(0)
        self.enc = block(channels, width)
        self.down = block(width, 2 * width)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec = block(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        skip = self.enc(x)
        low = self.down(F.max_pool2d(skip, 2))
        return self.head(self.dec(torch.cat([self.up(low), skip], 1)))


class FlatHead(nn.Module):
    """A classifier whose head flattens a fixed-size feature map: it runs at its training size only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class FixedReshape(nn.Module):
    """Runs at any size in PyTorch, but `int(...)` bakes the export size into the traced graph's Reshape."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x)).flatten(2)
        return y.reshape(y.shape[0], 4, int(x.shape[2]), int(x.shape[3]))


class EdgeAmplifier(nn.Module):
    """Outputs that are large on random normal inputs and carry a large rounding error there, small and exact
    on smooth images: a strong edge filter (zero on a flat image) feeds two channels that differ by 1e-5 in
    scale, and the head amplifies their difference, as a deep network amplifies noise it never saw in
    training (the failure of a calibrated DeepLabV3 on random inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 1, 1)
        edges = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]) * 1000
        with torch.no_grad():
            self.conv.weight.copy_(torch.stack([edges, edges, torch.full((3, 3), 1 / 9)])[:, None])
            self.bn.weight.copy_(torch.tensor([1.0, 1.0 + 1e-5, 1.0]))
            self.bn.running_mean.copy_(torch.tensor([0.3, 0.3, 0.1]))
            self.bn.running_var.copy_(torch.tensor([1.7, 1.7, 0.9]))
            self.head.weight.copy_(torch.tensor([-1000.0, 1000.0, 10.0]).view(1, 3, 1, 1))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def flat_images(count: int = 16, size: int = 32) -> np.ndarray:
    """uint8 grayscale images, each one flat grey level (what the edge filter of EdgeAmplifier ignores)."""
    levels = np.linspace(40, 220, count).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None], (count, size, size)).copy()


# ------------------------------------------------------------------------------------------------
# Dynamic spatial axes
# ------------------------------------------------------------------------------------------------


def test_unet_exports_with_dynamic_spatial_axes_verified_at_two_resolutions(tmp_path):
    model = with_statistics(TinyUNet())
    out = tmp_path / "unet.onnx"
    report = export_onnx_checked(model, [2, 3, 32, 32], out)  # auto: a dense model gets spatial axes
    assert report.written and report.dynamic_shape == "spatial"
    assert report.fold.kept == [] and report.batchnorm_nodes == 0
    assert report.verify.input_shapes == [[1, 3, 32, 32], [2, 3, 32, 32], [1, 3, 64, 64], [2, 3, 64, 64]]
    assert all(c.passed and c.outputs[0].shape[2:] == c.input_shape[2:] for c in report.verify.checks)
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    # a third size, never verified by the export, non-square: the file follows the model there too
    x = torch.randn(3, 3, 48, 80)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[
        0
    ]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (3, 4, 48, 80) and np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-4


def test_batch_only_export_fails_at_another_resolution_with_the_cause(tmp_path):
    """The failure the issue reports (a UNet exported at one size fails at another) is a failed check with
    onnxruntime's own reason, not a raw InvalidArgument."""
    model = with_statistics(TinyUNet())
    out = tmp_path / "unet.onnx"
    report = export_onnx_checked(model, [2, 3, 32, 32], out, dynamic_shape="batch")
    assert report.dynamic_shape == "batch" and report.verify.input_shapes == [[1, 3, 32, 32], [2, 3, 32, 32]]
    check = verify_onnx(out, model, [2, 3, 32, 32], sizes=[[64, 64]], providers=["CPUExecutionProvider"])
    assert not check.passed
    assert all(
        c.error and "InvalidArgument" in c.error and "[1, 3, 64, 64]" in c.error for c in check.checks[:1]
    )
    assert "onnxruntime failed on input [1, 3, 64, 64]" in check.failure()


def test_spatial_refused_in_one_line_for_a_flatten_linear_head(tmp_path):
    with pytest.raises(BrnError) as refused:
        export_onnx_checked(
            with_statistics(FlatHead()), [2, 3, 8, 8], tmp_path / "x.onnx", dynamic_shape="spatial"
        )
    message = str(refused.value)
    assert refused.value.param == "dynamic_shape" and "\n" not in message
    assert "runs only at its export size [8, 8]" in message and "'fc' (Linear)" in message
    assert list(tmp_path.iterdir()) == []
    # auto keeps today's export for it: batch dynamic, no second size
    report = export_onnx_checked(with_statistics(FlatHead()), [2, 3, 8, 8], tmp_path / "x.onnx")
    assert report.dynamic_shape == "batch" and report.dynamic_note is None


def test_spatial_refused_for_an_input_without_spatial_axes(tmp_path):
    mlp = convert_batchnorm(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).eval())
    with pytest.raises(BrnError, match="no spatial axes"):
        export_onnx_checked(mlp, [2, 6], tmp_path / "x.onnx", dynamic_shape="spatial")


def test_fixed_shape_export_is_verified_at_its_batch_only(tmp_path):
    report = export_onnx_checked(
        with_statistics(TinyUNet()), [3, 3, 16, 16], tmp_path / "u.onnx", dynamic_shape="none"
    )
    assert report.dynamic_shape == "none" and report.verify.input_shapes == [[3, 3, 16, 16]]
    dims = onnx.load(str(tmp_path / "u.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 3, 16, 16]


# ------------------------------------------------------------------------------------------------
# Run-time failures and failed verification: nothing written, the library raises
# ------------------------------------------------------------------------------------------------


def test_runtime_error_is_a_verification_failure_and_nothing_is_written(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous good export")
    with pytest.raises(OnnxVerificationError) as failed:
        export_onnx_checked(
            with_statistics(FixedReshape()),
            [2, 3, 32, 32],
            out,
            dynamic_shape="spatial",
            force=True,
            fold=False,
        )
    message = str(failed.value)
    assert message.startswith("verification failed: onnxruntime failed on input [1, 3, 64, 64]")
    assert "not written" in message and "\n" not in message
    assert failed.value.exit_code == 1 and not failed.value.report.written
    assert out.read_bytes() == b"previous good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_library_raises_when_verification_fails(tmp_path):
    """It used to return ``written=False`` and leave the caller to notice."""
    with pytest.raises(OnnxVerificationError, match=r"beyond the tolerance .*`atol` \+ `rtol`"):
        export_onnx_checked(
            with_statistics(TinyUNet()), [2, 3, 16, 16], tmp_path / "m.onnx", atol=0.0, rtol=0.0
        )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Verification on real examples, tolerances scaled to each output
# ------------------------------------------------------------------------------------------------


def test_large_outputs_fail_on_random_inputs_and_pass_on_data(tmp_path):
    model = convert_batchnorm(EdgeAmplifier().eval())
    with pytest.raises(OnnxVerificationError) as failed:
        export_onnx_checked(model, [2, 1, 32, 32], tmp_path / "m.onnx")
    random_worst = failed.value.report.verify.checks[0].outputs[0]
    assert random_worst.scale > 50 and random_worst.max_abs > 10 * random_worst.tolerance
    data = torch.from_numpy(flat_images()).float().div(255).unsqueeze(1)
    report = export_onnx_checked(
        model, [2, 1, 32, 32], tmp_path / "m.onnx", verify_data=data, verify_data_from="flat"
    )
    assert report.written and report.verify.inputs == "flat"
    assert max(c.max_rel for c in report.verify.checks) < 1e-5
    assert all(o.scale > 0.5 for c in report.verify.checks for o in c.outputs)


def test_examples_of_another_layout_are_refused(tmp_path):
    with pytest.raises(BrnError, match="the examples have shape") as refused:
        export_onnx_checked(
            with_statistics(TinyUNet()),
            [2, 3, 16, 16],
            tmp_path / "m.onnx",
            verify_data=torch.rand(4, 1, 16, 16),
        )
    assert refused.value.param == "verify_data" and list(tmp_path.iterdir()) == []


def test_dict_outputs_are_named_by_their_keys(tmp_path):
    class OutAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = TinyUNet()

        def forward(self, x):
            y = self.unet(x)
            return {"out": y, "aux": y.mean(1, keepdim=True)}

    report = export_onnx_checked(with_statistics(OutAux()), [2, 3, 16, 16], tmp_path / "m.onnx")
    assert [o.name for o in report.verify.checks[0].outputs] == ["out", "aux"]
    assert report.verify.input_shapes[-1] == [2, 3, 32, 32]


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

UNET_ARCH = ("--arch", "test_export_dense:TinyUNet")
AMP_ARCH = ("--arch", "test_export_dense:EdgeAmplifier")


def test_cli_unet_dynamic_spatial(run_cli, tmp_path):
    ckpt = tmp_path / "unet.pt"
    save_brn_checkpoint(
        with_statistics(TinyUNet()), ckpt, arch_spec="test_export_dense:TinyUNet", input_shape=[2, 3, 32, 32]
    )
    out = tmp_path / "unet.onnx"
    res = run_cli("export", "onnx", ckpt, *UNET_ARCH, "-o", out, "--dynamic-shape", "spatial")
    assert res.code == 0, res.err
    assert "shapes [1, 3, 32, 32], [2, 3, 32, 32], [1, 3, 64, 64], [2, 3, 64, 64]" in res.out
    assert "batch and spatial axes dynamic" in res.out and "✗" not in res.out
    assert "random normal inputs" in res.out and "tolerance" in res.out


def test_cli_spatial_refused_in_one_line(run_cli, tmp_path):
    ckpt = tmp_path / "flat.pt"
    save_brn_checkpoint(
        with_statistics(FlatHead()), ckpt, arch_spec="test_export_dense:FlatHead", input_shape=[2, 3, 8, 8]
    )
    res = run_cli(
        "export",
        "onnx",
        ckpt,
        "--arch",
        "test_export_dense:FlatHead",
        "-o",
        tmp_path / "f.onnx",
        "--dynamic-shape",
        "spatial",
    )
    assert res.code == 2 and len(res.err_lines) == 1
    assert res.err_lines[0].startswith(
        "brn: error: --dynamic-shape spatial: the model runs only at its export size"
    )
    assert "--dynamic-shape batch" in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.pt"]


def test_cli_verify_data_passes_where_random_inputs_fail(run_cli, tmp_path):
    ckpt = tmp_path / "amp.pt"
    save_brn_checkpoint(
        convert_batchnorm(EdgeAmplifier().eval()),
        ckpt,
        arch_spec="x:EdgeAmplifier",
        input_shape=[2, 1, 32, 32],
    )
    data = tmp_path / "flat.npz"
    images = flat_images()
    np.savez(data, x_train=images, y_train=np.zeros(len(images), np.int64))
    out = tmp_path / "amp.onnx"
    res = run_cli("export", "onnx", ckpt, *AMP_ARCH, "-o", out, "--verify-data", "random")
    assert res.code == 1 and "✗" in res.out and not out.exists()
    assert res.err_lines[-1].startswith("brn: error: verification failed: output 'output'")
    assert "--atol + --rtol" in res.err
    res = run_cli("export", "onnx", ckpt, *AMP_ARCH, "-o", out, "--verify-data", data, "--json")
    assert res.code == 0, res.err
    verify = json.loads(res.out)["verify"]
    assert verify["passed"] and verify["inputs"] == f"16 training examples of {data}"
    first = verify["checks"][0]["outputs"][0]
    assert set(first) == {"name", "shape", "max_abs", "scale", "tolerance", "passed"}


def test_cli_runtime_error_is_one_line_and_exit_1(run_cli, tmp_path):
    ckpt = tmp_path / "r.pt"
    save_brn_checkpoint(
        with_statistics(FixedReshape()), ckpt, arch_spec="x:FixedReshape", input_shape=[2, 3, 32, 32]
    )
    out = tmp_path / "r.onnx"
    res = run_cli(
        "export",
        "onnx",
        ckpt,
        "--arch",
        "test_export_dense:FixedReshape",
        "-o",
        out,
        "--dynamic-shape",
        "spatial",
        "--no-fold",  # torch.fx cannot trace int(); the exporter's tracer can
    )
    assert res.code == 1 and not out.exists()
    assert res.err_lines[-1].startswith(
        "brn: error: verification failed: onnxruntime failed on input [1, 3, 64, 64]"
    )
    assert "Traceback" not in res.err


def test_sample_small_unet_exports_with_dynamic_spatial_axes(tmp_path):
    """The bundled sample UNet (brn_cli.samples.models:small_unet), BN converted to renorm, exported at 32 px
    and verified in onnxruntime at 32 and 64 px, batches 1 and 2."""
    from brn_cli.samples.models import small_unet

    torch.manual_seed(0)
    model = with_statistics(small_unet(num_classes=3, in_channels=1, width=4))
    report = export_onnx_checked(model, [2, 1, 32, 32], tmp_path / "unet.onnx")
    assert report.dynamic_shape == "spatial" and report.verify.passed and report.batchnorm_nodes == 0
    assert report.verify.input_shapes == [[1, 1, 32, 32], [2, 1, 32, 32], [1, 1, 64, 64], [2, 1, 64, 64]]
    assert [c.outputs[0].shape for c in report.verify.checks[:4]] == [
        [1, 3, 32, 32],
        [2, 3, 32, 32],
        [1, 3, 64, 64],
        [2, 3, 64, 64],
    ]


def test_cli_verifies_on_the_data_a_finetuned_checkpoint_records(run_cli, tmp_path):
    """A checkpoint written by fine-tuning records its data: export verifies on it without being told, says
    so, and `--verify-data random` goes back to random inputs (which this model fails)."""
    data = tmp_path / "flat.npz"
    images = flat_images()
    np.savez(data, x_train=images, y_train=np.zeros(len(images), np.int64))
    ckpt = tmp_path / "best.pt"
    training = {"config": {"data": str(data), "val_split": 0.25, "seed": 0}}
    save_brn_checkpoint(
        convert_batchnorm(EdgeAmplifier().eval()),
        ckpt,
        arch_spec="x:EdgeAmplifier",
        input_shape=[2, 1, 32, 32],
        training=training,
    )
    res = run_cli("export", "onnx", ckpt, *AMP_ARCH, "-o", tmp_path / "a.onnx", "--json")
    assert res.code == 0, res.err
    assert f"note: verifying on examples of the data best.pt records, {data}" in res.err
    assert json.loads(res.out)["verify"]["inputs"] == f"4 validation examples of {data}"
    res = run_cli("export", "onnx", ckpt, *AMP_ARCH, "-o", tmp_path / "b.onnx", "--verify-data", "random")
    assert res.code == 1 and "random normal inputs" in res.out and "note:" not in res.err
