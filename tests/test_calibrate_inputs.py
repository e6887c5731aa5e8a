"""`brn calibrate` reads inputs only: whatever the targets hold (masks, no targets at all, labels out of any
model's range, anything a callable yields), the statistics equal those of `brn_cli.calibrate` on the same x."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import brn_cli
from brn_cli.storage.checkpoint import load_checkpoint

ARCH = "tests.test_calibrate_inputs:seg_net"
N, SIZE, BATCH = 32, 8, 8


def seg_net() -> nn.Module:
    """A dense-prediction toy: [N, 1, H, W] -> [N, 3, H, W]; two norm layers, the second downstream."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 3, 1),
    )


def _pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE), dtype=np.uint8)


def _expected(pixels: np.ndarray) -> nn.Module:
    """The library's calibration of seg_net on exactly these inputs (integer pixels read as /255)."""
    model = seg_net()
    x = torch.from_numpy(pixels).float().div(255).unsqueeze(1)
    brn_cli.calibrate(model, [x[i : i + BATCH] for i in range(0, N, BATCH)])
    return model


def _calibrate_cli(run_cli, tmp_path, data, *extra):
    src, out = tmp_path / "m.pt", tmp_path / "cal.pt"
    torch.save(seg_net().state_dict(), src)  # a bare state dict: the checkpoint records no task
    args = ["--arch", ARCH, "--batches", N // BATCH, "--batch-size", BATCH, "--device", "cpu", *extra]
    result = run_cli("calibrate", src, "--data", data, "-o", out, *args)
    assert result.code == 0, result.err
    return load_checkpoint(out, arch=ARCH).model


def _assert_same_statistics(got: nn.Module, want: nn.Module) -> None:
    for index in (1, 4):
        assert not torch.equal(want[index].running_var, torch.ones(4))  # calibration did move them
        assert torch.allclose(got[index].running_mean, want[index].running_mean, atol=1e-6, rtol=1e-5)
        assert torch.allclose(got[index].running_var, want[index].running_var, atol=1e-6, rtol=1e-5)


def test_segmentation_masks_without_task(tmp_path, run_cli):
    """Masks [N, H, W] in y_train were refused as 'labels must be one class index per example'."""
    pixels = _pixels()
    masks = np.random.default_rng(1).integers(0, 3, (N, SIZE, SIZE))
    data = tmp_path / "seg.npz"
    np.savez(data, x_train=pixels, y_train=masks)
    _assert_same_statistics(_calibrate_cli(run_cli, tmp_path, data), _expected(pixels))


def test_inputs_without_targets(tmp_path, run_cli):
    """An .npz of x_train alone was refused for its missing y_train."""
    pixels = _pixels()
    data = tmp_path / "x.npz"
    np.savez(data, x_train=pixels)
    _assert_same_statistics(_calibrate_cli(run_cli, tmp_path, data), _expected(pixels))


def test_labels_out_of_range(tmp_path, run_cli):
    """Negative labels (an 'unlabelled' marker) and validation labels beyond the training ones were refused;
    calibrate never uses them."""
    pixels = _pixels()
    data = tmp_path / "odd.npz"
    labels = np.full(N, -1)
    np.savez(data, x_train=pixels, y_train=labels, x_val=pixels[:4], y_val=np.array([7, 2**30, 0, 1]))
    _assert_same_statistics(_calibrate_cli(run_cli, tmp_path, data), _expected(pixels))


class _AnyTargets(Dataset):
    """Items (x, target) whose targets are no class index: a dict of strings."""

    def __init__(self) -> None:
        self.x = torch.from_numpy(_pixels()).float().div(255).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], {"caption": f"example {index}"}


def any_targets():
    return _AnyTargets(), None


def test_callable_with_any_targets(tmp_path, run_cli):
    """A callable's datasets whose targets are not labels were refused on their labels."""
    got = _calibrate_cli(run_cli, tmp_path, "tests.test_calibrate_inputs:any_targets")
    _assert_same_statistics(got, _expected(_pixels()))


def test_segmentation_folder_reads_its_images_alone(tmp_path, run_cli):
    """A folder of images/ and masks/ was refused without `--task segmentation` (not an ImageFolder), and with
    it every mask had to pair up; now its masks (one missing here) are never read, and the images take the
    model's one channel."""
    from test_seg_data import _seg_folder

    x, _ = _seg_folder(tmp_path / "seg", n=N, split=False)
    (tmp_path / "seg" / "masks" / "img03.png").unlink()
    got = _calibrate_cli(run_cli, tmp_path, tmp_path / "seg")
    _assert_same_statistics(got, _expected(x[:, 0]))


def test_load_data_inputs_only_splits_and_refuses_augmenting(tmp_path):
    from brn_cli.data.datasets import load_data
    from brn_cli.errors import BrnError

    np.savez(tmp_path / "x.npz", x_train=_pixels(), y_train=np.full((N, 3), "label"))  # y is never read
    bundle = load_data(tmp_path / "x.npz", val_split=0.25, seed=1, inputs_only=True)
    assert (len(bundle.train), len(bundle.val)) == (24, 8) and bundle.sample_shape == (1, SIZE, SIZE)
    assert bundle.train_labels.tolist() == [0] * 24 and bundle.val_labels.tolist() == [0] * 8
    seen = {tuple(bundle.train[i][0].flatten().tolist()) for i in range(24)}
    seen |= {tuple(bundle.val[i][0].flatten().tolist()) for i in range(8)}
    assert len(seen) == N  # a partition of the examples
    with pytest.raises(BrnError, match="`augment`"):
        load_data(tmp_path / "x.npz", augment="flip", inputs_only=True)
