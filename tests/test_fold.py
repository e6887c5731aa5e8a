"""fold_model: exact parity (float64), every producer kind, and the cases that must NOT fold."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from brn_cli import convert_batchnorm, fold_model
from brn_cli.deploy.fold import ChannelScaleShift
from brn_cli.deploy.graph import TraceError
from brn_cli.nn.layer import BatchRenormNd


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine parameters, so that folding is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (_BatchNorm, BatchRenormNd)) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=gen))
                    m.bias.copy_(torch.randn(c, generator=gen))
    return model


def norms_left(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (_BatchNorm, BatchRenormNd))]


def check_parity(model: nn.Module, x: torch.Tensor, *, examples: bool = True):
    model = randomize_norms(model.double()).eval()
    x = x.double()
    result = fold_model(model, (x,) if examples else None)
    with torch.no_grad():
        want = model(x)
        got = result.model(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    return result


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("cin", "cout", "groups"), [(4, 6, 1), (4, 6, 2), (6, 6, 6)])  # 6,6,6: depthwise
@pytest.mark.parametrize("bias", [True, False])
def test_conv_any_groups_folds_exactly(dims, cin, cout, groups, bias):
    model = nn.Sequential(
        CONV[dims](cin, cout, 3, padding=1, groups=groups, bias=bias), BN[dims](cout), nn.ReLU()
    )
    x = torch.randn(2, cin, *([5] * dims))
    result = check_parity(model, x)
    assert result.folded == [("1", "0")] and result.kept == []
    assert norms_left(result.model) == []
    assert result.model[0].bias is not None  # a producer without bias gains one
    assert isinstance(model[1], nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)  # input untouched


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("cin", "cout", "groups"), [(4, 6, 1), (4, 6, 2), (6, 9, 3), (4, 4, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_any_groups_folds_exactly(dims, cin, cout, groups, bias):
    model = nn.Sequential(CONVT[dims](cin, cout, 3, stride=2, groups=groups, bias=bias), BN[dims](cout))
    x = torch.randn(2, cin, *([4] * dims))
    result = check_parity(model, x)
    assert result.folded == [("1", "0")]
    assert norms_left(result.model) == []


def test_pytorch_fuse_helper_disagrees_for_grouped_transpose():
    """Why ConvTranspose needs its own formula: the per-channel scale must follow the group layout."""
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    bn = randomize_norms(nn.BatchNorm2d(6).double()).eval()
    ours = fold_model(nn.Sequential(conv, bn), (torch.randn(2, 4, 5, 5).double(),)).model[0]
    # Naive layout (scale axis 1 of [Cin, Cout/g, k, k] by all Cout scales) cannot even broadcast for g>1,
    # so a correct fold differs from scaling weight[:, c] by s[c] within the first group only.
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    naive = conv.weight * s[:3].view(1, 3, 1, 1)
    assert not torch.allclose(ours.weight, naive)


def test_linear_batchnorm1d_folds_with_example_and_is_kept_without():
    model = nn.Sequential(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    result = check_parity(model, x)
    assert result.folded == [("1", "0")]
    assert result.model[0].bias is not None
    unconfirmed = check_parity(model, x, examples=False)
    assert unconfirmed.folded == [] and "example input" in unconfirmed.kept[0][1]
    assert isinstance(unconfirmed.model[1], ChannelScaleShift)


def test_linear_on_3d_input_is_not_folded():
    """BatchNorm1d on [N, L, F] normalizes axis 1 (L), not the Linear's features: must not fold."""
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
    result = check_parity(model, torch.randn(2, 6, 6))
    assert result.folded == [] and "3-D" in result.kept[0][1]


class SkipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y))) + y  # conv's output also feeds the skip path


def test_conv_feeding_skip_path_is_kept_with_reason():
    result = check_parity(SkipNet(), torch.randn(2, 3, 6, 6))
    assert result.folded == [("bn2", "conv2")]
    assert [n for n, _ in result.kept] == ["bn"] and "also feeds" in result.kept[0][1]
    assert isinstance(result.model.bn, ChannelScaleShift)


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


def test_shared_producer_is_kept():
    result = check_parity(SharedConv(), torch.randn(2, 3, 5, 5))
    assert result.folded == []
    assert all("called 2 times" in reason for _, reason in result.kept)


class OutputToo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return y, self.bn(y)


def test_producer_that_is_a_model_output_is_kept():
    result = check_parity(OutputToo(), torch.randn(2, 3, 4, 4))
    assert result.folded == [] and "output" in result.kept[0][1]


def test_first_layer_norm_and_post_activation_norm_are_kept():
    model = nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 5, 3), nn.ReLU(), nn.BatchNorm2d(5), nn.Conv2d(5, 2, 1)
    )
    result = check_parity(model, torch.randn(2, 3, 6, 6))
    kept = dict(result.kept)
    assert "model input" in kept["0"] and "relu" in kept["3"].lower()
    assert isinstance(result.model[0], ChannelScaleShift) and isinstance(result.model[3], ChannelScaleShift)


def test_renorm_folds_like_batchnorm():
    bn_model = randomize_norms(
        nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    )
    brn_model = convert_batchnorm(copy.deepcopy(bn_model), momentum=0.1)
    brn_model = fold_model(brn_model).model
    x = torch.randn(2, 3, 6, 6)
    bn_folded = fold_model(bn_model).model
    with torch.no_grad():
        torch.testing.assert_close(brn_model(x), bn_folded(x), rtol=0, atol=0)
    assert not any(isinstance(m, BatchRenormNd) for m in brn_model.modules())


def test_renorm_parity_after_convert_float64():
    model = randomize_norms(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ConvTranspose2d(8, 4, 2, groups=4), nn.BatchNorm2d(4)
        )
    )
    convert_batchnorm(model)
    result = check_parity(model, torch.randn(2, 3, 7, 7))
    assert len(result.folded) == 2


def test_norm_with_activation_keeps_act_and_drop():
    timm = pytest.importorskip("timm", reason="timm (a test extra) is not installed")
    from timm.layers.norm_act import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU), nn.Conv2d(4, 2, 1))
    assert timm is not None
    result = check_parity(model, torch.randn(2, 3, 6, 6))
    assert result.folded == [("1", "0")]
    assert isinstance(result.model[1].act, nn.ReLU)
    renormed = convert_batchnorm(randomize_norms(model.float()))
    result = check_parity(renormed, torch.randn(2, 3, 6, 6))
    assert result.folded == [("1", "0")] and isinstance(result.model[1].act, nn.ReLU)


def test_fp16_model_folds_in_float64_then_casts():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model = model.half()  # the fp16 values are what the fold starts from
    half = fold_model(model).model[0]
    ref = fold_model(model.double()).model[0]  # same values, float64 arithmetic throughout
    assert half.weight.dtype == torch.float16
    torch.testing.assert_close(half.weight, ref.weight.half(), rtol=0, atol=0)
    torch.testing.assert_close(half.bias, ref.bias.half(), rtol=0, atol=0)


def test_input_model_is_not_modified():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    fold_model(model)
    assert model.training and model[0].bias is None and isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_norm_without_running_stats_is_left_and_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    result = fold_model(model)
    assert result.folded == [] and "no running statistics" in result.kept[0][1]
    assert isinstance(result.model[1], nn.BatchNorm2d)


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.gate = Branchy()

    def forward(self, x):
        return self.gate(self.bn(self.conv(x)))


def test_untraceable_model_names_the_module():
    with pytest.raises(TraceError) as info:
        fold_model(Untraceable())
    assert info.value.module == "gate" and "'gate'" in str(info.value)
