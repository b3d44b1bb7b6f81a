"""Run infrastructure of the training package: configs, checkpoints, metrics, distribution."""
