"""The pipeline's typed run parameters: one table, from which the pipeline's signature, the configure
step's overrides, the keys those parameters carry and a submitted run's parameters are all made."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

TYPED = (  # parameter name, the config key it sets, its type
    ("epochs", "train.epochs", int),
    ("learning_rate", "train.lr", float),
    ("mc_samples", "evaluate.mc_samples", int),
    ("seed", "seed", int),
    ("seeds", "pipeline.seeds", int),
    ("folds", "pipeline.folds", int),
    ("experiment_name", "experiment_name", str),
)
TYPED_KEYS = [key for _, key, _ in TYPED]
# Typed parameters a run may leave to the configs, and the value that says so (one the checks refuse):
# a compiled pipeline's default where the configs derive the key from another choice, as train.epochs
# from the data config's recipe, so the run's data decides (30 for the MNIST recipe) and not the data the
# pipeline was compiled with.
FROM_CONFIGS = {"epochs": 0, "learning_rate": 0.0, "mc_samples": 0}


def typed_values(cfg: DictConfig) -> dict[str, Any]:
    """Each typed parameter's value in a composed config (the pipeline's defaults, a run's parameters)."""
    return {name: kind(OmegaConf.select(cfg, key)) for name, key, kind in TYPED}


def typed_defaults(cfg: DictConfig) -> dict[str, Any]:
    """The compiled pipeline's defaults: each typed parameter's value in ``cfg``, but ``FROM_CONFIGS``'s
    value where ``cfg`` derives the key (an interpolation no override replaced)."""
    values = typed_values(cfg)
    for name, key, _ in TYPED:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if name in FROM_CONFIGS and OmegaConf.is_interpolation(node, leaf):
            values[name] = FROM_CONFIGS[name]
    return values


def typed_overrides(values: dict[str, Any]) -> list[str]:
    """The overrides a run's typed parameter values stand for (``values`` may hold other names too);
    a parameter left at its ``FROM_CONFIGS`` value stands for none."""
    return [f"{key}={values[name]}" for name, key, _ in TYPED
            if name not in FROM_CONFIGS or values[name] != FROM_CONFIGS[name]]
