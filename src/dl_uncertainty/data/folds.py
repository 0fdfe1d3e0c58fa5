"""K-fold cross-validation over the training data (the train and validation splits together).

Fold k's model trains on the other K-1 folds and early-stops on fold k, so every training row is
held out by exactly one model: their out-of-fold predictions cover the training data once. The
calibration and test splits are not part of any fold. Rows are ordered train first, then val, in
every fold's positions, so out-of-fold predictions line up with ``pooled_labels``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dl_uncertainty.data.splits import Split
from dl_uncertainty.errors import UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig


def pooled_labels(train: Split, val: Split) -> np.ndarray:
    return np.concatenate([np.asarray(train.y), np.asarray(val.y)])


def check_folds(labels: np.ndarray, folds: int, class_names: list[str] | None = None) -> None:
    """Every class needs a row in every fold: refuse ``folds`` above the smallest class's row count."""
    if folds < 2:
        return
    values, counts = np.unique(labels, return_counts=True)
    smallest = int(np.argmin(counts))
    if counts[smallest] < folds:
        name = class_names[int(values[smallest])] if class_names is not None else str(values[smallest])
        raise UserError(f"pipeline.folds={folds} is more than the {counts[smallest]} training rows (train + validation) "
                        f"of class {name!r}, so some fold would hold none of it; lower pipeline.folds "
                        f"to at most {counts[smallest]}")


def fold_positions(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Positions into ``labels`` held out by each fold: disjoint, stratified, together every row once."""
    from sklearn.model_selection import StratifiedKFold

    check_folds(labels, folds)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [np.sort(held) for _, held in splitter.split(np.zeros(len(labels)), labels)]


def fold_splits(train: Split, val: Split, folds: int, fold: int, seed: int) -> tuple[Split, Split]:
    """Fold ``fold``'s (train, validation): the pooled train + val rows outside it, and those in it."""
    labels = pooled_labels(train, val)
    held = fold_positions(labels, folds, seed)[fold]
    inside = np.zeros(len(labels), dtype=bool)
    inside[held] = True
    x = np.concatenate([np.asarray(train.x), np.asarray(val.x)])
    return (Split(x[~inside], labels[~inside], train.schema), Split(x[inside], labels[inside], train.schema))


def prepare_run_splits(cfg: DictConfig) -> dict[str, Split]:
    """The splits one run trains and evaluates on: ``cfg.data``'s, made with ``cfg.seed``, with train and
    val replaced by fold ``pipeline.fold``'s when it is set, as the pipeline's branch for that fold has them."""
    from dl_uncertainty.data.tables import prepare

    splits = prepare(cfg.data, cfg.seed)
    if cfg.pipeline.fold >= 0:
        check_folds(pooled_labels(splits["train"], splits["val"]), cfg.pipeline.folds, splits["train"].schema.class_names)
        splits["train"], splits["val"] = fold_splits(splits["train"], splits["val"], cfg.pipeline.folds,
                                                     cfg.pipeline.fold, cfg.seed)
    return splits
