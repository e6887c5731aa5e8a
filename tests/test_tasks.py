"""Tasks (brn_cli.tasks): each loss and metric against hand-computed values, classification unchanged, the
engine and `brn evaluate` / `brn calibrate` on tiny segmentation and embedding data, and the bad inputs of
the new paths (one line, non-zero exit, nothing written)."""

from __future__ import annotations

import json
import math
import re
import textwrap

import pytest
import torch
import torch.nn.functional as F

from brn_cli.errors import BrnError
from brn_cli.tasks import Classification, Segmentation, make_task
from brn_cli.tasks.embedding import batch_hard_triplet_loss, contrastive_loss, recall_at_k
from brn_cli.tasks.segmentation import confusion_matrix, segmentation_scores

# ----------------------------------------------------------------------------------------------
# Losses and metrics against values computed by hand
# ----------------------------------------------------------------------------------------------


def test_confusion_matrix_and_mean_iou_by_hand():
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    matrix = confusion_matrix(pred, target, 4, ignore_index=255)
    # (true, predicted): (0,0), (0,1), (1,1), (1,1), (2,2); the 255 pixel is left out; class 3 occurs nowhere
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2] = 1, 1, 2, 1
    assert torch.equal(matrix, expected)
    scores = segmentation_scores(matrix)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 5)
    # IoU_0 = 1 / (2 + 1 - 1), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 1 / 1; class 3 has no IoU (not a 0)
    assert scores["iou_per_class"] == pytest.approx([1 / 2, 2 / 3, 1.0, None])
    assert scores["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_segmentation_metric_state_sums_batches_and_aux_loss_is_weighted_half():
    task = Segmentation()
    torch.manual_seed(0)
    out, aux = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :] = 255
    plain = F.cross_entropy(out, target, ignore_index=255)
    with_aux = plain + 0.5 * F.cross_entropy(aux, target, ignore_index=255)
    assert float(task.loss(out, target)) == pytest.approx(float(plain), rel=1e-6)
    assert float(task.loss({"out": out, "aux": aux}, target)) == pytest.approx(float(with_aux), rel=1e-6)
    state = task.metric_state()
    task.update(state, out[:1], target[:1])
    task.update(state, out[1:], target[1:])
    whole = confusion_matrix(out.argmax(1), target, 3, 255)
    assert torch.equal(state["confusion"], whole)
    assert task.compute(state)["mean_iou"] == pytest.approx(segmentation_scores(whole)["mean_iou"])
    hits, pixels = task.batch_metric(out, target)
    assert int(pixels) == 2 * 20 - 5 and int(hits) == int(((out.argmax(1) == target) & (target != 255)).sum())


def _on_circle(degrees: list[float], scale: list[float] | None = None) -> torch.Tensor:
    scale = scale or [1.0] * len(degrees)
    return torch.tensor(
        [
            [s * math.cos(math.radians(a)), s * math.sin(math.radians(a))]
            for a, s in zip(degrees, scale, strict=True)
        ]
    )


def test_recall_at_k_by_hand_excludes_the_query_and_ignores_scale():
    # angles 0, 10, 25, 90, 180 with labels 0, 0, 1, 1, 2 (label 2 occurs once: not a query)
    # q0 -> 10 (label 0): hit at 1; q1 -> 0 (label 0): hit at 1; q2 (label 1) -> 10, 0, then 90: hit at 3;
    # q3 (label 1) -> 25 (label 1): hit at 1.
    labels = torch.tensor([0, 0, 1, 1, 2])
    embeddings = _on_circle([0, 10, 25, 90, 180], scale=[1, 5, 0.2, 3, 1])
    recall = recall_at_k(embeddings, labels, [1, 2, 3])
    assert recall == pytest.approx({"recall@1": 3 / 4, "recall@2": 3 / 4, "recall@3": 1.0})


def test_batch_hard_triplet_loss_by_hand():
    # unit vectors at 0, 60 (label 0) and 90, 180 (label 1): |a - b| = 2 sin(angle / 2)
    d = lambda degrees: 2 * math.sin(math.radians(degrees) / 2)  # noqa: E731
    embeddings, labels = _on_circle([0, 60, 90, 180], scale=[1, 2, 1, 3]), torch.tensor([0, 0, 1, 1])
    per_anchor = [
        max(0.0, d(60) - min(d(90), d(180)) + 0.2),  # anchor 0: positive 60, negatives 90 and 180
        max(0.0, d(60) - min(d(30), d(120)) + 0.2),  # anchor 60
        max(0.0, d(90) - min(d(90), d(30)) + 0.2),  # anchor 90: positive 180
        max(0.0, d(90) - min(d(180), d(120)) + 0.2),  # anchor 180
    ]
    assert per_anchor[0] == 0.0 and per_anchor[3] == 0.0 and per_anchor[1] > 0  # the check has teeth
    loss = batch_hard_triplet_loss(embeddings, labels, margin=0.2)
    assert float(loss) == pytest.approx(sum(per_anchor) / 4, rel=1e-5)
    contrastive = contrastive_loss(embeddings, labels, margin=0.5)
    pairs = [d(60) ** 2, 0.0, 0.0, max(0, 0.5 - d(30)) ** 2, 0.0, d(90) ** 2]  # (0,60) (0,90) (0,180) ...
    assert float(contrastive) == pytest.approx(sum(pairs) / 6, rel=1e-5)


