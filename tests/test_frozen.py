"""Frozen BatchNorms (torchvision's FrozenBatchNorm2d, as in every pretrained torchvision detector): kept by
default and said so, converted on request with eval outputs unchanged, left frozen inside frozen stages,
listed by inspect, folded like BatchNorm."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from brn_cli.errors import BrnError
from brn_cli.nn.convert import convert_batchnorm, plan_checked, plan_conversion
from brn_cli.nn.layer import BatchRenorm2d, BatchRenormNd

torchvision = pytest.importorskip("torchvision", reason="torchvision (a test extra) is not installed")
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

# torchvision's own FPN backbone builder: FrozenBatchNorm2d by default, early stages frozen by trainable_layers.
FPN_ARCH = ["--arch", "torchvision.models.detection.backbone_utils:resnet_fpn_backbone"]
FPN_KWARGS = ["--arch-kwargs", '{"backbone_name": "resnet18", "weights": null, "trainable_layers": 3}']
FPN_SHAPE = ["--input-shape", "1,3,64,64"]


def randomize_frozen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial buffers in every frozen norm (a fresh one is the identity map)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.weight.numel()
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) * 0.8 + 0.6)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model


def small_frozen_model(*, freeze_stem: bool = False, eps: float = 1e-5) -> nn.Module:
    """conv -> frozen norm -> relu -> conv -> frozen norm, with the stem's conv frozen on request."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        FrozenBatchNorm2d(8, eps=eps),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        FrozenBatchNorm2d(6, eps=eps),
    )
    if freeze_stem:
        model[0].requires_grad_(False)
    return randomize_frozen(model).eval()


