"""The sample architectures, the i.i.d. BatchNorm pretraining loop and the checkpoint script."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from brn_cli import convert_batchnorm
from brn_cli.deploy.graph import find_fold_sites
from brn_cli.errors import BrnError
from brn_cli.nn.layer import BatchRenormNd
from brn_cli.recipes.pretrain import load_sample_data, pretrain_batchnorm
from brn_cli.samples.models import SAMPLE_ARCHS
from brn_cli.storage.checkpoint import build_arch

REPO = Path(__file__).resolve().parent.parent
ARCHS = sorted(SAMPLE_ARCHS)


# Every test here with one intra-op thread (the `one_thread` fixture in conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return load_sample_data()


def _with_nontrivial_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-default affine parameters and running statistics, so conversion has something to keep."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 28, 28, generator=gen) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return model


@pytest.mark.parametrize("name", ARCHS)
def test_arch_forward_backward(name):
    torch.manual_seed(0)
    model = build_arch(f"brn_cli.samples.models:{name}", {"width": 8})
    x = torch.randn(2, 1, 28, 28)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().sum().backward()
    params = list(model.parameters())
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(isinstance(m, BatchRenormNd) for m in model.modules())  # plain BN: the user's model


@pytest.mark.parametrize("name", ARCHS)
def test_arch_every_batchnorm_has_a_foldable_producer(name):
    model = SAMPLE_ARCHS[name]().eval()
    sites = find_fold_sites(model, [torch.randn(2, 1, 28, 28)])
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(sites) == n_bn
    assert [s for s in sites if s.producer is None] == []


def test_encoder_decoder_has_grouped_conv_transpose_before_bn():
    model = SAMPLE_ARCHS["encoder_decoder"]().eval()
    sites = find_fold_sites(model, [torch.randn(2, 1, 28, 28)])
    producers = [model.get_submodule(s.producer) for s in sites]
    grouped = [p for p in producers if isinstance(p, nn.ConvTranspose2d) and p.groups > 1]
    assert grouped and grouped[0].bias is not None
    mlp_sites = find_fold_sites(SAMPLE_ARCHS["mlp"]().eval(), [torch.randn(2, 1, 28, 28)])
    assert all(isinstance(SAMPLE_ARCHS["mlp"]().get_submodule(s.producer), nn.Linear) for s in mlp_sites)


@pytest.mark.parametrize("name", ARCHS)
def test_arch_converts_with_eval_outputs_unchanged(name):
    torch.manual_seed(1)
    original = _with_nontrivial_stats(SAMPLE_ARCHS[name]()).eval()
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in original.modules())
    converted = convert_batchnorm(copy.deepcopy(original)).eval()
    assert sum(isinstance(m, BatchRenormNd) for m in converted.modules()) == n_bn
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=0, atol=1e-6)
    # and the converted model still trains (forward/backward in training mode)
    converted.train()
    converted(x).logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in converted.parameters())


@pytest.mark.slow
@pytest.mark.science
def test_pretrain_small_resnet_reaches_real_accuracy(one_thread, data):
    model, metrics = pretrain_batchnorm("small_resnet", steps=100, batch_size=32, lr=0.05, seed=0, data=data)
    # measured: 93% val after 100 steps (seeds 0 and 1); chance is 10%
    assert metrics["val_accuracy"] >= 0.85
    assert metrics["train_accuracy"] >= 0.85
    assert not model.training
    # the moving averages were learned from the data, not left at their initial (0, 1)
    stem_bn = model.stem[1]
    assert stem_bn.num_batches_tracked.item() == 100
    assert not torch.allclose(stem_bn.running_var, torch.ones_like(stem_bn.running_var))


def test_pretrain_is_deterministic_per_seed(one_thread, data):
    a, ma = pretrain_batchnorm("mlp", steps=30, batch_size=16, lr=0.05, seed=3, data=data)
    b, mb = pretrain_batchnorm(
        "brn_cli.samples.models:mlp", steps=30, batch_size=16, lr=0.05, seed=3, data=data
    )
    c, _ = pretrain_batchnorm("mlp", steps=30, batch_size=16, lr=0.05, seed=4, data=data)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert ma["val_accuracy"] == mb["val_accuracy"]
    assert not torch.equal(a.state_dict()["1.weight"], c.state_dict()["1.weight"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet9000"}, "unknown sample arch"),
        ({"arch": "mlp", "batch_size": 1}, "at least 2"),
        ({"arch": "mlp", "steps": 0}, "at least 1"),
        ({"arch": "mlp", "lr": 0.0}, "positive"),
    ],
)
def test_pretrain_rejects_bad_input(kwargs, message, data):
    arch = kwargs.pop("arch")
    with pytest.raises(BrnError, match=message):
        pretrain_batchnorm(arch, **{"steps": 5, "batch_size": 8, "lr": 0.1, "seed": 0, **kwargs}, data=data)


def _load_script():
    path = REPO / "samples" / "train_bn_checkpoint.py"
    spec = importlib.util.spec_from_file_location("train_bn_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_writes_plain_state_dict_atomically(tmp_path, capsys, one_thread):
    script = _load_script()
    out = tmp_path / "bn_mlp.pt"
    argv = ["--arch", "mlp", "--steps", "40", "--batch-size", "32", "--seed", "0", "-o", str(out)]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "val" in printed and str(out) in printed

    state = torch.load(out, weights_only=True)  # a plain state_dict: tensors only
    model = SAMPLE_ARCHS["mlp"]()
    model.load_state_dict(state)  # strict: every key of the architecture, nothing else
    model.eval()
    data = load_sample_data()
    with torch.no_grad():
        acc = (model(data.x_val).argmax(1) == data.y_val).float().mean().item()
    assert acc >= 0.8  # measured 88% after 40 steps (seeds 0 and 1)

    before = out.read_bytes()
    assert script.main(argv) == 2  # exists, no --force: refused before training
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn_mlp.pt"]  # no temporary files left
    assert script.main([*argv, "--force", "--seed", "1"]) == 0
    assert out.read_bytes() != before
