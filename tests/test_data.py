"""Data loading and batch composition (the paper's section 4.3 samplers)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from brn_cli.data.datasets import load_data
from brn_cli.data.samplers import LabelBatchSampler, eval_loader, make_loader, parse_sampler
from brn_cli.errors import BrnError
from brn_cli.nn.layer import BatchRenorm2d
from brn_cli.nn.norms import set_microbatch
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
    with pytest.raises(BrnError, match="`val_split`"):
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

    from brn_cli.data.samplers import make_loader

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


def _write_band_images(root, sizes) -> None:
    """Two classes of RGB images (width x height given): red margins around a green central band."""
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                img = np.zeros((h, w, 3), np.uint8)
                img[..., 0] = 255  # red everywhere ...
                band = slice(w // 6, w - w // 6) if w >= h else slice(h // 6, h - h // 6)
                if w >= h:
                    img[:, band] = (0, 255, 0)  # ... except a green band across the middle of the long side
                else:
                    img[band, :] = (0, 255, 0)
                Image.fromarray(img).save(folder / f"{i}.png")


def test_image_size_resizes_the_shorter_side_and_center_crops(tmp_path):
    """--image-size S: shorter side to round(S/0.875), then the central S x S, as torchvision's presets. The
    crop keeps 0.875 of the shorter side around the centre: all green here, while the whole-image resize
    (no --image-size) keeps the red margins."""
    from brn_cli.data.specs import default_resize_size

    _write_band_images(tmp_path, [(120, 60), (60, 120), (90, 90)])
    assert default_resize_size(224) == 256 and default_resize_size(16) == 18
    bundle = load_data(str(tmp_path), image_size=16)
    assert bundle.sample_shape == (3, 16, 16) and "center-cropped to 16x16" in bundle.description
    for i in range(len(bundle.train)):
        x, _ = bundle.train[i]
        assert x.shape == (3, 16, 16)
        if i % 3 != 2:  # the long images: only the green band survives the crop
            assert float(x[1].min()) > 0.95 and float(x[0].max()) < 0.05, i
    x, _ = bundle.val[0]
    assert x.shape == (3, 16, 16)
    whole = load_data(str(tmp_path))  # resized to 60x120 whole: the red margins remain
    assert float(whole.train[0][0][0].max()) > 0.95
    # An explicit --resize-size equal to the crop keeps the whole shorter side (margins of the long side go).
    tight = load_data(str(tmp_path), image_size=16, resize_size=16)
    assert tight.sample_shape == (3, 16, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 0}, "`image_size` must be >= 1"),
        ({"image_size": 16, "resize_size": 8}, "smaller than `image_size`"),
        ({"resize_size": 20}, "`resize_size` needs `image_size`"),
    ],
)
def test_image_size_bad_values(tmp_path, kwargs, message):
    _write_band_images(tmp_path, [(30, 20)])
    with pytest.raises(BrnError, match=message):
        load_data(str(tmp_path), **kwargs)


def test_image_size_is_for_image_folders_only():
    with pytest.raises(BrnError, match="applies to ImageFolder directories"):
        load_data(str(SAMPLE_DATA), image_size=28)


def tiny_rgb(num_classes: int = 2) -> nn.Module:
    """Conv-BN-ReLU, global pooling, a linear classifier: takes RGB images of any size."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


