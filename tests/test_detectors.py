"""Nested outputs (lists, tuples and dicts of tensors, empty detections) in every comparer, and ONNX export of
torchvision detectors (random weights, nothing downloaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from brn_cli import convert_batchnorm
from brn_cli.deploy.detections import match_image, near_tie, shifted_mask_difference
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


def detections(boxes, labels, scores, masks=None) -> dict:
    found = {"boxes": np.array(boxes, float), "labels": np.array(labels), "scores": np.array(scores, float)}
    return found if masks is None else {**found, "masks": masks}


def test_detections_are_paired_by_label_and_box_not_by_position():
    want = detections([[0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 9, 9]], [1, 2, 1], [0.9, 0.8, 0.7])
    # the same detections listed in another order (near-tied scores sort either way), within the box tolerance
    got = detections([[20, 20, 40, 40], [0, 0, 10, 10.001], [5, 5, 9, 9]], [2, 1, 1], [0.8, 0.9, 0.7])
    match = match_image(got, want, box_tol=0.01)
    assert sorted(match.pairs) == [(0, 1), (1, 0), (2, 2)] and not match.want_left and not match.got_left
    relabelled = detections([[0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 9, 9]], [1, 3, 1], [0.9, 0.8, 0.7])
    match = match_image(relabelled, want, box_tol=0.01)
    assert match.want_left == [1] and match.got_left == [1]  # same box, another label: no pair
    moved = detections([[0, 0, 10, 10.5], [20, 20, 40, 40], [5, 5, 9, 9]], [1, 2, 1], [0.9, 0.8, 0.7])
    match = match_image(moved, want, box_tol=0.01)
    assert match.want_left == [0] and match.nearest == pytest.approx(0.5)


def test_only_a_score_at_the_cut_explains_an_unpaired_detection():
    # the lowest score kept is 0.3: a detection within the tolerance of it may fall either side of the cut
    assert near_tie([0.30005, 0.31, 0.9], lowest=0.3, score_tol=2e-4) == [True, False, False]


def test_a_mask_pasted_one_pixel_over_differs_only_by_the_shift():
    mask = np.zeros((1, 1, 12, 12))
    mask[0, 0, 3:8, 3:8] = 0.9
    shifted = np.roll(mask, 1, axis=3)
    assert np.abs(shifted - mask).max() == pytest.approx(0.9)
    assert shifted_mask_difference(shifted, mask) == 0.0
    changed = mask.copy()
    changed[0, 0, 5, 5] = 0.2  # inside the mask, far from any edge: no shift explains it
    assert shifted_mask_difference(changed, mask) == pytest.approx(0.7)


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


# Random weights, small: the R-CNNs keep their 10 best detections of 100 proposals. Their random-weight scores
# are spread (0.8 to 0.98, adjacent ones 1e-3 apart), so the detections compared are many and distinct.
# RetinaNet's random-weight scores sit at its classification prior, 0.01, under its 0.05 threshold: nothing
# would be detected, so its threshold is 0 and it keeps its 10 best (0.034 to 0.039, some tied within 1e-5).
DETECTORS = {
    "fasterrcnn_resnet50_fpn": {**SMALL, "box_detections_per_img": 10, "rpn_post_nms_top_n_test": 100},
    "retinanet_resnet50_fpn": {**SMALL, "detections_per_img": 10, "score_thresh": 0.0},
    "maskrcnn_resnet50_fpn": {**SMALL, "box_detections_per_img": 10, "rpn_post_nms_top_n_test": 100},
}


def detector_file(tmp_path, name: str, kwargs: dict | None = None) -> tuple:
    """A state_dict of a randomly initialised torchvision detector, and the CLI options that rebuild it."""
    from torchvision.models import detection

    kwargs = SMALL if kwargs is None else kwargs
    torch.manual_seed(0)
    model = getattr(detection, name)(weights=None, weights_backbone=None, **kwargs)
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path, ("--arch", f"torchvision:{name}", "--arch-kwargs", json.dumps(kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DETECTORS))
def test_cli_exports_a_detector_and_verifies_its_detections_in_onnxruntime(run_cli, tmp_path, name):
    import onnx

    raw, arch = detector_file(tmp_path, name, DETECTORS[name])
    out = tmp_path / "detector.onnx"
    shape = ("--input-shape", "2,3,96,96")
    # inspect and convert first (a random backbone has plain BatchNorm2d), then export the renorm model
    res = run_cli("inspect", raw, *arch, *shape, "--json")
    assert res.code == 0, res.err
    bn = [n for n in json.loads(res.out)["norms"] if n["type"] == "BatchNorm2d"]
    assert len(bn) == 53  # ResNet-50's
    path = tmp_path / "renorm.pt"
    res = run_cli("convert", raw, *arch, *shape, "-o", path)
    assert res.code == 0 and "converted 53 of 53" in res.out, res.out + res.err
    res = run_cli("export", "onnx", path, *arch, *shape, "-o", out)
    assert res.code == 2 and "detector cannot be folded" in res.err and len(res.err_lines) == 1
    res = run_cli("export", "onnx", path, *arch, *shape, "-o", out, "--no-fold", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["written"] and report["verify"]["passed"] and not report["dynamic_batch"]
    checks = report["verify"]["checks"]
    assert [(c["batch"], c["top1"]) for c in checks] == [(2, None), (2, None)]
    for c in checks:  # not a vacuous check: 2 inputs x 2 images x 10 detections, every one paired
        found = c["detections"]
        assert found["reference"] == found["onnx"] == found["matched"] == 40 and found["unmatched"] == 0
        assert found["masks"] == (name == "maskrcnn_resnet50_fpn")
    graph = onnx.load(str(out), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["image_0", "image_1"]
    per_image = 4 if name == "maskrcnn_resnet50_fpn" else 3  # boxes, scores, labels (and masks)
    assert len(graph.output) == 2 * per_image
    if name == "fasterrcnn_resnet50_fpn":
        check_a_wrong_export_fails(out, name, tmp_path)


def check_a_wrong_export_fails(path, name, tmp_path) -> None:
    """One weight of the first convolution changed in the ONNX file: the detections move, and the pairing says so."""
    import onnx
    from onnx import numpy_helper
    from torchvision.models import detection

    graph = onnx.load(str(path))
    first_conv = next(n for n in graph.graph.node if n.op_type == "Conv")
    weight = next(i for i in graph.graph.initializer if i.name == first_conv.input[1])
    values = numpy_helper.to_array(weight).copy()
    values[0, 0, 0, 0] += 1.0
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    wrong = tmp_path / "wrong.onnx"
    onnx.save(graph, str(wrong))
    model = getattr(detection, name)(weights=None, weights_backbone=None, **DETECTORS[name])
    model.load_state_dict(torch.load(tmp_path / f"{name}.pt"))
    report = verify_onnx(wrong, model, [2, 3, 96, 96], image_list=True, optimization_levels=["disabled"])
    assert not report.passed
    assert report.checks[0].detections.unmatched > 0
    assert "PyTorch detections have no ONNX detection of the same label" in report.failure()


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