def test_triplet_loss_has_a_gradient_and_no_nan_for_a_batch_without_pairs():
    x = torch.randn(4, 3, requires_grad=True)
    loss = batch_hard_triplet_loss(x, torch.tensor([0, 1, 2, 3]), margin=0.2)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all()


def test_classification_task_computes_what_evaluate_always_did():
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 4), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    task = Classification()
    state = task.metric_state()
    task.update(state, logits, labels)
    metrics = task.compute(state)
    assert metrics["loss"] == float(F.cross_entropy(logits, labels, reduction="sum")) / 7
    assert metrics["accuracy"] == int((logits.argmax(1) == labels).sum()) / 7
    correct, count = task.batch_metric(logits, labels)
    assert int(correct) == int((logits.argmax(1) == labels).sum()) and count == 7


def test_classification_of_an_embedding_width_is_one_line_suggesting_the_embedding_task():
    with pytest.raises(
        BrnError, match=r"64 values per example but the data has 10 classes.*`task=embedding`"
    ):
        Classification().check(torch.zeros(2, 64), torch.tensor([0, 1]), num_classes=10)


@pytest.mark.parametrize(
    ("output", "target", "classes", "needle"),
    [
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 6, 6, dtype=torch.int64), None, "mask size 6x6 differs"),
        (torch.zeros(2, 3, 8, 8), torch.full((2, 8, 8), 5), None, "holds class 5 but the model outputs 3"),
        (
            torch.zeros(2, 3, 8, 8),
            torch.zeros(2, 8, 8, dtype=torch.int64),
            4,
            "4 classes (0..3) but the model outputs 3",
        ),
        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), None, "scores [N, K, H, W]"),
    ],
)
def test_segmentation_shape_checks(output, target, classes, needle):
    with pytest.raises(BrnError, match=re.escape(needle)):
        Segmentation().check(output, target, classes)
    Segmentation().check(torch.zeros(2, 3, 8, 8), torch.full((2, 8, 8), 255))  # ignored pixels are fine


# ----------------------------------------------------------------------------------------------
# The user's own loss and metric
# ----------------------------------------------------------------------------------------------

USER_CODE = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F

    def per_example(output, target):
        return F.cross_entropy(output, target, reduction="none")

    def broken(output, target):
        raise RuntimeError("my loss is broken")

    def doubled(output, target):
        return 2 * F.cross_entropy(output, target)

    def top1(output, target):
        return {"hits": float((output.argmax(1) == target).float().mean()), "one": 1.0}
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_tasks.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_tasks"


def test_user_loss_and_metric_replace_the_tasks_own(user_module):
    task = make_task(loss=f"{user_module}:doubled", metric=f"{user_module}:top1")
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 0, 0])
    assert float(task.loss(logits, labels)) == pytest.approx(2 * float(F.cross_entropy(logits, labels)))
    state = task.metric_state()
    task.update(state, logits[:2], labels[:2])
    task.update(state, logits[2:], labels[2:])
    metrics = task.compute(state)
    assert metrics["hits"] == pytest.approx(2 / 3) and metrics["one"] == 1.0 and task.metric_name == "hits"


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("per_example", "returned a tensor of shape [2]; expected a scalar"),
        ("broken", "raised RuntimeError: my loss"),
    ],
)
def test_user_loss_that_is_not_a_scalar_or_raises_is_one_line_naming_it(user_module, name, needle):
    task = make_task(loss=f"{user_module}:{name}")
    with pytest.raises(BrnError, match=re.escape(needle)) as info:
        task.loss(torch.zeros(2, 3), torch.tensor([0, 1]))
    assert f"{user_module}:{name}" in str(info.value) and info.value.param == "loss"


# ----------------------------------------------------------------------------------------------
# End to end: the engine, evaluate and calibrate on tiny synthetic data (a callable data spec)
# ----------------------------------------------------------------------------------------------

