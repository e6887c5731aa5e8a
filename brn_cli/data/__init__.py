"""Datasets, preprocessing specs, augmentation, batch samplers and loaders. Imports storage/, nn/."""
