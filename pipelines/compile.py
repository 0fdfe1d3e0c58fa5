"""Compile the pipeline to YAML with defaults composed from configs/ and the given overrides."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from dl_uncertainty.config.compose import load_config
from pipelines.pipeline import build_pipeline

PIPELINES = ("uncertainty", "tuning")


def compile_pipeline(overrides: list[str], output: str | Path, *, gpu: bool = True,
                     pipeline: str = "uncertainty") -> Path:
    """``pipeline``: ``uncertainty`` (train, evaluate, compare) or ``tuning`` (an Optuna sweep)."""
    if pipeline == "tuning":
        from dl_uncertainty.training.tuning import compose
        from pipelines.tuning import build_tuning_pipeline

        cfg = compose(overrides)  # search ranges allowed in the overrides
        build = build_tuning_pipeline
        overrides = [o for o in overrides if not o.startswith("model=")]  # the model is a parameter
    else:
        cfg, build = load_config(overrides), build_pipeline
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    func = build(cfg, cluster=True, gpu=gpu and cfg.pipeline.gpu, default_overrides=overrides)
    compiler.Compiler().compile(func, str(output))
    return output
