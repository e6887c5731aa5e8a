"""Fine-tuning: schedules, the training loop, distributed training, the torchrun launcher, curves.
Imports evaluation/, data/, storage/, nn/."""
