"""Evaluation: inference vs minibatch statistics, running stats untouched, CLI and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from brn_cli.cli.app import main
from brn_cli.errors import BrnError
from brn_cli.evaluation.evaluate import evaluate
from brn_cli.nn.layer import BatchRenorm1d


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 8), BatchRenorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3), nn.BatchNorm1d(3)
    )


def _loader(n=40, b=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g) * 2 + 1
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + b], y[i : i + b]) for i in range(0, n, b)]


def test_inference_mode_matches_manual_computation():
    torch.manual_seed(0)
    model, loader = _model(), _loader()
    model.train()
    result = evaluate(model, loader)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in loader])
    y = torch.cat([y for _, y in loader])
    assert result.mode == "inference" and result.examples == 40 and result.batches == 4
    assert result.loss == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert result.accuracy == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_batch_stats_mode_uses_minibatch_stats_and_leaves_running_stats_unchanged():
    torch.manual_seed(0)
    model, loader = _model(), _loader()
    model[1].rmax, model[1].dmax = 3.0, 5.0
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate(model, loader, batch_stats=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (model[1].rmax, model[1].dmax, model.training, model[3].training) == (3.0, 5.0, True, True)
    # Reference: plain batchnorm over each batch, dropout off.
    ref = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Identity(), nn.Linear(8, 3), nn.BatchNorm1d(3)
    )
    ref.load_state_dict(before)
    ref.train()
    with torch.no_grad():
        logits = torch.cat([ref(x) for x, _ in loader])
    y = torch.cat([y for _, y in loader])
    assert result.mode == "batch-stats"
    assert result.loss == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert result.loss != pytest.approx(evaluate(model, loader).loss, rel=1e-3)


def test_bad_inputs():
    model = _model()
    with pytest.raises(BrnError, match="out of range for a model with 3 outputs"):
        evaluate(model, [(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))])
    with pytest.raises(BrnError, match="too small"):
        evaluate(model, [(torch.randn(1, 5), torch.tensor([0]))], batch_stats=True)
    with pytest.raises(BrnError, match="empty"):
        evaluate(model, [])


def test_cli_evaluate_json_and_errors(tmp_path, capsys):
    g = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(
        data,
        x_train=g.normal(size=(40, 5)).astype(np.float32),
        y_train=np.arange(40) % 3,
        x_val=g.normal(size=(24, 5)).astype(np.float32),
        y_val=np.arange(24) % 3,
    )
    src = tmp_path / "m.pt"
    torch.save(_model().state_dict(), src)
    args = [
        "evaluate",
        str(src),
        "--data",
        str(data),
        "--arch",
        "tests.test_evaluate:_plain",
        "--device",
        "cpu",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--batch-stats", "--sampler", "grouped:2", "--batch-size", "6", "--json"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    report = json.loads(captured.out)
    assert report["inference"]["examples"] == 24 and report["batch_stats"]["examples"] == 24
    assert report["gap"] == pytest.approx(report["batch_stats"]["accuracy"] - report["inference"]["accuracy"])
    for extra, message in (
        (["--batch-stats", "--batch-size", "50"], "batch larger than the data"),
        (["--batch-stats", "--sampler", "grouped:9", "--batch-size", "9"], "fewer than K=9"),
        (["--sampler", "pairs"], "expected iid or grouped:K"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code != 0 and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def _plain() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3), nn.BatchNorm1d(3)
    )


def _ten_classes(n=10) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, n))


def _ten_class_data(tmp_path, per_class=20):
    g = np.random.default_rng(1)
    data = tmp_path / "ten.npz"
    y = np.arange(10 * per_class) % 10
    np.savez(data, x_train=g.normal(size=(len(y), 5)).astype(np.float32), y_train=y,
             x_val=g.normal(size=(len(y), 5)).astype(np.float32), y_val=y)  # fmt: skip
    return data


def test_default_batch_fits_the_sampler():
    from brn_cli.evaluation.evaluate import default_batch_size

    labels = torch.arange(200) % 10
    assert default_batch_size(labels, "iid") == 200  # 256, or every example when fewer
    assert default_batch_size(torch.arange(1000) % 10, "iid") == 256
    assert default_batch_size(labels, "grouped:16") == 160  # 10 labels x 16
    assert default_batch_size(labels, "grouped:4") == 40
    assert default_batch_size(torch.arange(1000) % 100, "grouped:4") == 256  # 64 labels x 4
    assert default_batch_size(torch.arange(1000) % 100, "grouped:3") == 255  # 85 labels x 3
    assert default_batch_size(torch.arange(1000) % 2, "grouped:300") == 300  # K > 256: one label


def test_cli_default_batch_works_with_grouped_sampler(tmp_path, run_cli):
    """evaluate's default batch of 256 used to fail --sampler grouped:16 on 10 classes."""
    data = _ten_class_data(tmp_path, per_class=30)  # 300 examples: more than 256
    torch.save(_ten_classes().state_dict(), tmp_path / "m.pt")
    result = run_cli("evaluate", tmp_path / "m.pt", "--data", data, "--arch", "test_evaluate:_ten_classes",
                     "--device", "cpu", "--batch-stats", "--sampler", "grouped:16", "--json")  # fmt: skip
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["batch_stats"]["batch_size"] == 160 and report["batch_stats"]["examples"] == 160
    assert report["inference"]["examples"] == 300


def test_cli_refuses_more_classes_than_outputs_before_evaluating(tmp_path, run_cli):
    """A 5-class model on 10-class data used to stop mid-run with 'IndexError: Target 9 is out of bounds'."""
    data = _ten_class_data(tmp_path)
    torch.save(_ten_classes(5).state_dict(), tmp_path / "m.pt")
    result = run_cli("evaluate", tmp_path / "m.pt", "--data", data, "--arch", "test_evaluate:_ten_classes",
                     "--arch-kwargs", '{"n": 5}', "--device", "cpu")  # fmt: skip
    assert result.code == 2 and result.err_lines == [
        f"brn: error: {data}: the data has 10 classes (labels 0..9) but the model has 5 outputs"
    ]
