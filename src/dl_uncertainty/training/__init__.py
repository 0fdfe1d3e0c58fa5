"""The training layer: the loop, its checkpoints, losses, augmentation and the Optuna sweep."""
