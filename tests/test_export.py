"""ONNX export + onnxruntime verification on real zoo models and edge-case models; plain state-dict export.

Every model has random, non-trivial norm statistics (otherwise folding would be the identity), and most are
converted to Batch Renorm first so that the check covers renorm folding like BatchNorm's.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from test_fold import randomize_norms
from torch import nn

from brn_cli import convert_batchnorm
from brn_cli.deploy.export import OnnxVerificationError, export_onnx, export_onnx_checked, onnx_op_counts
from brn_cli.deploy.verify import verify_onnx
from brn_cli.storage.checkpoint import save_brn_checkpoint
from brn_cli.storage.statedict import export_state_dict

torchvision = pytest.importorskip("torchvision", reason="torchvision (a test extra) is not installed")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # model weights are drawn at construction: keep every run identical


def renorm(model: nn.Module, seed: int = 0) -> nn.Module:
    model = randomize_norms(model, seed).eval()
    convert_batchnorm(model)
    return model


def export_and_check(model, shape, tmp_path, **kw):
    out = tmp_path / "model.onnx"
    report = export_onnx_checked(model, shape, out, **kw)
    assert report.written and out.exists()
    assert report.verify is not None and report.verify.passed, report.verify.to_dict()
    # batch 1 and a larger batch, ORT optimizations off and at the default level
    assert {(c.optimization, c.batch) for c in report.verify.checks} >= {
        ("disabled", 1),
        ("default", 1),
        ("disabled", max(2, shape[0])),
        ("default", max(2, shape[0])),
    }
    assert report.op_counts == onnx_op_counts(out)
    return report


def assert_all_folded(report) -> None:
    assert report.fold.kept == []
    assert report.batchnorm_nodes == 0


# ------------------------------------------------------------------------------------------------
# Zoo models
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_classifiers_fold_completely(name, tmp_path):
    model = renorm(torchvision.models.get_model(name, weights=None, num_classes=10))
    report = export_and_check(model, [2, 3, 64, 64], tmp_path)
    assert_all_folded(report)
    assert len(report.fold.folded) == sum(1 for _ in report.fold.folded) > 10
    assert all(c.top1 == 1.0 for c in report.verify.checks)
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch axis is symbolic


@pytest.mark.slow
def test_densenet121_keeps_preactivation_norms(tmp_path):
    model = renorm(torchvision.models.densenet121(weights=None, num_classes=10))
    report = export_and_check(model, [2, 3, 32, 32], tmp_path)  # 32 px still reaches every block
    kept = dict(report.fold.kept)
    assert len(report.fold.folded) > 0 and len(kept) > 0
    assert any("cat" in reason for reason in kept.values())
    assert report.batchnorm_nodes == 0  # the kept ones are Mul + Add now
    assert report.op_counts.get("Mul", 0) >= len(kept)


@pytest.mark.slow
def test_r3d_18_video_model(tmp_path):
    model = renorm(torchvision.models.video.r3d_18(weights=None, num_classes=5))
    report = export_and_check(model, [2, 3, 4, 32, 32], tmp_path)
    assert_all_folded(report)
    assert report.op_counts["Conv"] >= 18


@pytest.mark.slow
def test_timm_norm_with_activation(tmp_path):
    timm = pytest.importorskip("timm", reason="timm (a test extra) is not installed")
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    assert any(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    model = renorm(model)
    assert any(type(m).__name__ == "BatchRenormAct" for m in model.modules())
    report = export_and_check(model, [2, 3, 32, 32], tmp_path)
    assert_all_folded(report)
    assert report.op_counts.get("HardSwish", 0) > 0  # the activations the norms carried survive
    half = export_and_check(model, [2, 3, 32, 32], tmp_path, fp16=True, force=True)
    assert max(c.max_rel for c in half.verify.checks) < 1e-2


# ------------------------------------------------------------------------------------------------
# Custom models for the edge cases
# ------------------------------------------------------------------------------------------------


class Decoder(nn.Module):
    """Grouped ConvTranspose + BatchNorm (the case PyTorch's own fuse helper gets wrong)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.up3 = nn.ConvTranspose3d(12, 6, 2, groups=3)
        self.bn3 = nn.BatchNorm3d(6)

    def forward(self, x):
        y = torch.relu(self.bn(self.up(x)))
        return self.bn3(self.up3(y.unsqueeze(2)))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10, bias=False)
        self.bn2 = nn.BatchNorm1d(10)

    def forward(self, x):
        return self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))


