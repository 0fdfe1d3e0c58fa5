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


def typed_values(cfg: DictConfig) -> dict[str, Any]:
    """Each typed parameter's value in a composed config (the pipeline's defaults, a run's parameters)."""
    return {name: kind(OmegaConf.select(cfg, key)) for name, key, kind in TYPED}


def typed_overrides(values: dict[str, Any]) -> list[str]:
    """The overrides a run's typed parameter values stand for (``values`` may hold other names too)."""
    return [f"{key}={values[name]}" for name, key, _ in TYPED]
