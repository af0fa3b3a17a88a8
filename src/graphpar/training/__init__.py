"""Training: one run of a model under torchrun, as a few components that read on their own.

- `graphpar.training.config`: the run config (schema, defaults, checks, hash) and
  `TrainingError`; torch-free, so the workflow validates configs without importing torch.
- `graphpar.training.normalization`: energy statistics and the `Normalized` model wrapper.
- `graphpar.training.ema`: the exponential moving average of the weights.
- `graphpar.training.step`: the loss, the one `train_step` (trainer, scaling study and tests),
  the optimiser and scheduler, validation.
- `graphpar.training.checkpoint`: checkpoints (write, read, resume) and trained models.
- `graphpar.training.train`: data, the loop and the command line
  (`python -m graphpar.training.train --help`).

Processes (joining torchrun's group, `is_main`, broadcasts) live in `graphpar.parallel.launch`.
"""
