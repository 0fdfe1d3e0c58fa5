"""A trained model as files: ``model.pt`` (state_dict) + ``bundle.json`` (config and data schema)
+ ``density.npz`` (the feature density fitted after training, when there is one).

This is what the pipeline's Model artifact holds and what the MLflow pyfunc wraps, so any step
can rebuild the exact model without MLflow and without pickled modules.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dl_uncertainty.data.splits import Schema
from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import build_model
from dl_uncertainty.families.feature_density import DENSITY_ATTR, FeatureDensity, density_of

WEIGHTS, META, DENSITY = "model.pt", "bundle.json", "density.npz"


def save_bundle(model: nn.Module, cfg: DictConfig, schema: Schema, folder: str | Path, **extra) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS)
    if density_of(model) is not None:  # the feature density fitted after training
        np.savez(folder / DENSITY, **density_of(model).state())
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "schema": asdict(schema), **extra}
    (folder / META).write_text(json.dumps(meta, indent=2))
    return folder


def load_bundle(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, DictConfig, Schema, dict]:
    """Rebuild the model with its weights; also return the config, schema and extra metadata."""
    from dl_uncertainty.config.compose import config_from_json

    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
        state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise UserError(f"{folder} is not a model bundle: {Path(err.filename).name} is missing") from None
    except (ValueError, RuntimeError, OSError) as err:
        raise UserError(f"cannot read the model bundle in {folder}: {err}") from None
    cfg = config_from_json(json.dumps(meta.pop("config")))
    schema = Schema(**meta.pop("schema"))
    model = build_model(cfg.model, schema.feature_shape, len(schema.class_names))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"weights in {folder} do not fit model {cfg.model.name}: {str(err).splitlines()[0]}") from None
    if (folder / DENSITY).is_file():
        with np.load(folder / DENSITY) as arrays:
            setattr(model, DENSITY_ATTR, FeatureDensity.from_state(dict(arrays)))
    return model.to(device).eval(), cfg, schema, meta