DATA_CODE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def _squares(n, seed, size=12):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 1, size, size, generator=g) * 0.2
        masks = torch.zeros(n, size, size, dtype=torch.int64)
        for i in range(n):
            r, c = torch.randint(0, size - 5, (2,), generator=g).tolist()
            cls = 1 + i % 2
            x[i, 0, r:r + 5, c:c + 5] += 0.5 * cls
            masks[i, r:r + 5, c:c + 5] = cls
        masks[:, 0, 0] = 255  # an unlabelled pixel in every mask
        return x, masks

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return self.x[i], self.y[i]

    def segmentation(n_train=48, n_val=16):
        return Pairs(*_squares(n_train, 0)), Pairs(*_squares(n_val, 1))

    def many_classes():  # class 7 in the masks, for a model of 3 outputs per pixel
        (x, m), (xv, mv) = _squares(8, 0), _squares(4, 1)
        m[m == 2] = 7
        return Pairs(x, m), Pairs(xv, mv)

    def fcn(classes=3, stride=1):  # stride 2: scores at half the masks' size
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, stride=stride), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, classes, 1),
        )

    def _clusters(n, seed, classes=4, dim=8):
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(7)) * 2
        y = torch.arange(n) % classes
        return centres[y] + torch.randn(n, dim, generator=g), y

    def embedding():
        return Pairs(*_clusters(64, 0)), Pairs(*_clusters(32, 1))

    def embedder(dim=16):
        return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, dim))
    """
)


@pytest.fixture
def toy(tmp_path, monkeypatch, user_module):
    (tmp_path / "toy_tasks.py").write_text(DATA_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("toy_tasks")
    torch.manual_seed(0)
    torch.save(module.fcn().state_dict(), tmp_path / "fcn.pt")
    torch.save(module.embedder().state_dict(), tmp_path / "embedder.pt")
    return tmp_path


SEG = ["--arch", "toy_tasks:fcn", "--data", "toy_tasks:segmentation", "--task", "segmentation"]
EMB = ["--arch", "toy_tasks:embedder", "--data", "toy_tasks:embedding", "--task", "embedding"]


@pytest.mark.slow
def test_segmentation_finetune_evaluate_and_calibrate_end_to_end(toy, run_cli, one_thread):
    run = toy / "seg-run"
    res = run_cli("finetune", toy / "fcn.pt", *SEG, "-o", run, "--steps", "150", "--batch-size", "4",
                  "--lr", "0.05", "--log-every", "20", "--json")  # fmt: skip
    assert res.code == 0, res.err
    final = json.loads(res.out)["final"]
    # 3 classes (background, two square brightnesses): chance mean IoU is about 1/3 or below
    assert final["val_mean_iou"] > 0.6, final
    assert 0 < final["val_pixel_accuracy"] <= 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "pixel_accuracy" in records[0] and any("val_mean_iou" in r for r in records)
    # the task is recorded, so evaluate defaults to it
    res = run_cli(
        "evaluate",
        run / "best.pt",
        "--arch",
        "toy_tasks:fcn",
        "--data",
        "toy_tasks:segmentation",
        "--batch-stats",
        "--json",
    )
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["metric"] == "mean_iou" and len(report["inference"]["metrics"]["iou_per_class"]) == 3
    assert report["inference"]["metric"] == pytest.approx(final["val_mean_iou"], abs=1e-6)
    assert report["gap"] == pytest.approx(report["batch_stats"]["metric"] - report["inference"]["metric"])
    assert "task segmentation, as recorded" in res.err
    res = run_cli("calibrate", run / "best.pt", "--arch", "toy_tasks:fcn", "--data", "toy_tasks:segmentation", "-o", toy / "cal.pt",
                  "--batches", "4", "--batch-size", "4", "--json")  # fmt: skip
    assert res.code == 0, res.err
    res = run_cli(
        "evaluate", toy / "cal.pt", "--arch", "toy_tasks:fcn", "--data", "toy_tasks:segmentation", "--json"
    )
    assert res.code == 0 and json.loads(res.out)["task"] == "segmentation", res.err


@pytest.mark.slow
def test_embedding_finetune_reaches_recall_with_grouped_batches(toy, run_cli, one_thread):
    res = run_cli("finetune", toy / "embedder.pt", *EMB, "-o", toy / "emb-run", "--steps", "40",
                  "--batch-size", "16", "--sampler", "grouped:4", "--lr", "0.05", "--recall-k", "1,3",
                  "--json")  # fmt: skip
    assert res.code == 0, res.err
    final = json.loads(res.out)["final"]
    # four well separated clusters in 8-d: a trained embedding retrieves a same-label neighbour nearly always
    assert final["val_recall@1"] > 0.9, final
    assert final["val_recall@3"] >= final["val_recall@1"]
    res = run_cli(
        "evaluate",
        toy / "emb-run" / "best.pt",
        "--arch",
        "toy_tasks:embedder",
        "--data",
        "toy_tasks:embedding",
        "--json",
    )
    assert res.code == 0 and json.loads(res.out)["metric"] == "recall@1", res.err


# ----------------------------------------------------------------------------------------------
# Bad inputs: one line, non-zero exit, nothing written
# ----------------------------------------------------------------------------------------------


def _bad_cases(toy):
    seg = ["--arch", "toy_tasks:fcn", "--task", "segmentation"]
    return [
        (["finetune", toy / "fcn.pt", *seg, "--data", "toy_tasks:segmentation", "--arch-kwargs", '{"stride": 2}'], "differs from the model's output"),
        (["finetune", toy / "fcn.pt", *seg, "--data", "toy_tasks:many_classes"], "8 classes (0..7) but the model outputs 3"),
        (["finetune", toy / "embedder.pt", "--arch", "toy_tasks:embedder", "--data", "toy_tasks:embedding"],
         "--task embedding"),
        (["finetune", toy / "embedder.pt", *EMB], "--sampler grouped:K"),
        (["finetune", toy / "embedder.pt", "--arch", "toy_tasks:embedder", "--data", "toy_tasks:embedding",
          "--loss", "user_tasks:per_example", "--metric", "user_tasks:top1"], "user_tasks:per_example"),
        (["finetune", toy / "embedder.pt", "--arch", "toy_tasks:embedder", "--data", "toy_tasks:embedding",
          "--loss", "user_tasks:broken"], "raised RuntimeError"),
        (["evaluate", toy / "fcn.pt", *seg, "--data", "toy_tasks:segmentation", "--arch-kwargs", '{"stride": 2}'], "differs from the model's output"),
    ]  # fmt: skip


def test_bad_task_inputs_are_one_line_and_write_nothing(toy, run_cli, one_thread):
    before = sorted(p.name for p in toy.iterdir())
    for args, needle in _bad_cases(toy):
        if args[0] == "finetune":
            args = [*args, "-o", toy / "run", "--steps", "2", "--batch-size", "4"]
        res = run_cli(*args)
        assert res.code == 2, (args, res.err)
        assert len(res.err_lines) == 1 and needle in res.err_lines[0], (args, res.err)
        assert "Traceback" not in res.err and res.out == ""
        assert not (toy / "run").exists(), args
    assert sorted(p.name for p in toy.iterdir()) == before


def test_resume_imports_a_recorded_loss_only_when_it_is_named_again(tmp_path):
    """config.json records `loss`; a resume reads it from the file, so it must be named again to be imported."""
    from brn_cli.train.config import FinetuneConfig, resumed_config

    recorded = {**FinetuneConfig(checkpoint="m.pt", data="d.npz", output=str(tmp_path), steps=2).to_dict()}
    recorded["loss"] = "user_tasks:doubled"
    config = FinetuneConfig(checkpoint="", data="d.npz", output="", resume=str(tmp_path))
    with pytest.raises(BrnError, match="used its own loss user_tasks:doubled; name it again") as info:
        resumed_config(config, recorded)
    assert info.value.param == "loss"
    again = FinetuneConfig(
        checkpoint="", data="d.npz", output="", resume=str(tmp_path), loss="user_tasks:doubled"
    )
    assert resumed_config(again, recorded).loss == "user_tasks:doubled"


def test_curves_plot_the_tasks_own_metric(tmp_path, monkeypatch):
    """A segmentation run's curves.png draws pixel accuracy (train) and mean IoU (val), not an empty accuracy."""
    import json

    from brn_cli.train import curves

    metrics = tmp_path / "metrics.jsonl"
    records = [
        {"kind": "train", "step": 1, "loss": 2.0, "pixel_accuracy": 0.5, "rmax": 1, "dmax": 0},
        {"kind": "eval", "step": 1, "val_loss": 2.1, "val_mean_iou": 0.2},
        {"kind": "train", "step": 2, "loss": 1.0, "pixel_accuracy": 0.7, "rmax": 1, "dmax": 0},
        {"kind": "eval", "step": 2, "val_loss": 1.1, "val_mean_iou": 0.4},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn: dict[str, list[float]] = {}
    series = curves._series

    def spy(recs, kind, key):
        xs, ys = series(recs, kind, key)
        drawn[key] = ys
        return xs, ys

    monkeypatch.setattr(curves, "_series", spy)
    out = curves.plot_runs(
        {"run": metrics}, tmp_path / "c.png", metric="mean_iou", train_metric="pixel_accuracy"
    )
    assert out.exists() and out.stat().st_size > 0
    assert drawn["pixel_accuracy"] == [0.5, 0.7]
    assert drawn["val_mean_iou"] == [0.2, 0.4]
