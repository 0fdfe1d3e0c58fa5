"""Compile the pipeline to YAML with defaults composed from configs/ and the given overrides."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from dl_uncertainty.config import load_config
from pipelines.pipeline import build_pipeline


def compile_pipeline(overrides: list[str], output: str | Path, *, gpu: bool = True) -> Path:
    cfg = load_config(overrides)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(cfg, cluster=True, gpu=gpu and cfg.pipeline.gpu, default_overrides=overrides)
    compiler.Compiler().compile(pipeline, str(output))
    return output