@pytest.mark.slow
def test_finetune_records_the_image_size_and_evaluate_repeats_it(tmp_path, run_cli):
    _write_band_images(tmp_path / "data", [(48, 24), (24, 48), (30, 30), (36, 30)])
    torch.manual_seed(0)
    torch.save(tiny_rgb().state_dict(), tmp_path / "bn.pt")
    run = tmp_path / "run"
    arch = ["--arch", "test_data:tiny_rgb"]  # recorded in best.pt, but brn runs no arch from a file
    common = ["--data", str(tmp_path / "data"), *arch]
    result = run_cli(
        "finetune", tmp_path / "bn.pt", *common, "-o", run, "--image-size", "12", "--steps", "2",
        "--batch-size", "4", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    saved = torch.load(run / "best.pt", weights_only=True)
    assert saved["preprocessing"] == {"image_size": 12, "resize_size": 14}
    assert saved["input_shape"] == [2, 3, 12, 12]
    result = run_cli("evaluate", run / "best.pt", *common, "--json")
    assert result.code == 0, result.err
    assert "center-cropped to 12, as recorded in best.pt" in result.err
    assert "center-cropped to 12x12" in json.loads(result.out)["data"]
    # Given on the command line, the option wins; on non-folder data it is one clear error.
    result = run_cli("evaluate", run / "best.pt", *common, "--image-size", "20", "--json")
    assert result.code == 0 and "center-cropped to 20x20" in json.loads(result.out)["data"]
    result = run_cli("evaluate", run / "best.pt", "--data", SAMPLE_DATA, *arch, "--image-size", "20")
    assert result.code == 2 and result.err_lines == [
        "brn: error: --image-size applies to ImageFolder directories; prepare mnist_5k.npz at the size the model "
        "needs"
    ]
    # calibrate records the preprocessing its statistics were measured with: recorded, or given instead.
    for extra, expected in (([], 12), (["--image-size", "10"], 10)):
        out = tmp_path / f"cal{expected}.pt"
        result = run_cli("calibrate", run / "best.pt", *common, "-o", out, "--batch-size", "4", *extra)
        assert result.code == 0, result.err
        assert torch.load(out, weights_only=True)["preprocessing"]["image_size"] == expected


def test_augmentation_is_a_pure_function_of_seed_epoch_and_index():
    from brn_cli.data.augment import augment_image, example_seed, random_resized_crop

    seeds = {example_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= v < 2**63 for v in seeds)
    x = torch.rand(3, 20, 24)

    def aug(mode, s, e, i):
        return augment_image(x, mode, torch.Generator().manual_seed(example_seed(s, e, i)))

    flips = [aug("flip", 0, 0, i) for i in range(40)]
    assert all(torch.equal(f, x) or torch.equal(f, x.flip(-1)) for f in flips)
    assert 5 < sum(torch.equal(f, x.flip(-1)) for f in flips) < 35  # about half
    crops = [aug("crop-flip", 0, 0, i) for i in range(20)]
    assert all(c.shape == x.shape for c in crops)
    assert torch.equal(aug("crop-flip", 0, 0, 7), crops[7])  # same (seed, epoch, index): same example
    assert not torch.equal(aug("crop-flip", 0, 1, 7), crops[7])  # next epoch: another draw
    assert sum(not torch.equal(c, x) and not torch.equal(c, x.flip(-1)) for c in crops) >= 15  # cropped
    # Bilinear resampling weights sum to 1: a constant image stays constant (so it commutes with --normalize).
    flat = torch.full((1, 28, 28), 0.3)
    for i in range(10):
        out = random_resized_crop(flat, torch.Generator().manual_seed(i))
        assert torch.allclose(out, flat, atol=1e-6)


def test_augment_touches_training_examples_only(tmp_path):
    from brn_cli.data.augment import AugmentedDataset

    plain = load_data(str(SAMPLE_DATA))
    bundle = load_data(str(SAMPLE_DATA), augment="crop-flip", seed=3)
    assert isinstance(bundle.train, AugmentedDataset) and "augmented (crop-flip)" in bundle.description
    assert torch.equal(bundle.train_labels, plain.train_labels)
    assert torch.equal(bundle.val[5][0], plain.val[5][0])  # validation: untouched
    changed = sum(not torch.equal(bundle.train[i][0], plain.train[i][0]) for i in range(20))
    assert changed >= 15
    bundle.train.set_epoch(1)
    loader = make_loader(bundle.train, LabelBatchSampler(bundle.train_labels, 8, "iid", seed=0))
    x, y = next(iter(loader))
    assert x.shape == (8, 1, 28, 28) and y.shape == (8,)
    # --val-split: the held-out part is not augmented either.
    split_plain = load_data(_flat_free_npz(tmp_path), val_split=0.25)
    split_aug = load_data(_flat_free_npz(tmp_path), val_split=0.25, augment="flip")
    assert all(torch.equal(split_aug.val[i][0], split_plain.val[i][0]) for i in range(len(split_plain.val)))
    with pytest.raises(BrnError, match="`augment` 'rotate'"):
        load_data(str(SAMPLE_DATA), augment="rotate")
    flat = tmp_path / "flat.npz"
    np.savez(flat, x_train=np.random.rand(20, 6).astype(np.float32), y_train=np.arange(20) % 2)
    with pytest.raises(BrnError, match=r"`augment` needs image examples \[C, H, W\]"):
        load_data(str(flat), augment="flip")


def _flat_free_npz(tmp_path) -> str:
    """An image .npz without validation arrays (so --val-split applies)."""
    path = tmp_path / "images.npz"
    if not path.exists():
        digits = np.load(SAMPLE_DATA)
        np.savez(path, x_train=digits["x_train"][:40], y_train=digits["y_train"][:40])
    return str(path)


# ----------------------------------------------------------------------------------------------
# Integer pixels, bad files, channels, and data that does not fit the model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32])
def test_integer_pixels_within_0_255_are_scaled_like_uint8(tmp_path, dtype):
    digits = np.load(SAMPLE_DATA)
    x8, y = digits["x_train"][:20], digits["y_train"][:20]
    x = x8.astype(dtype) if np.iinfo(dtype).max >= 255 else (x8 // 2).astype(dtype)
    ref = load_data(_npz(tmp_path, "u8.npz", x_train=x.astype(np.uint8), y_train=y))
    bundle = load_data(_npz(tmp_path, x_train=x, y_train=y))
    assert float(bundle.train.x.max()) <= 1.0
    assert torch.equal(bundle.train.x, ref.train.x)


@pytest.mark.parametrize(
    ("x", "shown"),
    [
        (np.arange(40 * 4, dtype=np.uint16).reshape(40, 4) * 400, "uint16 values 0..63600"),
        (np.arange(40 * 4, dtype=np.int32).reshape(40, 4) - 3, "int32 values -3..156"),
    ],
)
def test_integer_pixels_beyond_0_255_are_refused_naming_the_file(tmp_path, x, shown):
    path = _npz(tmp_path, "wide.npz", x_train=x, y_train=np.arange(40) % 2)
    with pytest.raises(BrnError) as info:
        load_data(path)
    message = str(info.value)
    assert str(path) in message and "x_train" in message and shown in message and "float32" in message
    assert "\n" not in message


class _Marker:
    """Unpickling this object creates a file: loading must never get that far."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bad_npz_files(tmp_path):
    """(name, writer, expected text) for .npz files broken in every way a user has met."""
    ok = {"x_train": np.zeros((4, 3), np.float32), "y_train": np.array([0, 1, 0, 1])}

    def savez(**arrays):
        return lambda path: np.savez(path, **arrays)

    def truncated(path):
        np.savez(path, **ok)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def single_array(path):
        with open(path, "wb") as fh:
            np.save(fh, np.zeros(3))

    marker = tmp_path / "unpickled-marker"
    return [
        ("empty", lambda path: path.write_bytes(b""), "empty file"),
        ("corrupt", truncated, "not an .npz archive"),
        ("npy", single_array, "a single array"),
        ("text", lambda path: path.write_text("x,y\n1,2\n"), "not an .npz archive"),
        (
            "objects",
            savez(x_train=np.array([_Marker(marker)] * 4, dtype=object), y_train=ok["y_train"]),
            "x_train is an object array",
        ),  # fmt: skip
        ("no-arrays", savez(), "has no x_train or y_train"),
        (
            "lengths",
            savez(x_train=ok["x_train"], y_train=np.array([0, 1, 0])),
            "4 examples but y_train has 3",
        ),
        ("zero", savez(x_train=np.zeros((0, 3), np.float32), y_train=np.zeros(0, np.int64)), "is empty"),
        ("nan", savez(x_train=np.full((4, 3), np.nan, np.float32), y_train=ok["y_train"]), "NaN"),
        ("negative", savez(x_train=ok["x_train"], y_train=np.array([0, -1, 0, 1])), "label -1"),
        ("fractional", savez(x_train=ok["x_train"], y_train=np.array([0, 0.5, 0, 1])), "whole class indices"),
        (
            "huge-label",
            savez(x_train=ok["x_train"], y_train=np.array([0, 2**40, 0, 1])),
            "label 1099511627776",
        ),
        (
            "text-labels",
            savez(x_train=ok["x_train"], y_train=np.array(["a", "b", "a", "b"])),
            "class indices",
        ),
    ], marker


def test_bad_npz_files_are_one_line_naming_the_file(tmp_path):
    cases, marker = _bad_npz_files(tmp_path)
    for name, write, expected in cases:
        path = tmp_path / f"{name}.npz"
        write(path)
        with pytest.raises(BrnError) as info:
            load_data(str(path))
        message = str(info.value)
        assert str(path) in message and expected in message and "\n" not in message, (name, message)
    assert not marker.exists()  # the object array was refused, never unpickled


def test_bad_npz_through_the_cli(tmp_path, run_cli):
    """The same files through `brn evaluate`: one stderr line, exit 2 (an empty file used to print
    'Abort: Abort', a corrupt one 'BadZipFile: ...')."""
    torch.save(tiny_rgb().state_dict(), tmp_path / "m.pt")
    cases, marker = _bad_npz_files(tmp_path)
    for name, write, expected in cases:
        path = tmp_path / f"{name}.npz"
        write(path)
        result = run_cli("evaluate", tmp_path / "m.pt", "--arch", "test_data:tiny_rgb", "--data", path,
                         "--device", "cpu")  # fmt: skip
        assert result.code == 2 and len(result.err_lines) == 1, (name, result.err)
        assert str(path) in result.err and expected in result.err, (name, result.err)
    assert not marker.exists()


def _write_gray_digits(root, count=4, labels=(3, 7)) -> None:
    """Real digits saved as 8-bit grayscale PNGs, train/ and val/, one folder per label."""
    from PIL import Image

    digits = np.load(SAMPLE_DATA)
    for split in ("train", "val"):
        for label in labels:
            folder = root / split / f"digit{label}"
            folder.mkdir(parents=True)
            for i, img in enumerate(digits["x_train"][digits["y_train"] == label][:count]):
                Image.fromarray(img[0]).save(folder / f"{i}.png")


def test_image_folder_channels_option(tmp_path):
    from PIL import Image

    _write_gray_digits(tmp_path)
    first = sorted((tmp_path / "train" / "digit3").iterdir())[0]
    pixels = torch.from_numpy(np.array(Image.open(first))).float() / 255
    gray = load_data(str(tmp_path), channels=1)
    assert gray.sample_shape == (1, 28, 28) and torch.equal(gray.train[0][0][0], pixels)
    rgb = load_data(str(tmp_path), channels=3)
    assert rgb.sample_shape == (3, 28, 28) and all(torch.equal(rgb.train[0][0][c], pixels) for c in range(3))
    with pytest.raises(BrnError, match="`channels` must be 1 or 3, got 2"):
        load_data(str(tmp_path), channels=2)
    with pytest.raises(BrnError, match="`channels` applies to image folders"):
        load_data(str(SAMPLE_DATA), channels=1)
    with pytest.raises(BrnError, match="`normalize` gives 3 channel values but the images have 1"):
        load_data(str(tmp_path), channels=1, normalize="0.1,0.2,0.3,1,1,1")


def tiny_gray(num_classes: int = 2) -> nn.Module:
    """As tiny_rgb, for 1-channel images."""
    model = tiny_rgb(num_classes)
    model[0] = nn.Conv2d(1, 4, 3, padding=1, bias=False)
    return model


def test_fit_data_to_model_takes_the_channels_from_the_models_first_convolution(tmp_path):
    from brn_cli.data.datasets import fit_data_to_model

    _write_gray_digits(tmp_path)
    bundle = load_data(str(tmp_path), normalize="0.5,0.25")
    assert bundle.sample_shape == (3, 28, 28)  # RGB until a model says otherwise
    fit_data_to_model(tiny_gray(), bundle)
    assert bundle.sample_shape == (1, 28, 28) and "x [1, 28, 28]" in bundle.description
    assert bundle.train[0][0].shape == (1, 28, 28) and bundle.val[0][0].shape == (1, 28, 28)
    rgb = load_data(str(tmp_path))
    fit_data_to_model(tiny_rgb(), rgb)
    assert rgb.sample_shape == (3, 28, 28)
    # Given explicitly, --channels stays: a model that cannot take it is one clear line before any run.
    given = load_data(str(tmp_path), channels=3)
    with pytest.raises(BrnError) as info:
        fit_data_to_model(tiny_gray(), given)
    assert str(info.value) == (
        f"{tmp_path}: the examples have 3 channels but the model's first layer (0) takes 1 (pass `channels=1`)"
    )
    # A model without convolutions keeps RGB.
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 2))
    plain = load_data(str(tmp_path))
    fit_data_to_model(mlp, plain)
    assert plain.sample_shape == (3, 28, 28)


def test_fit_data_to_model_refuses_arrays_with_other_channels_and_too_many_classes(tmp_path):
    from brn_cli.data.datasets import fit_data_to_model

    rgb = _npz(tmp_path, "rgb.npz", x_train=np.zeros((20, 3, 8, 8), np.uint8), y_train=np.arange(20) % 10)
    with pytest.raises(BrnError) as info:
        fit_data_to_model(tiny_gray(10), load_data(rgb))
    assert str(info.value) == f"{rgb}: the examples have 3 channels but the model's first layer (0) takes 1"
    with pytest.raises(BrnError) as info:
        fit_data_to_model(tiny_rgb(5), load_data(rgb))
    assert str(info.value) == f"{rgb}: the data has 10 classes (labels 0..9) but the model has 5 outputs"
    fit_data_to_model(tiny_rgb(5), load_data(rgb), labels=False)  # calibrate: labels unused
    fit_data_to_model(tiny_rgb(12), load_data(rgb))  # more outputs than classes: fine
    flat = _npz(tmp_path, "flat.npz", x_train=np.zeros((4, 6), np.float32), y_train=np.arange(4) % 2)
    with pytest.raises(BrnError) as info:
        fit_data_to_model(nn.Sequential(nn.Linear(5, 2)), load_data(flat))
    assert str(info.value) == f"{flat}: the examples have 6 features but the model's first layer (0) takes 5"


def test_a_broken_image_names_its_file_also_from_worker_processes(tmp_path):
    _write_gray_digits(tmp_path)
    broken = sorted((tmp_path / "train" / "digit7").iterdir())[1]
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # PIL: "image file is truncated"
    bundle = load_data(str(tmp_path), channels=1)
    for workers in (0, 2):
        loader = make_loader(
            bundle.train, LabelBatchSampler(bundle.train_labels, 8, "iid", seed=0), num_workers=workers
        )
        with pytest.raises(BrnError) as info:
            list(loader)
        message = str(info.value)
        assert message.startswith(f"{broken}: cannot read this image") and "\n" not in message, message


def test_broken_image_and_empty_folder_through_the_cli(tmp_path, run_cli):
    _write_gray_digits(tmp_path / "data")
    torch.save(tiny_gray().state_dict(), tmp_path / "m.pt")
    broken = tmp_path / "data" / "val" / "digit7" / "2.png"
    broken.write_bytes(broken.read_bytes()[:100])
    common = ["--arch", "test_data:tiny_gray", "--device", "cpu"]
    result = run_cli("evaluate", tmp_path / "m.pt", "--data", tmp_path / "data", *common)
    assert result.code == 2 and len(result.err_lines) == 1, result.err
    assert result.err_lines[0].startswith(f"brn: error: {broken}: cannot read this image"), result.err
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    result = run_cli("evaluate", tmp_path / "m.pt", "--data", empty, *common)
    assert result.code == 2 and len(result.err_lines) == 1, result.err
    assert f"{empty / 'train'}: no image files" in result.err


def test_gray_image_folder_with_a_gray_model_through_finetune_and_evaluate(tmp_path, run_cli):
    """Image folders used to load as RGB whatever the model: a 1-channel model failed mid-run."""
    _write_gray_digits(tmp_path / "data")
    torch.manual_seed(0)
    torch.save(tiny_gray().state_dict(), tmp_path / "bn.pt")
    run = tmp_path / "run"
    common = ["--data", tmp_path / "data", "--arch", "test_data:tiny_gray"]
    result = run_cli("finetune", tmp_path / "bn.pt", *common, "-o", run, "--steps", "2", "--batch-size", "4",
                     "--json")  # fmt: skip
    assert result.code == 0, result.err
    assert torch.load(run / "best.pt", weights_only=True)["input_shape"] == [2, 1, 28, 28]
    result = run_cli("evaluate", run / "best.pt", *common, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["inference"]["examples"] == 8
    result = run_cli("evaluate", run / "best.pt", *common, "--channels", "3")
    assert result.code == 2 and result.err_lines == [
        f"brn: error: {tmp_path / 'data'}: the examples have 3 channels but the model's first layer (0) takes 1 "
        "(pass --channels 1)"
    ]


def test_finetune_refuses_data_with_more_classes_than_the_model_before_writing(tmp_path, run_cli):
    torch.save(tiny_gray(5).state_dict(), tmp_path / "bn.pt")
    run = tmp_path / "run"
    result = run_cli("finetune", tmp_path / "bn.pt", "--data", SAMPLE_DATA, "--arch", "test_data:tiny_gray",
                     "--arch-kwargs", '{"num_classes": 5}', "-o", run, "--steps", "1")  # fmt: skip
    assert result.code == 2 and result.err_lines == [
        f"brn: error: {SAMPLE_DATA}: the data has 10 classes (labels 0..9) but the model has 5 outputs"
    ]
    assert not run.exists()


def test_fit_data_to_model_refuses_examples_that_do_not_batch(tmp_path, monkeypatch):
    (tmp_path / "ragged_toy_data.py").write_text(
        "import torch\n"
        "class Ragged(torch.utils.data.Dataset):\n"
        "    targets = [0, 1, 0, 1]\n"
        "    def __len__(self):\n"
        "        return 4\n"
        "    def __getitem__(self, i):\n"
        "        return torch.zeros(3 + i), i % 2\n"
        "def make():\n"
        "    return Ragged(), None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from brn_cli.data.datasets import fit_data_to_model

    with pytest.raises(BrnError, match=r"^ragged_toy_data:make: examples must be tensors of one shape"):
        fit_data_to_model(nn.Sequential(nn.Linear(3, 2)), load_data("ragged_toy_data:make"))
