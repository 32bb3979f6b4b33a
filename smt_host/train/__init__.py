"""Training: the host trainer, metrics and checkpoints."""
