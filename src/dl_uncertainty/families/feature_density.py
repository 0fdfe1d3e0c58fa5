"""The distance-aware score every family gets: a class-conditional Gaussian of its penultimate
features (``family.features``) fitted on the training split after training, and the energy of its
point-estimate logits (``family.logits``).

The fitted density rides on the model (``model.dlu_density``), so the bundle saves it
(``density.npz``), the MLflow pyfunc serves it (``feature_density`` column) and evaluation scores
with the same numbers. Its abstain threshold keeps ``evaluate.density_target_rate`` of the
calibration inputs (``threshold_on``, after training; validation only picks and gates models);
``evaluate.abstain_on=density`` makes it the abstain rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from dl_uncertainty.data.augment import augment
from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import family_of
from dl_uncertainty.uncertainty.density import ClassGaussianDensity, energy_score, fit_threshold
from dl_uncertainty.uncertainty.knn_density import KNNDensity

if TYPE_CHECKING:
    from dl_uncertainty.data.splits import Split

DENSITY_ATTR = "dlu_density"
BATCH = 1024
ROWS_PER_FEATURE = 5  # evaluate.density=auto: fewer training rows per feature than this, and the kNN is used
BANK_ROWS = 10_000  # augmented copies of a small training split fill the density's fit up to about this many rows
MAX_COPIES = 4  # ... at most this many copies of each training image


@dataclass
class FeatureDensity:
    density: ClassGaussianDensity | KNNDensity
    threshold: float  # abstain below this log-density
    target_rate: float  # the share of held-out (calibration) inputs at or above it

    def state(self) -> dict[str, np.ndarray]:
        return {**self.density.state_dict(), "threshold": np.array(self.threshold),
                "target_rate": np.array(self.target_rate)}

    @classmethod
    def from_state(cls, state: dict) -> FeatureDensity:
        kind = str(np.asarray(state["kind"])) if "kind" in state else "gaussian"  # bundles before knn: gaussian
        density = KNNDensity.from_state(state) if kind == "knn" else ClassGaussianDensity.from_state(state)
        return cls(density, float(np.asarray(state["threshold"])),
                   float(np.asarray(state["target_rate"])))


def density_of(model: nn.Module) -> FeatureDensity | None:
    return getattr(model, DENSITY_ATTR, None)


def _batches(model: nn.Module, x, fn) -> np.ndarray:
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(x), BATCH):
        rows = torch.as_tensor(np.array(x[start : start + BATCH], np.float32), device=device)
        out.append(fn(rows).detach().float().cpu().numpy())
    return out


def features(model: nn.Module, x) -> np.ndarray:
    family = family_of(model)
    return np.concatenate(_batches(model, x, lambda rows: family.features(model, rows)))


def energy(model: nn.Module, x) -> np.ndarray:
    """Energy ``logsumexp`` of the point-estimate logits, the networks' mean: higher = more in-distribution."""
    family = family_of(model)
    return np.concatenate([energy_score(chunk) for chunk in _batches(model, x, lambda rows: family.logits(model, rows))])


def density_kind(setting: str, shape: tuple[int, int]) -> str:
    """``evaluate.density`` for features of ``shape`` [N, D]: ``auto`` is the Gaussian when there are at
    least ROWS_PER_FEATURE training rows per feature (enough to estimate its covariance), else the kNN."""
    if setting != "auto":
        return setting
    rows, dims = shape
    return "gaussian" if rows >= ROWS_PER_FEATURE * dims else "knn"


def augmented_copies(train: Split, cfg: DictConfig) -> int:
    """How many augmented copies of each training image the density is also fitted on: the training
    augmentation (``data.hflip``, ``data.crop_padding``) says which images count as in-distribution, and
    a small split covers them sparsely; up to MAX_COPIES, and none once the split fills BANK_ROWS."""
    shape = train.schema.feature_shape
    if len(shape) != 3 or not (cfg.data.get("hflip", False) or cfg.data.get("crop_padding", 0)):
        return 0
    return min(MAX_COPIES, max(0, BANK_ROWS // max(len(train.y), 1) - 1))


def fit_rows(train: Split, cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """The training rows the density is fitted on, with their labels: the split, then its augmented copies."""
    copies = augmented_copies(train, cfg)
    x = np.asarray(train.x, np.float32)
    if not copies:
        return x, np.asarray(train.y)
    generator = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    rows = torch.as_tensor(x)
    shifted = [augment(rows, train.schema.feature_shape, cfg.data.hflip, cfg.data.crop_padding, generator).numpy()
               for _ in range(copies)]
    return np.concatenate([x, *shifted]), np.tile(np.asarray(train.y), copies + 1)


def fit_feature_density(model: nn.Module, train: Split, val: Split | None, cfg: DictConfig) -> FeatureDensity:
    """Fit on the features of the training split (and of its augmented copies, see ``augmented_copies``),
    threshold on the held-out ``val``; attach it to ``model``."""
    e = cfg.evaluate
    x, y = fit_rows(train, cfg)
    train_features = features(model, x)
    if density_kind(e.get("density", "gaussian"), (len(train.y), train_features.shape[1])) == "knn":
        density = KNNDensity(seed=cfg.get("seed", 0))
    else:
        density = ClassGaussianDensity("shared", e.get("density_ridge", 1e-3))
    density.fit(train_features, y, num_classes=len(train.schema.class_names))
    held_out = val.x if val is not None and len(val.y) else train.x
    rate = e.get("density_target_rate", 0.95)
    fitted = FeatureDensity(density, fit_threshold(density.log_density(features(model, held_out)), rate), rate)
    setattr(model, DENSITY_ATTR, fitted)
    return fitted


def threshold_on(model: nn.Module, x, cfg: DictConfig) -> FeatureDensity | None:
    """Refit the abstain threshold of ``model``'s density on held-out inputs ``x`` (the calibration
    split), keeping the Gaussian fitted on the training split; None without a density."""
    fitted = density_of(model)
    if fitted is None or not len(x):
        return fitted
    fitted.target_rate = cfg.evaluate.get("density_target_rate", 0.95)
    fitted.threshold = fit_threshold(fitted.density.log_density(features(model, x)), fitted.target_rate)
    return fitted


def feature_scores(model: nn.Module, x) -> dict[str, np.ndarray]:
    """Per row: ``density`` (log-density of the features; empty without a fitted density) and ``energy``."""
    dens = log_density(model, x)
    return {"density": np.zeros(0) if dens is None else dens, "energy": energy(model, x) if len(x) else np.zeros(0)}


def log_density(model: nn.Module, x) -> np.ndarray | None:
    """The feature log-density per row (higher = more in-distribution); None without a fitted density."""
    fitted = density_of(model)
    if fitted is None:
        return None
    return fitted.density.log_density(features(model, x)) if len(x) else np.zeros(0)


def abstain_rule(model: nn.Module, cfg: DictConfig, density: np.ndarray | None) -> dict:
    """``calibration.decide``'s density arguments when ``evaluate.abstain_on=density``, else none."""
    fitted = density_of(model)
    if cfg.evaluate.get("abstain_on", "entropy") != "density":
        return {}
    if fitted is None:
        raise UserError("evaluate.abstain_on=density but this model carries no feature density (a bundle saved "
                        "before densities were fitted after training): retrain it, or use evaluate.abstain_on=entropy")
    if density is None:
        return {}
    return {"density": density, "density_threshold": fitted.threshold}
