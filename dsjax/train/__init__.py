"""PRETRAIN: optimizer, jitted train/eval steps, checkpoints, metrics and the training loop."""
