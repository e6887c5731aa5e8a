"""BatchNorm -> Batch Renorm conversion on real torchvision and timm architectures (random weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from brn_cli.nn.convert import convert_batchnorm, max_eval_difference, plan_conversion, restore_batchnorm
from brn_cli.nn.layer import BatchRenorm1d, BatchRenorm2d, BatchRenormAct, BatchRenormNd


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm parameters and running statistics (random init leaves mean 0, var 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=gen) * 0.8 + 0.6)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model


def _count(model: nn.Module, cls) -> int:
    return sum(1 for m in model.modules() if isinstance(m, cls))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_keep_eval_outputs(name):
    torchvision = pytest.importorskip("torchvision", reason="torchvision (a test extra) is not installed")

    model = randomize_norms(torchvision.models.get_model(name, weights=None, num_classes=10)).eval()
    n_bn = _count(model, _BatchNorm)
    original = copy.deepcopy(model)
    convert_batchnorm(model)
    assert _count(model, _BatchNorm) == 0
    assert _count(model, BatchRenormNd) == n_bn > 0
    diff = max_eval_difference(original, model, [2, 3, 64, 64])
    assert diff <= 1e-5
    # Each converted layer starts as batchnorm (rmax=1, dmax=0) with the requested momentum.
    layers = [m for m in model.modules() if isinstance(m, BatchRenormNd)]
    assert {(m.rmax, m.dmax, m.momentum) for m in layers} == {(1.0, 0.0, 0.01)}


@pytest.mark.slow
def test_timm_norm_act_model_keeps_its_activation():
    timm = pytest.importorskip("timm", reason="timm (a test extra) is not installed")
    from timm.layers.norm_act import BatchNormAct2d

    model = randomize_norms(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)).eval()
    acts = [type(m.act) for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert acts and any(a is not nn.Identity for a in acts)
    original = copy.deepcopy(model)
    convert_batchnorm(model, momentum=0.05)
    converted = [m for m in model.modules() if isinstance(m, BatchRenormAct)]
    assert [type(m.act) for m in converted] == acts  # the activation travels with the norm
    assert _count(model, _BatchNorm) == 0
    assert max_eval_difference(original, model, [2, 3, 64, 64]) <= 1e-5
    # And back: timm's BatchNormAct2d again, same function.
    restored = restore_batchnorm(copy.deepcopy(model))
    assert _count(restored, BatchNormAct2d) == len(acts)
    assert max_eval_difference(original, restored, [2, 3, 32, 32]) <= 1e-5


def _small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
    )


def test_training_at_rmax1_dmax0_matches_the_batchnorm_model():
    torch.manual_seed(0)
    bn_model = randomize_norms(_small_net()).double().train()
    brn_model = convert_batchnorm(copy.deepcopy(bn_model))
    assert isinstance(brn_model[9], BatchRenorm1d) and isinstance(brn_model[1], BatchRenorm2d)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    probe = torch.randn(4, 6, dtype=torch.float64)  # a loss whose gradient is not ~0 after a norm
    ya, yb = bn_model(x), brn_model(x)
    torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad((ya * probe).sum(), list(bn_model.parameters()))
    gb = torch.autograd.grad((yb * probe).sum(), list(brn_model.parameters()))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_include_exclude_globs():
    model = _small_net()
    plan = plan_conversion(model, include=["1", "4"], exclude=["4"])
    by_name = {d.name: d for d in plan}
    assert by_name["1"].action == "convert" and by_name["1"].target_type == "BatchRenorm2d"
    assert by_name["4"].action == "skip" and by_name["4"].reason == "matched by `exclude`"
    assert by_name["9"].action == "skip" and by_name["9"].reason == "not matched by `include`"
    convert_batchnorm(model, include=["1", "4"], exclude=["4"])
    assert isinstance(model[1], BatchRenorm2d)
    assert type(model[4]) is nn.BatchNorm2d and type(model[9]) is nn.BatchNorm1d


class ScaledBN(nn.BatchNorm2d):
    """A subclass that changes behaviour: converting it would silently drop the doubling."""

    def forward(self, x):
        return super().forward(x) * 2


class RenamedBN(nn.BatchNorm2d):
    """A subclass that adds nothing to forward: safe to convert."""


def test_subclasses_and_layers_without_running_stats():
    model = nn.Sequential(
        ScaledBN(4), RenamedBN(4), nn.BatchNorm2d(4, track_running_stats=False), nn.SyncBatchNorm(4)
    )
    randomize_norms(model)
    plan = {d.name: d for d in plan_conversion(model)}
    assert plan["0"].action == "skip" and "overrides forward" in plan["0"].reason
    assert plan["1"].action == "convert"
    assert plan["2"].action == "skip" and "running statistics" in plan["2"].reason
    assert plan["3"].action == "convert" and plan["3"].target_type == "BatchRenormNd"
    original = copy.deepcopy(model).eval()
    convert_batchnorm(model)
    assert type(model[0]) is ScaledBN and type(model[2]) is nn.BatchNorm2d
    assert isinstance(model[1], BatchRenorm2d) and type(model[3]) is BatchRenormNd
    assert max_eval_difference(original, model, [3, 4, 5, 5]) == 0.0


def test_frozen_parameters_stay_frozen_and_state_is_copied_not_recomputed():
    bn = randomize_norms(nn.Sequential(nn.BatchNorm2d(5)))
    bn[0].weight.requires_grad_(False)
    bn[0].num_batches_tracked.fill_(123)
    converted = convert_batchnorm(copy.deepcopy(bn), momentum=0.2)
    layer = converted[0]
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    assert layer.momentum == 0.2 and int(layer.num_batches_tracked) == 123
    for key, value in bn.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_restore_round_trip_after_renorm_training():
    model = convert_batchnorm(randomize_norms(_small_net()))
    for m in model.modules():
        if isinstance(m, BatchRenormNd):
            m.rmax, m.dmax = 3.0, 5.0
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8) * 2 + 1)
    restored = restore_batchnorm(copy.deepcopy(model))
    assert _count(restored, BatchRenormNd) == 0 and _count(restored, nn.BatchNorm2d) == 2
    assert max_eval_difference(model, restored, [3, 3, 8, 8]) == 0.0


def test_model_without_batchnorm_plans_nothing_and_a_bare_bn_converts():
    assert plan_conversion(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))) == []
    bare = randomize_norms(nn.BatchNorm1d(3)).eval()
    new = convert_batchnorm(bare)
    assert isinstance(new, BatchRenorm1d)
    x = torch.randn(4, 3)
    torch.testing.assert_close(new.eval()(x), bare(x), rtol=0, atol=0)


def test_input_shape_comes_from_the_architectures_metadata():
    """Image size from timm's pretrained_cfg or torchvision's weight presets (shipped with the code, nothing
    fetched); channels from the first conv; the old default where no metadata exists."""
    timm = pytest.importorskip("timm", reason="timm (a test extra) is not installed")
    torchvision = pytest.importorskip("torchvision", reason="torchvision (a test extra) is not installed")

    from brn_cli.nn.convert import infer_input_shape

    timm_model = timm.create_model("efficientnet_b1", pretrained=False, num_classes=10)
    assert infer_input_shape(timm_model) == [2, 3, 240, 240]
    tv_model = torchvision.models.efficientnet_b3(num_classes=10)
    assert infer_input_shape(tv_model) == [2, 3, 224, 224]  # no spec: nothing says otherwise
    assert infer_input_shape(tv_model, arch_spec="torchvision:efficientnet_b3") == [2, 3, 300, 300]
    video = torchvision.models.video.r3d_18(num_classes=4)
    assert infer_input_shape(video, arch_spec="torchvision:r3d_18") == [2, 3, 8, 112, 112]
    assert infer_input_shape(video, arch_spec="torchvision:no_such_model") == [2, 3, 8, 64, 64]


# ----------------------------------------------------------------------------------------------
# Statistics and eps a renorm layer cannot use: one line naming the layer
# ----------------------------------------------------------------------------------------------

SAMPLE = ["--arch", "brn_cli.samples.models:small_resnet", "--arch-kwargs", '{"width": 4}']
SAMPLE_SHAPE = ["--input-shape", "2,1,28,28"]


def _sample_model() -> nn.Module:
    from brn_cli.samples.models import small_resnet

    return randomize_norms(small_resnet(width=4))


def test_convert_refuses_non_finite_running_stats_naming_the_layer():
    from brn_cli.errors import BrnError

    model = _sample_model()
    with torch.no_grad():
        model.layer1.bn1.running_var[:3] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BrnError) as info:
        convert_batchnorm(model)
    assert str(info.value) == (
        "layer1.bn1: running_var holds inf in 3 channels; fix or recalibrate the source (brn calibrate)"
    )
    assert _count(model, BatchRenormNd) == 0  # refused before any layer was replaced
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # More than one: the first is described, the others named.
    with torch.no_grad():
        model.layer2.shortcut[1].running_mean[0] = float("nan")
        model.layer3.bn2.running_var[1] = -1.0
    with pytest.raises(
        BrnError, match=r"^layer1\.bn1: .* \(and 2 more layers: layer2\.shortcut\.1, layer3\.bn2\);"
    ):
        convert_batchnorm(model)
    # Layers the user leaves as BatchNorm are not checked.
    convert_batchnorm(model, exclude=["layer1.bn1", "layer2.shortcut.1", "layer3.bn2"])
    assert type(model.layer1.bn1) is nn.BatchNorm2d and isinstance(model.layer1.bn2, BatchRenorm2d)


def test_convert_refuses_eps_zero_naming_the_layer():
    """Old detection code builds BatchNorm with eps=0; renorm needs eps > 0 (sigma_B divides)."""
    from brn_cli.errors import BrnError

    model = _sample_model()
    model.layer2.bn2.eps = 0.0
    with pytest.raises(BrnError, match=r"^layer2\.bn2: eps is 0; batch renorm needs eps > 0") as info:
        convert_batchnorm(model)
    assert "\n" not in str(info.value)
    assert _count(model, BatchRenormNd) == 0


@pytest.fixture
def sample_weights(tmp_path):
    path = tmp_path / "in" / "weights.pt"
    path.parent.mkdir()
    torch.save(_sample_model().state_dict(), path)
    return path


def _one_error_line(res, *words):
    assert res.code == 2, (res.code, res.out, res.err)
    assert len(res.err_lines) == 1 and res.err.startswith("brn: error: "), res.err
    assert "Traceback" not in res.err + res.out
    for word in words:
        assert word in res.err, res.err


def test_cli_convert_names_the_layer_with_nan_running_var(run_cli, sample_weights, tmp_path):
    """Was: "conversion changed eval outputs by nan (expected 0)", naming no layer."""
    state = torch.load(sample_weights, weights_only=True)
    state["layer3.bn1.running_var"][:2] = float("nan")
    torch.save(state, sample_weights)
    out = tmp_path / "out" / "converted.pt"
    out.parent.mkdir()
    for extra in ([], ["--dry-run"]):
        res = run_cli("convert", sample_weights, "-o", out, *SAMPLE, *SAMPLE_SHAPE, *extra)
        _one_error_line(
            res,
            "layer3.bn1: running_var holds NaN in 2 channels; fix or recalibrate the source (brn calibrate)",
        )
        assert "changed eval outputs" not in res.err
        assert list(out.parent.iterdir()) == []
    # eps = 0 in the architecture (a bare BatchNorm2d: the model is the layer): named by its type.
    bare = tmp_path / "in" / "bn.pt"
    torch.save(randomize_norms(nn.BatchNorm2d(4)).state_dict(), bare)
    bn_arch = ["--arch", "torch.nn:BatchNorm2d", "--arch-kwargs", '{"num_features": 4, "eps": 0.0}']
    res = run_cli("convert", bare, "-o", out, *bn_arch, "--input-shape", "2,4,3,3")
    _one_error_line(res, "BatchNorm2d: eps is 0; batch renorm needs eps > 0")
    assert list(out.parent.iterdir()) == []


def test_brn_checkpoint_with_bad_statistics_or_eps_is_refused_at_load(run_cli, sample_weights, tmp_path):
    from brn_cli.errors import BrnError
    from brn_cli.storage.checkpoint import load_checkpoint

    good = tmp_path / "good.pt"
    res = run_cli("convert", sample_weights, "-o", good, *SAMPLE, *SAMPLE_SHAPE)
    assert res.code == 0, res.err
    obj = torch.load(good, weights_only=True)
    obj["state_dict"]["layer2.bn1.running_var"][0] = float("inf")
    bad_stats = tmp_path / "bad_stats.pt"
    torch.save(obj, bad_stats)
    with pytest.raises(BrnError, match=r"^layer2\.bn1: running_var holds inf in 1 channel; refusing to load"):
        load_checkpoint(bad_stats, arch=SAMPLE[1], arch_kwargs={"width": 4})
    out = tmp_path / "out" / "again.pt"
    out.parent.mkdir()
    res = run_cli("convert", bad_stats, "-o", out, *SAMPLE, *SAMPLE_SHAPE)
    _one_error_line(res, "layer2.bn1: running_var holds inf in 1 channel", "brn calibrate")
    assert list(out.parent.iterdir()) == []

    obj = torch.load(good, weights_only=True)
    obj["renorm_layers"]["layer1.bn2"]["eps"] = 0.0
    bad_eps = tmp_path / "bad_eps.pt"
    torch.save(obj, bad_eps)
    res = run_cli("convert", bad_eps, "-o", out, *SAMPLE, *SAMPLE_SHAPE)
    _one_error_line(res, "layer1.bn2", "eps must be a finite number > 0, got 0.0")
    assert list(out.parent.iterdir()) == []
