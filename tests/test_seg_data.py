"""Segmentation data: masks from .npz, folders and callables; nearest-neighbour geometry; paired augmentation;
the digits segmentation set; the small UNet sample."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from brn_cli.data.augment import augment_image, example_seed
from brn_cli.data.datasets import load_data
from brn_cli.data.masks import augment_pair, dominant_labels, read_mask_file, resize_mask
from brn_cli.data.samplers import LabelBatchSampler, make_loader
from brn_cli.errors import BrnError
from brn_cli.samples.segmentation import DIGIT_SEG_CLASSES, digit_masks, digits_segmentation_arrays

pytestmark = pytest.mark.usefixtures("one_thread")


def _squares(n: int = 12, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images with one bright square each and masks labelling it class 1 + (i % 3), background 0,
    and a 2-pixel ignore (255) border around the square."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, size, size), np.uint8)
    y = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        top, left = rng.integers(2, size - 8, 2)
        y[i, top - 2 : top + 8, left - 2 : left + 8] = 255
        y[i, top : top + 6, left : left + 6] = 1 + i % 3
        x[i, 0, top : top + 6, left : left + 6] = 200
    return x, y


def _save_png(path, array: np.ndarray, mode: str | None = None, palette: bool = False) -> None:
    from PIL import Image

    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    if palette:
        image = image.convert("L").convert("P")  # indices == the gray values
        image.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 11) % 256)])
    image.save(path)


def _seg_folder(root, n: int = 6, size: int = 16, palette: bool = False, split: bool = True):
    x, y = _squares(n, size)
    for s, idx in (("train", range(0, n - 2)), ("val", range(n - 2, n))) if split else (("", range(n)),):
        (root / s / "images").mkdir(parents=True, exist_ok=True)
        (root / s / "masks").mkdir(parents=True, exist_ok=True)
        for i in idx:
            _save_png(root / s / "images" / f"img{i:02d}.png", np.repeat(x[i, 0, :, :, None], 3, axis=2))
            _save_png(root / s / "masks" / f"img{i:02d}.png", y[i], palette=palette)
    return x, y


# ----------------------------------------------------------------------------------------------
# .npz
# ----------------------------------------------------------------------------------------------


def test_npz_masks_load_as_int64_class_maps(tmp_path):
    x, y = _squares(12)
    np.savez(tmp_path / "seg.npz", x_train=x[:9], y_train=y[:9], x_val=x[9:], y_val=y[9:])
    bundle = load_data(tmp_path / "seg.npz", task="segmentation")
    assert bundle.task == "segmentation" and bundle.ignore_index == 255
    assert bundle.num_classes == 4  # values 0..3 besides the ignore value
    xi, mi = bundle.train[4]
    assert (
        xi.dtype == torch.float32 and xi.shape == (1, 16, 16) and float(xi.max()) == pytest.approx(200 / 255)
    )
    assert mi.dtype == torch.int64 and torch.equal(mi, torch.from_numpy(y[4]).long())
    assert bundle.train_labels.tolist() == [1 + i % 3 for i in range(9)]  # dominant non-background class
    assert bundle.val_labels.tolist() == [1 + i % 3 for i in range(9, 12)]
    xb, mb = next(iter(make_loader(bundle.train, LabelBatchSampler(bundle.train_labels, 3, "grouped:3"))))
    assert xb.shape == (3, 1, 16, 16) and mb.shape == (3, 16, 16) and mb.dtype == torch.int64
    assert len(set(dominant_labels(list(mb), 255).tolist())) == 1  # grouped batches: one dominant class


def test_classification_loading_is_unchanged_by_the_task_field(tmp_path):
    x, _ = _squares(12)
    np.savez(tmp_path / "cls.npz", x_train=x, y_train=np.arange(12) % 3)
    bundle = load_data(tmp_path / "cls.npz")
    assert bundle.task == "classification" and bundle.train[0][1] == 0 and isinstance(bundle.train[0][1], int)
    assert load_data(tmp_path / "cls.npz", task="embedding").task == "embedding"
    with pytest.raises(BrnError, match="`task` 'detection'"):
        load_data(tmp_path / "cls.npz", task="detection")
    with pytest.raises(BrnError, match="one class index per example"):  # masks are not labels
        np.savez(tmp_path / "seg.npz", x_train=x, y_train=_squares(12)[1])
        load_data(tmp_path / "seg.npz")


def test_val_split_is_stratified_on_dominant_classes(tmp_path):
    x, y = _squares(30)
    np.savez(tmp_path / "seg.npz", x_train=x, y_train=y)
    bundle = load_data(tmp_path / "seg.npz", task="segmentation", val_split=0.2, seed=3)
    assert len(bundle.train) == 24 and len(bundle.val) == 6
    assert sorted(bundle.val_labels.tolist()) == [1, 1, 2, 2, 3, 3]  # 2 of each class's 10 examples
    again = load_data(tmp_path / "seg.npz", task="segmentation", val_split=0.2, seed=3)
    assert torch.equal(bundle.val.y, again.val.y)
    for i in range(len(bundle.val)):  # each held-out mask travels with its own image
        xi, mi = bundle.val[i]
        assert torch.equal(xi[0] > 0, (mi >= 1) & (mi <= 3))


def test_dominant_label_ignores_background_and_ignore_index():
    masks = torch.tensor([[[0, 0, 0, 2], [2, 3, 255, 255]], [[0, 0, 0, 0], [255, 255, 0, 0]]])
    assert dominant_labels(list(masks), 255).tolist() == [2, 0]
    assert dominant_labels(list(masks), 2).tolist() == [255, 255]  # 255 is a class unless ignored
    assert dominant_labels([torch.tensor([[4, 4, 1, 1, 0, 0, 0]])], 255).tolist() == [1]  # ties: smaller


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("palette", [False, True], ids=["grayscale", "palette"])
def test_folder_masks_read_indices_not_colours(tmp_path, palette):
    x, y = _seg_folder(tmp_path, palette=palette)
    if palette:
        from PIL import Image

        assert Image.open(tmp_path / "train" / "masks" / "img00.png").mode == "P"
    bundle = load_data(tmp_path, task="segmentation", channels=1)
    assert len(bundle.train) == 4 and len(bundle.val) == 2 and bundle.num_classes == 4
    xi, mi = bundle.train[1]
    assert xi.shape == (1, 16, 16) and torch.allclose(xi[0], torch.from_numpy(x[1, 0] / 255.0).float())
    assert torch.equal(mi, torch.from_numpy(y[1]).long())
    assert bundle.train_labels.tolist() == [1, 2, 3, 1] and bundle.val_labels.tolist() == [2, 3]


def test_single_images_masks_pair_with_val_split(tmp_path):
    _seg_folder(tmp_path, n=9, split=False)
    bundle = load_data(tmp_path, task="segmentation", val_split=1 / 3)
    assert len(bundle.train) == 6 and len(bundle.val) == 3 and bundle.sample_shape == (3, 16, 16)
    assert sorted(bundle.val_labels.tolist()) == [1, 2, 3]
    assert bundle.val[0][1].shape == (16, 16)


def test_resize_and_crop_use_nearest_neighbour_on_masks(tmp_path):
    _seg_folder(tmp_path, size=20)
    bundle = load_data(tmp_path, task="segmentation", image_size=12, resize_size=14)
    x0, m0 = bundle.train[0]
    assert x0.shape == (3, 12, 12) and m0.shape == (12, 12)
    for i in range(len(bundle.train)):
        values = set(bundle.train[i][1].unique().tolist())
        original = set(read_mask_file(bundle.train.samples[i][1]).unique().tolist())
        assert values <= original  # no value appears that was not in the mask
    # images bilinear (in-between grays appear), masks not
    assert len(torch.unique(x0)) > 2
    mask = torch.tensor([[0, 5], [7, 255]])
    big = resize_mask(mask, (7, 9))
    assert set(big.unique().tolist()) == {0, 5, 7, 255} and big.shape == (7, 9)
    assert big[0, 0] == 0 and big[-1, -1] == 255


def test_folder_of_mixed_sizes_takes_the_first_pair_size(tmp_path):
    _seg_folder(tmp_path)
    from PIL import Image

    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "val" / "images" / "big.png")
    Image.fromarray(np.full((24, 24), 2, np.uint8)).save(tmp_path / "val" / "masks" / "big.png")
    bundle = load_data(tmp_path, task="segmentation")
    shapes = {tuple(bundle.val[i][1].shape) for i in range(len(bundle.val))}
    assert shapes == {(16, 16)} and int(bundle.val[0][1].unique()[0]) == 2


# ----------------------------------------------------------------------------------------------
# Callables
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def seg_module(monkeypatch):
    module = types.ModuleType("brn_test_segdata")
    monkeypatch.setitem(sys.modules, "brn_test_segdata", module)
    return module


def test_callable_spec_yields_image_and_mask(seg_module):
    x, y = _squares(9)
    items = [(torch.from_numpy(x[i]).float() / 255, y[i]) for i in range(9)]
    seg_module.data = lambda: (items[:6], items[6:])
    bundle = load_data("brn_test_segdata:data", task="segmentation", normalize="0.5,0.5")
    xi, mi = bundle.train[2]
    assert mi.dtype == torch.int64 and torch.equal(mi, torch.from_numpy(y[2]).long())
    assert float(xi.min()) == pytest.approx(-1.0)
    assert bundle.train_labels.tolist() == [1, 2, 3, 1, 2, 3] and bundle.num_classes == 4


# ----------------------------------------------------------------------------------------------
# Paired augmentation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["flip", "crop-flip"])
def test_augment_moves_image_and_mask_together(tmp_path, mode):
    x, y = _squares(12, size=24)
    np.savez(tmp_path / "seg.npz", x_train=x, y_train=y)
    plain = load_data(tmp_path / "seg.npz", task="segmentation")
    aug = load_data(tmp_path / "seg.npz", task="segmentation", augment=mode, seed=5)
    changed = 0
    for i in range(12):
        xa, ma = aug.train[i]
        x0, m0 = plain.train[i]
        # the image is augmented exactly as alone (same draws as classification's augmentation)
        gen = torch.Generator().manual_seed(example_seed(5, 0, i))
        assert torch.equal(xa, augment_image(x0, mode, gen))
        assert set(ma.unique().tolist()) <= set(m0.unique().tolist())
        ink = xa[0] > 0.5  # pixels well inside the square: labelled with the square's class
        assert bool((ma[ink] == 1 + i % 3).all())
        if mode == "flip":
            assert torch.equal(ma, m0) or torch.equal(ma, m0.flip(-1))
            assert torch.equal(ma, m0.flip(-1)) == torch.equal(xa, x0.flip(-1)) or torch.equal(
                m0, m0.flip(-1)
            )
        changed += not torch.equal(ma, m0)
        xb, mb = aug.train[i]  # deterministic per (seed, epoch, index)
        assert torch.equal(xa, xb) and torch.equal(ma, mb)
    assert changed >= 3
    aug.train.set_epoch(1)
    assert any(
        not torch.equal(
            aug.train[i][1],
            load_data(tmp_path / "seg.npz", task="segmentation", augment=mode, seed=5).train[i][1],
        )
        for i in range(12)
    )


def test_augment_pair_flip_agrees():
    x = torch.arange(12.0).reshape(1, 3, 4)
    mask = torch.arange(12).reshape(3, 4)
    for seed in range(8):
        xa, ma = augment_pair(x, mask, "flip", torch.Generator().manual_seed(seed))
        assert torch.equal(xa[0].long(), ma)  # image and mask still line up pixel for pixel


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the file
# ----------------------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    text = str(exc.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text
    return text


def test_npz_mask_size_differs_from_image(tmp_path):
    x, y = _squares(6)
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=y[:, :15, :])
    with pytest.raises(BrnError) as exc:
        load_data(tmp_path / "bad.npz", task="segmentation")
    _one_line(exc, str(tmp_path / "bad.npz"), "y_train masks are 15x16", "images are 16x16")


@pytest.mark.parametrize(
    ("masks", "needle"),
    [
        (lambda y: y.astype(np.float32) + 0.5, "integer class indices, got 0.5"),
        (lambda y: y.astype(np.int16) - 1, "mask value -1 is negative"),
        (lambda y: y.astype(str), "integer class indices, got <U"),
    ],
    ids=["fractional", "negative", "strings"],
)
def test_npz_non_integer_or_negative_masks(tmp_path, masks, needle):
    x, y = _squares(6)
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=masks(y))
    with pytest.raises(BrnError) as exc:
        load_data(tmp_path / "bad.npz", task="segmentation")
    _one_line(exc, f"{tmp_path / 'bad.npz'}: y_train", needle)


def test_folder_mask_size_differs_from_image(tmp_path):
    _seg_folder(tmp_path)
    from PIL import Image

    bad = tmp_path / "val" / "masks" / "img05.png"
    Image.fromarray(np.zeros((16, 15), np.uint8)).save(bad)
    with pytest.raises(BrnError) as exc:
        load_data(tmp_path, task="segmentation")
    _one_line(exc, str(bad), "the mask is 16x15 but its image is 16x16")


def test_folder_unpaired_files_name_the_first_missing_one(tmp_path):
    _seg_folder(tmp_path)
    (tmp_path / "train" / "masks" / "img01.png").unlink()
    (tmp_path / "train" / "masks" / "img02.png").unlink()
    with pytest.raises(BrnError) as exc:
        load_data(tmp_path, task="segmentation")
    _one_line(
        exc, str(tmp_path / "train" / "images" / "img01.png"), "no mask named img01.*", "2 images have none"
    )
    (tmp_path / "train" / "images" / "img01.png").unlink()
    (tmp_path / "train" / "images" / "img02.png").unlink()
    _save_png(tmp_path / "val" / "masks" / "zz.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(BrnError) as exc:
        load_data(tmp_path, task="segmentation")
    _one_line(exc, str(tmp_path / "val" / "masks" / "zz.png"), "no image named zz.*")


def test_folder_colour_negative_and_missing_layout(tmp_path):
    _seg_folder(tmp_path)
    rgb = tmp_path / "train" / "masks" / "img00.png"
    _save_png(rgb, np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(BrnError) as exc:
        load_data(tmp_path, task="segmentation")
    _one_line(exc, str(rgb), "grayscale or palette", "mode RGB")
    from PIL import Image

    rgb.unlink()  # PNG has no negative values: a 32-bit integer TIFF does
    Image.fromarray(np.full((16, 16), -3, np.int32)).save(rgb.with_suffix(".tif"))
    with pytest.raises(BrnError) as exc:
        load_data(tmp_path, task="segmentation")
    _one_line(exc, str(rgb.with_suffix(".tif")), "mask value -3 is negative")
    with pytest.raises(BrnError) as exc:
        load_data(tmp_path / "train" / "images", task="segmentation")
    _one_line(exc, "needs images/")


def test_callable_bad_masks_name_the_spec_and_example(seg_module):
    x, y = _squares(4)
    good = [(torch.from_numpy(x[i]).float(), y[i]) for i in range(4)]
    seg_module.short = lambda: (good[:3] + [(good[3][0], y[3][:, :10])], None)
    seg_module.negative = lambda: (good[:2] + [(good[2][0], -torch.ones(16, 16, dtype=torch.long))], None)
    with pytest.raises(BrnError) as exc:
        load_data("brn_test_segdata:short", task="segmentation")
    _one_line(exc, "brn_test_segdata:short: training set, example 3", "mask is 16x10 but its image is 16x16")
    with pytest.raises(BrnError) as exc:
        load_data("brn_test_segdata:negative", task="segmentation")
    _one_line(exc, "example 2", "negative")


def test_all_ignored_masks_are_refused(tmp_path):
    x, y = _squares(4)
    np.savez(tmp_path / "void.npz", x_train=x, y_train=np.full_like(y, 255))
    with pytest.raises(BrnError) as exc:
        load_data(tmp_path / "void.npz", task="segmentation")
    _one_line(exc, "void.npz", "every mask pixel is the ignore index 255")


# ----------------------------------------------------------------------------------------------
# The digits segmentation set and the UNet sample
# ----------------------------------------------------------------------------------------------


def test_digit_masks_definition():
    images = np.array([[[0, 127, 128, 255]], [[200, 0, 90, 129]]], np.uint8)[:, None]  # [2, 1, 1, 4]
    masks = digit_masks(images, np.array([3, 9]))
    assert masks.tolist() == [[[0, 0, 4, 4]], [[10, 0, 0, 10]]]  # ink (> 0.5 after /255) -> digit + 1


def test_digits_segmentation_set(tmp_path):
    arrays = digits_segmentation_arrays()
    assert arrays["y_train"].shape == (4000, 28, 28) and arrays["y_val"].shape == (1000, 28, 28)
    with np.load(digits_segmentation_arrays.__globals__["SAMPLE_DATA"]) as digits:
        labels = digits["y_train"]
        assert np.array_equal(arrays["x_train"], digits["x_train"])
    ink = arrays["x_train"][:, 0] > 127
    assert np.array_equal(arrays["y_train"] > 0, ink)
    assert np.array_equal(arrays["y_train"].max(axis=(1, 2)), labels + 1)  # one digit class per mask
    assert np.array_equal(digits_segmentation_arrays()["y_val"], arrays["y_val"])  # deterministic
    np.savez(tmp_path / "digits-seg.npz", **arrays)
    bundle = load_data(tmp_path / "digits-seg.npz", task="segmentation")
    assert bundle.num_classes == DIGIT_SEG_CLASSES
    assert torch.equal(bundle.train_labels, torch.from_numpy(labels + 1))  # grouped batches = one digit


@pytest.mark.parametrize("size", [28, 64])
def test_small_unet_is_fully_convolutional(size):
    from brn_cli.storage.checkpoint import build_arch, is_known_builder

    assert is_known_builder("brn_cli.samples.models:small_unet")
    model = build_arch("brn_cli.samples.models:small_unet", {"width": 8}, recorded_in="ckpt.pt")
    out = model(torch.randn(2, 1, size, size + 8))
    assert out.shape == (2, DIGIT_SEG_CLASSES, size, size + 8)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_small_unet_folds_and_converts():
    import copy

    from brn_cli import convert_batchnorm
    from brn_cli.deploy.graph import find_fold_sites
    from brn_cli.samples.models import small_unet

    model = small_unet(width=8)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 28, 28))
    model.eval()
    sites = find_fold_sites(model, [torch.randn(2, 1, 28, 28)])
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(sites) == n_bn and all(s.producer is not None for s in sites)
    converted = convert_batchnorm(copy.deepcopy(model)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# `brn sample-data --task segmentation` and `brn demo --task segmentation`
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sample_data_writes_the_digits_segmentation_set(run_cli, tmp_path):
    res = run_cli("sample-data", "--task", "segmentation", "-o", tmp_path)
    assert res.code == 0, res.err
    written = tmp_path / "digits-seg.npz"
    with np.load(written) as arrays:
        expected = digits_segmentation_arrays()
        assert sorted(arrays.files) == ["x_train", "x_val", "y_train", "y_val"]
        assert all(np.array_equal(arrays[k], expected[k]) for k in expected)
    before = written.read_bytes()
    res = run_cli("sample-data", "--task", "segmentation", "-o", written)
    assert res.code == 2 and len(res.err_lines) == 1 and "--force" in res.err
    assert written.read_bytes() == before
    assert run_cli("sample-data", "--task", "depth", "-o", tmp_path / "d.npz").code == 2


@pytest.mark.slow
def test_segmentation_demo_runs_both_methods(run_cli, tmp_path):
    import json

    res = run_cli(
        "demo",
        "--task",
        "segmentation",
        "--quick",
        "--steps",
        "4",
        "--pretrain-steps",
        "4",
        "--device",
        "cpu",
        "-o",
        tmp_path / "demo",
        "--json",
    )
    assert res.code == 0, res.err
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["runs"]) == {"batchnorm", "renorm"}
    assert summary["config"]["batch_size"] == 2 and summary["convert"]["layers"] == 10
    for run in summary["runs"].values():
        assert run["steps"] == 4
        assert 0.0 <= run["inference_mean_iou"] <= 1.0 and 0.0 <= run["batch_stats_mean_iou"] <= 1.0
    assert (
        summary["runs"]["batchnorm"]["schedule"] == "off"
        and summary["runs"]["renorm"]["schedule"] == "paper-scaled"
    )
    assert (tmp_path / "demo" / "digits-seg.npz").is_file()
