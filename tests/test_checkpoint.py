"""Reading users' checkpoint files and writing brn's own (library level; the CLI is in test_cli_core)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brn_cli.errors import BrnError
from brn_cli.nn.convert import convert_batchnorm, max_eval_difference
from brn_cli.nn.layer import BatchRenorm2d, BatchRenormNd
from brn_cli.storage.checkpoint import FORMAT_NAME, FORMAT_VERSION, load_checkpoint, save_brn_checkpoint

ARCH = "torchvision:shufflenet_v2_x0_5"
KWARGS = {"num_classes": 10}


@pytest.fixture
def source_model(shufflenet_bn) -> nn.Module:
    """The shared BatchNorm model (conftest), built from ARCH and KWARGS."""
    return shufflenet_bn


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    ("nest", "prefix"),
    [
        (None, ""),
        ("state_dict", "module."),
        ("model", "_orig_mod."),
        ("model_state_dict", "module._orig_mod."),
        ("state_dict_ema", ""),
    ],
)
def test_state_dict_files_nested_and_prefixed(tmp_path, source_model, nest, prefix):
    state = {prefix + k: v for k, v in source_model.state_dict().items()}
    obj = state if nest is None else {nest: state, "epoch": 3, "optimizer": {"lr": 0.1}}
    path = tmp_path / "weights.pth"
    torch.save(obj, path)
    ckpt = load_checkpoint(path, arch=ARCH, arch_kwargs=KWARGS)
    assert ckpt.file_format == "state_dict" and ckpt.state_key == nest
    _same_state(ckpt.model, source_model)


def test_safetensors_and_old_checkpoints_without_num_batches_tracked(tmp_path, source_model):
    from safetensors.torch import save_file

    state = {k: v for k, v in source_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    ckpt = load_checkpoint(path, arch=ARCH, arch_kwargs=KWARGS)
    assert ckpt.file_format == "safetensors"
    for key, value in state.items():
        assert torch.equal(ckpt.model.state_dict()[key], value), key


def test_mismatches_are_listed_by_name(tmp_path, source_model):
    path = tmp_path / "w.pt"
    state = dict(source_model.state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["conv1.1.running_mean"]
    torch.save(state, path)
    with pytest.raises(BrnError) as info:
        load_checkpoint(path, arch=ARCH, arch_kwargs={"num_classes": 7})
    msg = str(info.value)
    assert "missing: conv1.1.running_mean" in msg
    assert "unexpected: extra.weight" in msg
    assert "fc.weight (file [10, 1024] vs model [7, 1024])" in msg
    with pytest.raises(BrnError, match="pass `arch`"):
        load_checkpoint(path)


def test_brn_checkpoint_loads_weights_only_and_rebuilds_without_arch(tmp_path, source_model):
    import copy

    model = convert_batchnorm(copy.deepcopy(source_model), momentum=0.05)
    model.get_submodule("conv1.1").rmax = 2.5
    model.get_submodule("conv1.1").dmax = 0.75
    path = tmp_path / "out.pt"
    save_brn_checkpoint(
        model, path, arch_spec=ARCH, arch_kwargs=KWARGS, input_shape=[2, 3, 64, 64], source_name="w.pt"
    )
    raw = torch.load(path, weights_only=True)  # tensors and primitive types only
    assert raw["format"] == FORMAT_NAME and raw["format_version"] == FORMAT_VERSION
    assert raw["arch"] == {"spec": ARCH, "kwargs": KWARGS}
    assert raw["input_shape"] == [2, 3, 64, 64]
    assert raw["renorm_layers"]["conv1.1"]["rmax"] == 2.5
    assert raw["provenance"]["torch_version"] == str(torch.__version__)
    assert "conv1.1.running_var" in raw["state_dict"]  # nn.BatchNorm's key layout

    ckpt = load_checkpoint(path)  # no arch: it is recorded
    assert ckpt.file_format == "brn" and ckpt.arch_spec == ARCH and ckpt.input_shape == [2, 3, 64, 64]
    layer = ckpt.model.get_submodule("conv1.1")
    assert isinstance(layer, BatchRenorm2d) and (layer.rmax, layer.dmax, layer.momentum) == (2.5, 0.75, 0.05)
    assert sum(isinstance(m, BatchRenormNd) for m in ckpt.model.modules()) == len(raw["renorm_layers"])
    _same_state(ckpt.model, model)
    assert max_eval_difference(model, ckpt.model, [2, 3, 32, 32]) == 0.0

    with pytest.raises(BrnError, match="already exists"):
        save_brn_checkpoint(model, path, arch_spec=ARCH)
    raw["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(raw, newer)
    with pytest.raises(BrnError, match="newer"):
        load_checkpoint(newer)


def test_pickled_module_needs_trust(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(BrnError, match="`trust_pickle=True`") as info:
        load_checkpoint(path)
    assert "torch.nn.modules" in str(info.value)  # names what it would import
    ckpt = load_checkpoint(path, trust_pickle=True)
    assert ckpt.file_format == "pickled-module"
    _same_state(ckpt.model, model)


def test_package_module_callable_arch_spec(tmp_path):
    lin = nn.Linear(4, 2)
    path = tmp_path / "lin.pt"
    torch.save(lin.state_dict(), path)
    ckpt = load_checkpoint(path, arch="torch.nn:Linear", arch_kwargs={"in_features": 4, "out_features": 2})
    _same_state(ckpt.model, lin)
    for spec, match in [
        ("torch.nn:NoSuchThing", "no callable"),
        ("no_such_package_xyz:f", "cannot import"),
        ("torchvision:not_a_model", "no model named"),
        ("resnet18", "expected"),
    ]:
        with pytest.raises(BrnError, match=match):
            load_checkpoint(path, arch=spec)
