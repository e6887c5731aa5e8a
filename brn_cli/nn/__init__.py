"""Layers and the one norm-layer registry: what counts as BatchNorm / frozen / renorm, how to swap a
submodule, device resolution, BatchNorm <-> Batch Renorm conversion. Imports nothing else of brn_cli but
errors."""
