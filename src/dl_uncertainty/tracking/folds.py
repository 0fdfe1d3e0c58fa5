"""K-fold cross-validation in the comparison: each family's fold models scored together.

Out of fold: every training row (train + validation) is held out by exactly one fold model, so the
fold models' predictions on their own folds, pooled, give one set of metrics over all those rows,
shown beside the mean ± std of the per-fold numbers. On test: the fold models averaged like a deep
ensemble (the mean of their MC predictive distributions), beside a single fold model's mean ± std.
The fold ensemble is reported, not registered: a model bundle holds one network and the calibration
fitted for it, so the registered model is the family's median fold.
"""

from __future__ import annotations

import numpy as np

from dl_uncertainty.reports.render import Section, format_value, markdown_table
from dl_uncertainty.tracking.seeds import Spread, by_family
from dl_uncertainty.uncertainty import metrics as M

COLUMNS = ("acc", "nll", "brier", "ece")


def has_folds(entries: list[dict]) -> bool:
    return any("fold" in e for e in entries)


def _scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    found = M.summarize(np.log(np.maximum(probs, 1e-300))[None], labels)
    return {k: float(found[k]) for k in COLUMNS}


def _load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in ("val_probs", "val_labels", "probs", "labels", "ood_probs") if k in npz.files}


def cross_validation(entries: list[dict]) -> dict[str, dict]:
    """Per family with folds: ``out_of_fold`` (metrics over every pooled held-out row, and ``rows``),
    ``per_fold`` (Spread of each validation metric), ``ensemble`` (the fold ensemble's test metrics,
    its OOD AUROC by entropy when there are OOD rows) and ``single`` (Spread of each fold model's
    test metrics). Entries carry ``predictions``, the path of their evaluate step's predictions."""
    out = {}
    for name, runs in by_family([e for e in entries if "fold" in e]).items():
        preds = [_load(e["predictions"]) for e in runs]
        oof_probs = np.concatenate([p["val_probs"] for p in preds])
        oof_labels = np.concatenate([p["val_labels"] for p in preds])
        test = np.mean([p["probs"] for p in preds], axis=0)
        ensemble = _scores(test, preds[0]["labels"])
        single_keys = [*COLUMNS]
        if all("ood_probs" in p for p in preds) and len(preds[0]["ood_probs"]):
            ood = np.mean([p["ood_probs"] for p in preds], axis=0)
            entropy = [M.predictive_entropy(np.log(np.maximum(x, 1e-300))[None]) for x in (test, ood)]
            ensemble["auroc_entropy"] = M.ood_metrics(*entropy)["auroc"]
            single_keys.append("auroc_entropy")
        out[name] = {
            "folds": len(runs), "rows": len(oof_labels), "test_rows": len(preds[0]["labels"]),
            "out_of_fold": _scores(oof_probs, oof_labels),
            "per_fold": {k: Spread([float(e["metrics"][f"val_{k}"]) for e in runs]) for k in COLUMNS},
            "ensemble": ensemble,
            "single": {k: Spread([float(e["metrics"][k]) for e in runs if k in e["metrics"]]) for k in single_keys},
        }
    return out


def cv_rows(found: dict[str, dict]) -> list[dict]:
    """Four rows per family: out of fold pooled, each fold (mean ± std), the fold ensemble and one fold model on test."""
    def row(name: str, what: str, n, values: dict) -> dict:
        return {"model": name, "scored on": what, "rows": n,
                **{k: (v.cell() if isinstance(v, Spread) else format_value(v)) for k, v in values.items()}}

    rows = []
    for name, cv in found.items():
        rows += [row(name, "out of fold, pooled", cv["rows"], cv["out_of_fold"]),
                 row(name, "each fold (mean ± std)", f"~{cv['rows'] // cv['folds']}", cv["per_fold"]),
                 row(name, f"test, the {cv['folds']} fold models as one ensemble", cv["test_rows"], cv["ensemble"]),
                 row(name, "test, one fold model (mean ± std)", cv["test_rows"], cv["single"])]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{c: r.get(c, "-") for c in columns} for r in rows]


NOTE = ("Each fold model early-stopped on its own fold of train + validation; pooled, their out-of-fold predictions "
        "score every training row once. Calibration and test splits are the same for every fold. The fold ensemble "
        "averages the fold models' MC predictive distributions like a deep ensemble; it is reported, not registered "
        "(a model bundle holds one network and the calibration fitted for it): the registered model is the family's "
        "median fold.")


def _title(found: dict[str, dict]) -> str:
    return f"{max(cv['folds'] for cv in found.values())}-fold cross-validation"


def cv_markdown(found: dict[str, dict]) -> str:
    """The cross-validation section of the Markdown comparison."""
    return f"## {_title(found)}\n\n{markdown_table(cv_rows(found))}\n\n{NOTE}\n"


def cv_section(found: dict[str, dict]) -> Section:
    """The same table and note as a section of the HTML comparison."""
    return Section(_title(found), text=NOTE, table=cv_rows(found))
