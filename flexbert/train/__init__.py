"""Training: Composer model wrappers, optimizer, schedulers, callbacks, Hydra entry points."""
