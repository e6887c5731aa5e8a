"""Tracing, folding norms into producers, ONNX export and verification, model inspection.
Imports storage/, nn/."""