@pytest.fixture(scope="module")
def detector():
    """Faster R-CNN on torchvision's MobileNetV3 FPN backbone with FrozenBatchNorm2d and its first stages frozen
    (what a pretrained detector holds), random weights, small images. Deep-copy it before changing it."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    torch.manual_seed(0)
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_large",
        fpn=True,
        weights=None,
        norm_layer=FrozenBatchNorm2d,
        trainable_layers=3,
    )
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    model = FasterRCNN(backbone, num_classes=3, min_size=96, max_size=96, rpn_anchor_generator=anchors)
    return randomize_frozen(model).eval()


def test_frozen_norms_are_kept_by_default_with_the_way_to_convert_them():
    model = small_frozen_model()
    decisions = plan_conversion(model)
    assert [(d.name, d.action, d.frozen) for d in decisions] == [("1", "skip", True), ("4", "skip", True)]
    assert all("`frozen=convert`" in d.reason for d in decisions)
    convert_batchnorm(model)
    assert isinstance(model[1], FrozenBatchNorm2d) and isinstance(model[4], FrozenBatchNorm2d)
    # The model has norms, so "no BatchNorm layers" would be false: say how many were kept and how to convert.
    with pytest.raises(
        BrnError, match=r"the model's 2 norms are frozen \(FrozenBatchNorm2d\).*`frozen=convert`"
    ):
        plan_checked(model, source="net.pt")


def test_convert_copies_buffers_and_eps_and_keeps_eval_outputs():
    model = small_frozen_model(eps=1e-3)
    original = copy.deepcopy(model)
    convert_batchnorm(model, frozen="convert")
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    for index in (1, 4):
        new, old = model[index], original[index]
        assert type(new) is BatchRenorm2d and new.eps == old.eps == 1e-3
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(new, key).detach(), getattr(old, key)), key
        # Converted on request to train: parameters that learn (a frozen norm's weight is a buffer).
        assert new.weight.requires_grad and new.bias.requires_grad and not new.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-6, atol=1e-6)


def test_norm_inside_a_frozen_stage_stays_frozen_unless_convert_all():
    model = small_frozen_model(freeze_stem=True)
    decisions = {d.name: d for d in plan_conversion(model, frozen="convert")}
    assert decisions["1"].action == "skip" and "frozen stage ('0'" in decisions["1"].reason
    assert "`frozen=convert-all`" in decisions["1"].reason
    assert decisions["4"].action == "convert"

    converted = convert_batchnorm(copy.deepcopy(model).train(), frozen="convert", rmax=1.0, dmax=0.0)
    assert isinstance(converted[1], FrozenBatchNorm2d) and isinstance(converted[4], BatchRenorm2d)
    before = converted[1].running_mean.clone()
    converted(torch.randn(4, 3, 8, 8)).sum().backward()  # a training step: the frozen stage does not move
    assert torch.equal(converted[1].running_mean, before)
    assert not any(p.requires_grad for p in converted[0:2].parameters())

    unfrozen = convert_batchnorm(copy.deepcopy(model), frozen="convert-all")
    assert isinstance(unfrozen[1], BatchRenorm2d) and unfrozen[1].weight.requires_grad


def test_a_frozen_norm_with_eps_zero_is_refused_by_name_and_nothing_changes():
    model = small_frozen_model(eps=0.0)
    with pytest.raises(BrnError, match=r"^1: eps is 0 \(and 1 more layer: 4\); batch renorm needs eps > 0"):
        convert_batchnorm(model, frozen="convert")
    assert isinstance(model[1], FrozenBatchNorm2d) and isinstance(model[4], FrozenBatchNorm2d)


def test_an_unknown_frozen_mode_is_refused_naming_the_parameter():
    with pytest.raises(BrnError, match="`frozen` must be one of keep, convert, convert-all") as info:
        plan_conversion(small_frozen_model(), frozen="thaw")
    assert info.value.param == "frozen"


def test_detector_frozen_norms_convert_with_eval_outputs_unchanged(detector):
    n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in detector.modules())
    assert n_frozen > 30
    keep = plan_conversion(detector)
    assert len(keep) == n_frozen and all(d.action == "skip" and d.frozen for d in keep)
    partial = plan_conversion(detector, frozen="convert")
    in_frozen_stage = [d for d in partial if d.action == "skip"]
    assert 0 < len(in_frozen_stage) < n_frozen
    assert all("frozen stage" in d.reason for d in in_frozen_stage)

    converted = convert_batchnorm(copy.deepcopy(detector), frozen="convert-all")
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in converted.modules())
    assert sum(isinstance(m, BatchRenormNd) for m in converted.modules()) == n_frozen
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        features_want = detector.backbone(images[0][None])
        features_got = converted.backbone(images[0][None])
        detections = converted(images)
    # Every frozen norm sits in the backbone: its features are where conversion could change anything
    # (boxes after NMS may reorder on a one-ulp change in a random detector).
    for key in features_want:
        torch.testing.assert_close(features_got[key], features_want[key], rtol=1e-5, atol=1e-5)
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def test_fold_treats_frozen_norms_as_batchnorm():
    from brn_cli.deploy.fold import fold_model

    model = small_frozen_model().double()
    result = fold_model(model)
    assert dict(result.folded) == {"1": "0", "4": "3"}
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in result.model.modules())
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-10, atol=1e-10)


def test_cli_convert_keeps_frozen_norms_and_converts_on_request(run_cli, tmp_path):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    weights = tmp_path / "backbone.pt"
    torch.manual_seed(0)
    torch.save(
        randomize_frozen(resnet_fpn_backbone(backbone_name="resnet18", weights=None)).state_dict(), weights
    )
    out = tmp_path / "renorm.pt"

    res = run_cli("convert", weights, "-o", out, *FPN_ARCH, *FPN_KWARGS, *FPN_SHAPE)
    assert res.code == 2 and len(res.err_lines) == 1 and not out.exists()
    assert "20 norms are frozen (FrozenBatchNorm2d)" in res.err and "--frozen convert" in res.err

    res = run_cli("convert", weights, "--dry-run", *FPN_ARCH, *FPN_KWARGS, *FPN_SHAPE)
    assert res.code == 0, res.err
    assert "would convert 0 of 20" in res.out
    assert "20 frozen norms (FrozenBatchNorm2d) kept frozen; --frozen convert converts them" in res.out

    res = run_cli("convert", weights, "-o", out, *FPN_ARCH, *FPN_KWARGS, *FPN_SHAPE, "--frozen", "convert")
    assert res.code == 0, res.err
    # trainable_layers=3 freezes the stem and layer1: their 5 norms stay frozen.
    assert "converted 15 of 20" in res.out
    assert "5 frozen norms (FrozenBatchNorm2d) kept frozen; --frozen convert-all" in res.out
    assert set(torch.load(out, weights_only=True)["renorm_layers"]) >= {
        "body.layer4.1.bn2",
        "body.layer2.0.bn1",
    }

    res = run_cli("inspect", out, *FPN_ARCH, *FPN_KWARGS, *FPN_SHAPE, "--json")
    assert res.code == 0, res.err
    norms = {n["name"]: n for n in json.loads(res.out)["norms"]}
    stem, renorm = norms["body.bn1"], norms["body.layer4.1.bn2"]
    assert stem["type"] == "FrozenBatchNorm2d" and stem["frozen"] and stem["channels"] == 64
    assert stem["fold_into"] == "body.conv1"
    assert (
        "kept frozen (frozen stage)" in stem["on_convert"]
        and "convert-all`: BatchRenorm2d" in stem["on_convert"]
    )
    assert renorm["type"] == "BatchRenorm2d" and not renorm["frozen"]

    res = run_cli("convert", weights, "-o", tmp_path / "x.pt", *FPN_ARCH, *FPN_KWARGS, "--frozen", "thaw")
    assert res.code == 2 and len(res.err_lines) == 1 and "--frozen must be one of" in res.err


def test_timm_frozen_norms_convert_and_fold_keeping_the_activation():
    pytest.importorskip("timm", reason="timm (a test extra) is not installed")
    from timm.layers import FrozenBatchNormAct2d  # timm's plain frozen norm is torchvision's

    from brn_cli.deploy.fold import fold_model
    from brn_cli.nn.layer import BatchRenormAct

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), FrozenBatchNormAct2d(8), nn.Conv2d(8, 4, 3), FrozenBatchNorm2d(4)
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for index in (1, 3):
            model[index].running_mean.normal_(0, 0.5, generator=gen)
            model[index].bias.normal_(0, 0.5, generator=gen)
    model.eval()
    x = torch.randn(2, 3, 9, 9, generator=gen)
    with torch.no_grad():
        want = model(x)
    folded = fold_model(model.double())
    assert dict(folded.folded) == {"1": "0", "3": "2"}
    with torch.no_grad():
        torch.testing.assert_close(folded.model(x.double()), want.double(), rtol=1e-5, atol=1e-5)

    converted = convert_batchnorm(model.float(), frozen="convert")
    assert type(converted[1]) is BatchRenormAct and isinstance(converted[1].act, nn.ReLU)
    assert type(converted[3]) is BatchRenorm2d
    with torch.no_grad():
        torch.testing.assert_close(converted(x), want, rtol=1e-6, atol=1e-6)
