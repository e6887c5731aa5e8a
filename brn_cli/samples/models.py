"""Small architectures with plain nn.BatchNorm layers: "the user's existing model" for demos and tests.

Each factory is usable as an arch spec ``brn_cli.samples.models:NAME`` (``brn_cli.storage.checkpoint.build_arch``)
and takes keyword arguments ``num_classes``, ``in_channels`` and ``width``. Every model maps a batch of
images ``[N, in_channels, H, W]`` (28 x 28 for the bundled MNIST digits) to logits ``[N, num_classes]``, so
all of them train with the same cross-entropy loop. All are torch.fx-traceable: ``forward`` has no
data-dependent Python control flow, so ``brn_cli.deploy.graph.find_fold_sites`` can read their data flow.

Together they cover the layer pairs that conversion and folding must handle:

* ``small_resnet``: Conv -> BN (bias-free convs), residual adds, a 1x1 projection shortcut with its own BN;
* ``plain_cnn``: three Conv -> BN -> ReLU layers with max pooling between, nothing else (no shortcut);
* ``separable_cnn``: depthwise Conv (groups = channels) -> BN and pointwise 1x1 Conv -> BN;
* ``encoder_decoder``: strided Conv encoder, ConvTranspose decoder -> BN, one of them grouped (groups > 1,
  where PyTorch's own fuse helper is wrong) and with a bias;
* ``mlp``: Linear -> BatchNorm1d over the Linear's output features.

``small_unet`` is the dense-prediction sample: a fully convolutional UNet mapping ``[N, C, H, W]`` to per-pixel
class scores ``[N, num_classes, H, W]`` (H and W divisible by 4). It is listed in ``DENSE_ARCHS``, not in
``SAMPLE_ARCHS`` (the classifiers); ``ALL_ARCHS`` holds both, the samples brn builds from a recorded spec.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ALL_ARCHS",
    "DENSE_ARCHS",
    "SAMPLE_ARCHS",
    "encoder_decoder",
    "mlp",
    "plain_cnn",
    "separable_cnn",
    "small_resnet",
    "small_unet",
]


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # bias=False: BN's beta makes a conv bias redundant (the usual layout of real CNNs).
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)).

    The shortcut is the identity, or a strided 1x1 conv + BN when the shape changes (ResNet option B).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Strided stem (conv-BN-ReLU) then three residual stages (width, 2*width, 4*width; the last two stride 2).

    At 28 x 28 input the stages see 14, 7 and 4 pixels (the stem halves the resolution so a training step
    on 32 digits costs a few milliseconds on a CPU); global average pooling and a linear classifier follow.
    With width=16 it has about 78 k parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, width, stride=2)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """A ResNet-style CNN with BatchNorm2d after every conv (including the projection shortcuts)."""
    return SmallResNet(num_classes=num_classes, in_channels=in_channels, width=width)


def plain_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """Three Conv -> BN -> ReLU layers (width, 2*width, 4*width; 2x2 max pooling after the first two), global
    average pooling and a linear classifier: a plain BatchNorm CNN without shortcuts (about 25 k parameters
    at width 16)."""
    return nn.Sequential(
        _conv_bn_relu(in_channels, width),
        nn.MaxPool2d(2),
        _conv_bn_relu(width, 2 * width),
        nn.MaxPool2d(2),
        _conv_bn_relu(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(4 * width, num_classes),
    )


class SeparableBlock(nn.Module):
    """Depthwise 3x3 conv (groups = channels) -> BN -> ReLU, then pointwise 1x1 conv -> BN -> ReLU.

    As in MobileNet v1: the depthwise conv filters each channel on its own, the pointwise conv mixes them.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = _conv_bn_relu(cin, cin, 3, stride=stride, groups=cin)
        self.pointwise = _conv_bn_relu(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def separable_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """A depthwise-separable CNN: full conv stem, then separable blocks at 28, 14 and 7 pixels."""
    return nn.Sequential(
        _conv_bn_relu(in_channels, width),
        SeparableBlock(width, 2 * width),
        SeparableBlock(2 * width, 2 * width, stride=2),
        SeparableBlock(2 * width, 4 * width),
        SeparableBlock(4 * width, 4 * width, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(4 * width, num_classes),
    )


class EncoderDecoder(nn.Module):
    """Conv encoder (28 -> 14 -> 7 pixels), ConvTranspose decoder (7 -> 14 -> 28), classification head.

    The first decoder layer is a grouped ConvTranspose2d (groups=2) with a bias, each followed by a
    BatchNorm2d: the case whose fold needs the weight viewed as [groups, Cin/g, Cout/g, k, k] (GUIDE §4).
    Output: logits [N, num_classes] from the decoded 28 x 28 feature map (global average pool + linear),
    so it trains with the same cross-entropy loss as the other samples.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            _conv_bn_relu(in_channels, width, stride=2),
            _conv_bn_relu(width, 2 * width, stride=2),
        )
        # kernel 4, stride 2, padding 1 doubles the spatial size exactly (7 -> 14 -> 28).
        self.up1 = nn.ConvTranspose2d(2 * width, 2 * width, 4, stride=2, padding=1, groups=2, bias=True)
        self.bn_up1 = nn.BatchNorm2d(2 * width)
        self.up2 = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False)
        self.bn_up2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        z = self.relu(self.bn_up1(self.up1(z)))
        z = self.relu(self.bn_up2(self.up2(z)))
        return self.head(torch.flatten(self.pool(z), 1))


def encoder_decoder(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """An encoder-decoder with ConvTranspose2d + BatchNorm2d (one grouped), returning class logits."""
    return EncoderDecoder(num_classes=num_classes, in_channels=in_channels, width=width)


def mlp(num_classes: int = 10, in_channels: int = 1, width: int = 128, image_size: int = 28) -> nn.Module:
    """Flatten, (Linear -> BatchNorm1d -> ReLU) x 2, Linear; expects images of `image_size` pixels square."""
    in_features = in_channels * image_size * image_size
    return nn.Sequential(
        nn.Flatten(1),
        nn.Linear(in_features, width),
        nn.BatchNorm1d(width),
        nn.ReLU(inplace=True),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(inplace=True),
        nn.Linear(width, num_classes),
    )


SAMPLE_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "small_resnet": small_resnet,
    "plain_cnn": plain_cnn,
    "separable_cnn": separable_cnn,
    "encoder_decoder": encoder_decoder,
    "mlp": mlp,
}
"""Name -> factory; the arch spec for name N is ``brn_cli.samples.models:N``."""


class SmallUNet(nn.Module):
    """A two-level UNet: (conv-BN-ReLU) x 2 at H, H/2 and H/4, ConvTranspose2d -> BN up-sampling, skip
    connections by concatenation, a 1x1 conv head. Fully convolutional: any H and W divisible by 4
    (the down-sampling factor). Output: per-pixel class scores [N, num_classes, H, W]. With width=16 it
    has about 106 k parameters; every BatchNorm follows a conv or a transposed conv (all foldable)."""

    def __init__(self, num_classes: int = 11, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_conv_bn_relu(in_channels, w), _conv_bn_relu(w, w))
        self.enc2 = nn.Sequential(_conv_bn_relu(w, 2 * w, stride=2), _conv_bn_relu(2 * w, 2 * w))
        self.bottom = nn.Sequential(_conv_bn_relu(2 * w, 4 * w, stride=2), _conv_bn_relu(4 * w, 4 * w))
        self.up2 = _up_bn_relu(4 * w, 2 * w)
        self.dec2 = _conv_bn_relu(4 * w, 2 * w)
        self.up1 = _up_bn_relu(2 * w, w)
        self.dec1 = _conv_bn_relu(2 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(s1)
        z = self.bottom(s2)
        z = self.dec2(torch.cat([self.up2(z), s2], 1))
        z = self.dec1(torch.cat([self.up1(z), s1], 1))
        return self.head(z)


def _up_bn_relu(cin: int, cout: int) -> nn.Sequential:
    # kernel 2, stride 2: exactly doubles H and W, so the skip connections line up at every size divisible by 4.
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def small_unet(num_classes: int = 11, in_channels: int = 1, width: int = 16) -> nn.Module:
    """A small UNet with BatchNorm2d after every conv: [N, C, H, W] -> [N, num_classes, H, W] (H, W % 4 == 0)."""
    return SmallUNet(num_classes=num_classes, in_channels=in_channels, width=width)


DENSE_ARCHS: dict[str, Callable[..., nn.Module]] = {"small_unet": small_unet}
"""Name -> factory of the dense-prediction samples (per-pixel class scores)."""

ALL_ARCHS: dict[str, Callable[..., nn.Module]] = {**SAMPLE_ARCHS, **DENSE_ARCHS}
"""Every sample brn builds from an arch spec ``brn_cli.samples.models:NAME``, classifiers and dense ones."""
