"""Nested outputs (lists, tuples and dicts of tensors, empty detections) in every comparer, and ONNX export of
torchvision detectors (random weights, nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from brn_cli import convert_batchnorm
from brn_cli.deploy.export import export_onnx, export_onnx_checked, takes_image_list
from brn_cli.deploy.verify import verify_onnx
from brn_cli.errors import BrnError
from brn_cli.evaluation.evaluate import evaluate
from brn_cli.nn.convert import eval_output_mismatch, max_eval_difference
from brn_cli.storage.statedict import check_state_dict_roundtrip, plain_state_dict


class NestedHead(nn.Module):
    """Returns a torchvision-detector-like structure: a list of per-image dicts plus a tuple."""

    def __init__(self, boxes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.boxes = boxes

    def forward(self, x):
        y = self.bn(self.conv(x))
        pooled = y.mean((2, 3))
        per_image = [
            {"boxes": pooled[i, :4].repeat(self.boxes, 1), "scores": pooled[i, : self.boxes]}
            for i in range(x.shape[0])
        ]
        return per_image, (y.sum((1, 2, 3)),)


class NoDetections(nn.Module):
    """A detector that found nothing: its box tensors are empty."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(x)
        return [{"boxes": y.new_zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in y]


def randomized(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


def test_eval_difference_reads_every_nested_tensor():
    original = randomized(NestedHead())
    changed = randomized(NestedHead())
    changed.load_state_dict(original.state_dict())
    assert max_eval_difference(original, changed, [2, 3, 6, 6]) == 0.0
    with torch.no_grad():
        changed.bn.bias[0] += 0.5  # reaches the boxes, the scores and the sum
    assert max_eval_difference(original, changed, [2, 3, 6, 6]) >= 0.5


def test_eval_difference_treats_two_empty_detections_as_equal():
    assert max_eval_difference(randomized(NoDetections()), randomized(NoDetections()), [2, 3, 4, 4]) == 0.0


def test_eval_difference_reports_a_shape_mismatch():
    a, b = randomized(NestedHead(boxes=3)), randomized(NestedHead(boxes=2))
    b.load_state_dict(a.state_dict())
    assert max_eval_difference(a, b, [2, 3, 6, 6]) == float("inf")
    why = eval_output_mismatch(a, b, [2, 3, 6, 6])
    assert why == "output tensor 0 has shape [3, 4] in one model and [2, 4] in the other"
    assert eval_output_mismatch(a, a, [2, 3, 6, 6]) is None


def test_state_dict_roundtrip_compares_nested_outputs():
    reference = convert_batchnorm(randomized(NestedHead())).eval()
    check = check_state_dict_roundtrip(plain_state_dict(reference), NestedHead(), reference, [2, 3, 6, 6])
    assert check == {"strict_load": True, "max_abs_diff": 0.0, "mismatch": None}
    shorter = NestedHead(boxes=2)
    check = check_state_dict_roundtrip(plain_state_dict(reference), shorter, reference, [2, 3, 6, 6])
    assert check["max_abs_diff"] == float("inf") and "shape [3, 4]" in check["mismatch"]


def test_evaluate_refuses_a_detector_in_one_line():
    loader = [(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))]
    with pytest.raises(BrnError, match=r"list of dicts per image \(boxes, labels\).*classifiers only"):
        evaluate(randomized(NoDetections()), loader)


def test_verify_compares_every_nested_output(tmp_path):
    model = randomized(NestedHead())
    path = tmp_path / "nested.onnx"
    export_onnx(model, torch.randn(2, 3, 6, 6), path)
    report = verify_onnx(path, model, [2, 3, 6, 6], batches=[2])
    assert report.passed and len(report.checks) == 2
    with torch.no_grad():
        model.bn.bias[1] += 1.0  # only the PyTorch side changes: every check must see it
    report = verify_onnx(path, model, [2, 3, 6, 6], batches=[2])
    assert not report.passed and report.max_abs >= 0.5


def test_verify_reports_a_shape_mismatch_as_a_failed_check(tmp_path):
    path = tmp_path / "three.onnx"
    three = randomized(NestedHead(boxes=3))
    export_onnx(three, torch.randn(2, 3, 6, 6), path)
    two = randomized(NestedHead(boxes=2))
    report = verify_onnx(path, two, [2, 3, 6, 6], batches=[2])
    assert not report.passed
    assert report.checks[0].mismatch == "output tensor 0: ONNX shape [3, 4], PyTorch [2, 4]"


torchvision = pytest.importorskip("torchvision", reason="torchvision (a test extra) is not installed")
SMALL = {"min_size": 96, "max_size": 96}


def test_a_detector_is_recognised_as_taking_an_image_list():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    detector = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, **SMALL)
    assert takes_image_list(detector)
    assert not takes_image_list(NestedHead())


def test_folding_a_detector_is_refused_in_one_line(tmp_path):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    detector = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, **SMALL)
    with pytest.raises(BrnError, match=r"detector cannot be folded.*fold=False"):
        export_onnx_checked(detector, [1, 3, 96, 96], tmp_path / "d.onnx")
    assert not (tmp_path / "d.onnx").exists()


def detector_file(tmp_path, name: str) -> tuple:
    """A state_dict of a randomly initialised torchvision detector, and the CLI options that rebuild it."""
    from torchvision.models import detection

    model = getattr(detection, name)(weights=None, weights_backbone=None, **SMALL)
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path, ("--arch", f"torchvision:{name}", "--arch-kwargs", json.dumps(SMALL))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn"])
def test_cli_exports_a_detector_and_verifies_it_in_onnxruntime(run_cli, tmp_path, name):
    import onnx

    path, arch = detector_file(tmp_path, name)
    out = tmp_path / "detector.onnx"
    shape = ("--input-shape", "2,3,96,96")
    res = run_cli("export", "onnx", path, *arch, *shape, "-o", out)
    assert res.code == 2 and "detector cannot be folded" in res.err and len(res.err_lines) == 1
    res = run_cli("export", "onnx", path, *arch, *shape, "-o", out, "--no-fold", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["written"] and report["verify"]["passed"] and not report["dynamic_batch"]
    assert [(c["batch"], c["top1"]) for c in report["verify"]["checks"]] == [(2, None), (2, None)]
    graph = onnx.load(str(out), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["image_0", "image_1"]
    assert len(graph.output) == 6  # boxes, scores, labels of each image


@pytest.mark.slow
def test_cli_state_dict_export_of_a_detector_checks_every_output(run_cli, tmp_path):
    path, arch = detector_file(tmp_path, "fasterrcnn_mobilenet_v3_large_320_fpn")
    out = tmp_path / "plain.pt"
    res = run_cli("export", "state-dict", path, *arch, "--input-shape", "2,3,96,96", "-o", out, "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["roundtrip"] == {"strict_load": True, "max_abs_diff": 0.0, "mismatch": None}


def test_conversion_check_passes_on_a_detector_that_finds_nothing():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    from brn_cli.nn.convert import convert_checked

    detector = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, **SMALL)
    checked = convert_checked(detector, input_shape=[2, 3, 96, 96])
    assert checked.max_abs_diff == 0.0  # random weights: empty boxes, labels and scores on both sides
