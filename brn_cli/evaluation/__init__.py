"""Inference-mode and batch-statistics evaluation, statistics calibration. Imports data/ and below."""
