"""Data loading and batch composition (the paper's section 4.3 samplers)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from brn_cli.data import (
    LabelBatchSampler,
    eval_loader,
    load_data,
    make_loader,
    parse_sampler,
    set_microbatch,
)
from brn_cli.errors import BrnError
from brn_cli.layer import BatchRenorm2d
from brn_cli.samples import SAMPLE_DATA


def test_sample_data_loads_fast_and_scaled():
    start = time.perf_counter()
    bundle = load_data(SAMPLE_DATA, normalize="0.1307,0.3081")
    assert time.perf_counter() - start < 5.0  # generous: shared CPU; typically ~0.1 s
    assert len(bundle.train) == 4000 and len(bundle.val) == 1000
    assert bundle.num_classes == 10 and bundle.sample_shape == (1, 28, 28)
    assert torch.equal(bundle.train_labels.bincount(), torch.full((10,), 400))
    raw = np.load(SAMPLE_DATA)
    x0, y0 = bundle.train[0]
    expected = (torch.from_numpy(raw["x_train"][0]).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x0, expected) and y0 == int(raw["y_train"][0])


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_nhwc_flat_and_stratified_val_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 6, 5, 3), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    bundle = load_data(_npz(tmp_path, x_train=x, y_train=y), val_split=0.2, seed=3)
    assert bundle.sample_shape == (3, 6, 5)
    assert torch.equal(bundle.val_labels.bincount(), torch.full((4,), 2))  # stratified: 2 of each class
    assert len(bundle.train) == 32
    xs = torch.stack(
        [bundle.train[i][0] for i in range(len(bundle.train))] + [bundle.val[i][0] for i in range(8)]
    )
    want = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    # Every example appears once in train + val, transposed to NCHW.
    assert sorted(map(float, xs.sum((1, 2, 3)))) == pytest.approx(sorted(map(float, want.sum((1, 2, 3)))))
    flat = load_data(
        _npz(
            tmp_path, "f.npz", x_train=rng.normal(size=(10, 7)).astype(np.float32), y_train=np.arange(10) % 2
        )
    )
    assert flat.sample_shape == (7,) and flat.val is None and flat.num_classes == 2


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x_train": np.zeros((5, 3), np.float32), "y_train": np.zeros(4, np.int64)},
            "5 examples but y_train has 4",
        ),
        ({"x_train": np.zeros((4, 3), np.float32), "y_train": np.array([0, 1, -1, 0])}, "out of range"),
        ({"x_train": np.zeros((0, 3), np.float32), "y_train": np.zeros(0, np.int64)}, "empty"),
        (
            {
                "x_train": np.zeros((4, 3), np.float32),
                "y_train": np.array([0, 1, 1, 0]),
                "x_val": np.zeros((2, 3), np.float32),
                "y_val": np.array([0, 5]),
            },
            "validation label 5 out of range",
        ),
        ({"x_train": np.zeros((4, 3), np.float32)}, "no y_train"),
        (
            {"x_train": np.zeros((4, 3), np.float32), "y_train": np.array([0.5, 1, 1, 0])},
            "whole class indices",
        ),
    ],
)
def test_bad_npz(tmp_path, arrays, message):
    with pytest.raises(BrnError, match=message):
        load_data(_npz(tmp_path, **arrays))


def test_bad_specs(tmp_path):
    with pytest.raises(BrnError, match="no such file"):
        load_data(tmp_path / "missing.npz")
    with pytest.raises(BrnError, match="cannot import"):
        load_data("no_such_pkg_xyz.mod:make")
    with pytest.raises(BrnError, match="stds positive"):
        load_data(SAMPLE_DATA, normalize="0.1,0")
    with pytest.raises(BrnError, match="3 channel values but x_train has 1"):
        load_data(SAMPLE_DATA, normalize="0.1,0.2,0.3,1,1,1")
    with pytest.raises(BrnError, match="val-split"):
        load_data(SAMPLE_DATA, val_split=1.5)


def test_callable_spec(tmp_path, monkeypatch):
    (tmp_path / "b1_toy_data.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def make():\n"
        "    x = torch.arange(24.).view(12, 2)\n"
        "    y = torch.arange(12) % 3\n"
        "    return TensorDataset(x, y), None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    bundle = load_data("b1_toy_data:make", val_split=0.25, normalize="1,2")
    assert bundle.num_classes == 3 and len(bundle.train) == 9 and len(bundle.val) == 3
    x, y = bundle.val[0]
    assert x.shape == (2,) and isinstance(y, int)
    assert torch.equal(bundle.val_labels.bincount(), torch.ones(3, dtype=torch.long))


def test_parse_sampler():
    assert parse_sampler("IID") == "iid" and parse_sampler("grouped:4") == "grouped:4"
    for bad in ("grouped", "grouped:0", "grouped:x", "random"):
        with pytest.raises(BrnError):
            parse_sampler(bad)


def test_iid_sampler_is_a_seeded_permutation():
    labels = torch.arange(100) % 10
    s = LabelBatchSampler(labels, 10, "iid", seed=1)
    batches = list(s)
    assert len(batches) == 10 and sorted(i for b in batches for i in b) == list(range(100))
    assert batches == list(s)  # deterministic for a given epoch
    s.set_epoch(1)
    assert list(s) != batches


def test_grouped_sampler_composition():
    labels = torch.arange(120) % 6  # 6 classes x 20
    s = LabelBatchSampler(labels, 12, "grouped:3", seed=2)
    assert len(s) == 10
    for batch in s:
        assert len(batch) == 12 and len(set(batch)) == 12
        groups = labels[torch.tensor(batch)].view(4, 3)  # 12/3 labels x 3 examples, contiguous
        assert bool((groups == groups[:, :1]).all())
        assert len(set(groups[:, 0].tolist())) == 4  # distinct labels


@pytest.mark.parametrize("mode", ["iid", "grouped:2"])
def test_distributed_slices_partition_the_global_batch(mode):
    labels = torch.arange(96) % 8
    world = 3
    glob = list(LabelBatchSampler(labels, 12, mode, seed=5))
    per_rank = [
        list(LabelBatchSampler(labels, 4, mode, seed=5, num_replicas=world, rank=r)) for r in range(world)
    ]
    assert all(len(p) == len(glob) for p in per_rank)
    for step, batch in enumerate(glob):
        assert sum((per_rank[r][step] for r in range(world)), []) == batch


def test_sampler_bad_input():
    labels = torch.tensor([0] * 10 + [1] * 2)
    with pytest.raises(BrnError, match="batch larger than the data"):
        LabelBatchSampler(labels, 20)
    with pytest.raises(BrnError, match="class 1 has only 2 examples, fewer than K=3"):
        LabelBatchSampler(labels, 6, "grouped:3")
    with pytest.raises(BrnError, match="not a multiple of K"):
        LabelBatchSampler(labels, 5, "grouped:2")
    with pytest.raises(BrnError, match="distinct labels"):
        LabelBatchSampler(labels, 6, "grouped:2")  # 3 labels needed, 2 exist
    with pytest.raises(BrnError, match="empty"):
        LabelBatchSampler(torch.zeros(0, dtype=torch.long), 1)


def test_loaders_give_batched_tensors():
    bundle = load_data(SAMPLE_DATA)
    loader = make_loader(bundle.train, LabelBatchSampler(bundle.train_labels, 32, "grouped:4", seed=0))
    x, y = next(iter(loader))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    sizes = [len(y) for _, y in eval_loader(bundle.val, 300)]
    assert sizes == [300, 300, 300, 100]


def test_set_microbatch():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), BatchRenorm2d(2), nn.Conv2d(2, 2, 1), BatchRenorm2d(2))
    assert set_microbatch(model, 4) == 2
    assert [m.microbatch for m in model if isinstance(m, BatchRenorm2d)] == [4, 4]
    set_microbatch(model, None)
    assert model[1].microbatch is None
    with pytest.raises(BrnError):
        set_microbatch(model, 0)


def test_image_folder_with_mixed_sizes_loads_and_batches(tmp_path):
    """An ImageFolder tree of real digits saved as PNGs of different sizes: classes from folder names,
    every image resized to the first one's size so batches stack, normalization applied."""
    from PIL import Image

    from brn_cli.data import make_loader

    digits = np.load(SAMPLE_DATA)
    sizes = [(28, 28), (40, 32), (20, 24)]
    for split, count in (("train", 6), ("val", 2)):
        for label in (3, 7):
            folder = tmp_path / split / f"digit{label}"
            folder.mkdir(parents=True)
            images = digits["x_train"][digits["y_train"] == label][:count]
            for i, img in enumerate(images):
                Image.fromarray(img[0]).resize(sizes[i % 3]).save(folder / f"{i}.png")
    bundle = load_data(str(tmp_path), normalize="0.5,0.25")
    assert bundle.num_classes == 2 and len(bundle.train) == 12 and len(bundle.val) == 4
    assert bundle.train_labels.tolist().count(0) == 6  # digit3 -> class 0, digit7 -> class 1
    first_w, first_h = Image.open(sorted((tmp_path / "train" / "digit3").iterdir())[0]).size
    assert bundle.sample_shape == (3, first_h, first_w)
    loader = make_loader(bundle.train, LabelBatchSampler(bundle.train_labels, 4, "grouped:2", seed=0))
    x, y = next(iter(loader))
    assert x.shape == (4, 3, first_h, first_w) and y.shape == (4,)
    assert float(x.min()) == pytest.approx((0.0 - 0.5) / 0.25, abs=1e-6)  # black pixels, normalized


def test_image_folder_without_train_folder_is_one_clear_error(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(BrnError, match="train/"):
        load_data(str(tmp_path))