class Skip(nn.Module):
    """Norm as the first layer, a conv whose output also feeds a skip path, a foldable pair."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(self.bn0(x))
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(y)))) + y)


def test_grouped_conv_transpose(tmp_path):
    report = export_and_check(renorm(Decoder()), [2, 8, 5, 5], tmp_path)
    assert_all_folded(report)
    assert report.op_counts["ConvTranspose"] == 2


def test_linear_batchnorm1d(tmp_path):
    model = renorm(Mlp()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = export_and_check(model, [4, 16], tmp_path)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert_all_folded(report)
    assert set(report.fold.folded) == {("bn1", "fc1"), ("bn2", "fc2")}


def test_skip_path_and_first_layer_norm_are_kept(tmp_path):
    report = export_and_check(renorm(Skip()), [2, 3, 8, 8], tmp_path)
    kept = dict(report.fold.kept)
    assert set(kept) == {"bn0", "bn1"}
    assert "model input" in kept["bn0"] and "also feeds" in kept["bn1"]
    assert report.fold.folded == [("bn2", "conv2")]
    assert report.batchnorm_nodes == 0


def test_no_fold_keeps_batchnorm_nodes(tmp_path):
    report = export_and_check(renorm(Skip()), [2, 3, 8, 8], tmp_path, fold=False)
    assert report.fold is None
    assert report.batchnorm_nodes == 3


@pytest.mark.slow
def test_dynamo_exporter_fp16_and_benchmark(tmp_path):
    model = renorm(Decoder())
    report = export_and_check(model, [2, 8, 5, 5], tmp_path, exporter="dynamo")
    assert_all_folded(report)
    half = export_and_check(
        model, [2, 8, 5, 5], tmp_path, fp16=True, force=True, benchmark=True, benchmark_repeats=5
    )
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert half.verify.atol == 1e-2  # fp16 default tolerance, compared against the fp32 reference
    bench = half.benchmark.to_dict()
    assert set(bench["median_ms"]) == {"disabled", "default"}
    assert all(r > 0 for r in bench["ratio_unfolded_over_folded"].values())


def test_external_data_past_threshold(tmp_path):
    out = tmp_path / "big.onnx"
    report = export_onnx_checked(renorm(Mlp()), [4, 16], out, external_data_threshold=0)
    assert report.written and report.external_data and report.verify.passed
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]


def test_verification_failure_leaves_nothing(tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(OnnxVerificationError) as failed:
        export_onnx_checked(renorm(Skip()), [2, 3, 8, 8], out, atol=0.0, rtol=0.0)
    report = failed.value.report
    assert not report.written and not report.verify.passed
    assert list(tmp_path.iterdir()) == []


def test_verify_detects_a_different_model(tmp_path):
    """The check can fail: a file exported from one model does not pass against another."""
    model = renorm(Skip())
    export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "a.onnx")
    other = renorm(Skip(), seed=1)
    assert verify_onnx(tmp_path / "a.onnx", model, [2, 3, 8, 8]).passed
    assert not verify_onnx(tmp_path / "a.onnx", other, [2, 3, 8, 8]).passed


# ------------------------------------------------------------------------------------------------
# State dict
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_state_dict_loads_strict_into_original_torchvision_class(fmt, tmp_path):
    model = renorm(torchvision.models.resnet18(weights=None, num_classes=10))
    path, _ = export_state_dict(model, tmp_path / f"w.{fmt}", fmt=fmt)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True)
    plain = torchvision.models.resnet18(weights=None, num_classes=10)
    plain.load_state_dict(state, strict=True)
    plain.eval()
    assert not any("Renorm" in type(m).__name__ for m in plain.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


# The checkpoints record their arch, but brn builds no arch named in a file unless it is allow-listed.
MLP_ARCH = ("--arch", "test_export:Mlp")


@pytest.fixture
def mlp_checkpoint(tmp_path):
    path = tmp_path / "mlp.brn.pt"
    save_brn_checkpoint(renorm(Mlp()), path, arch_spec="test_export:Mlp", input_shape=[4, 16])
    return path


def test_cli_export_onnx_and_state_dict(run_cli, mlp_checkpoint, tmp_path):
    out = tmp_path / "mlp.onnx"
    res = run_cli("export", "onnx", mlp_checkpoint, *MLP_ARCH, "-o", out)
    assert res.code == 0, res.err
    assert "✓" in res.out and "✗" not in res.out and "BatchNormalization: 0" in res.out
    assert f"wrote {out}" in res.out
    again = run_cli("export", "onnx", mlp_checkpoint, *MLP_ARCH, "-o", out)
    assert again.code != 0 and "--force" in again.err
    res = run_cli("export", "onnx", mlp_checkpoint, *MLP_ARCH, "-o", out, "--force", "--json", "--benchmark")
    data = json.loads(res.out)
    assert data["written"] and data["verify"]["passed"] and data["batchnorm_nodes"] == 0
    assert data["benchmark"]["ratio_unfolded_over_folded"]["default"] > 0
    res = run_cli("export", "state-dict", mlp_checkpoint, *MLP_ARCH, "-o", tmp_path / "mlp.safetensors")
    assert res.code == 0 and "strict=True" in res.out


def test_cli_verification_failure_exits_nonzero(run_cli, mlp_checkpoint, tmp_path):
    out = tmp_path / "mlp.onnx"
    res = run_cli("export", "onnx", mlp_checkpoint, *MLP_ARCH, "-o", out, "--atol", "0", "--rtol", "0")
    assert res.code == 1 and "✗" in res.out
    assert "verification failed" in res.err and "not written" in res.err and not out.exists()


def test_cli_bad_inputs(run_cli, mlp_checkpoint, tmp_path):
    res = run_cli(
        "export", "onnx", mlp_checkpoint, *MLP_ARCH, "-o", tmp_path / "x.onnx", "--input-shape", "4,7"
    )
    assert res.code == 2 and "input shape" in res.err and len(res.err_lines) == 1
    res = run_cli("export", "onnx", mlp_checkpoint, *MLP_ARCH, "-o", tmp_path / "missing" / "x.onnx")
    assert res.code == 2 and "does not exist" in res.err
    res = run_cli(
        "export", "state-dict", mlp_checkpoint, *MLP_ARCH, "-o", tmp_path / "x.bin", "--format", "npz"
    )
    assert res.code == 2 and "--format" in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.brn.pt"]


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.bn(self.fc(x)))


def test_cli_untraceable_points_at_no_fold(run_cli, tmp_path):
    ckpt = tmp_path / "u.pt"
    save_brn_checkpoint(renorm(Untraceable()), ckpt, arch_spec="test_export:Untraceable", input_shape=[2, 4])
    arch = ("--arch", "test_export:Untraceable")
    res = run_cli("export", "onnx", ckpt, *arch, "-o", tmp_path / "u.onnx")
    assert res.code == 2 and "'gate'" in res.err and "--no-fold" in res.err
    res = run_cli("export", "onnx", ckpt, *arch, "-o", tmp_path / "u.onnx", "--no-fold")
    assert res.code == 0, res.err


def test_failed_reexport_keeps_the_previous_external_data(tmp_path):
    """Past the size limit the weights live in model.onnx.data: a --force export that fails verification
    leaves both files of the previous export as they were; one that passes replaces both."""
    out = tmp_path / "model.onnx"
    data = tmp_path / "model.onnx.data"
    first = export_onnx_checked(renorm(Mlp()), [4, 16], out, external_data_threshold=0)
    assert first.written and data.stat().st_size > 0
    before = (out.read_bytes(), data.read_bytes())
    with pytest.raises(OnnxVerificationError) as raised:
        export_onnx_checked(
            renorm(Mlp(), seed=1), [4, 16], out, external_data_threshold=0, force=True, atol=0.0, rtol=0.0
        )
    assert not raised.value.report.written
    assert (out.read_bytes(), data.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    other = renorm(Mlp(), seed=1)
    second = export_onnx_checked(other, [4, 16], out, external_data_threshold=0, force=True)
    assert second.written and data.read_bytes() != before[1]
    assert verify_onnx(out, other, [4, 16]).passed  # the new .onnx reads the new data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
