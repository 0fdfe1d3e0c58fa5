"""K-fold cross-validation: does it matter that the scaler is fitted on the train split, before the folds?

The pipeline fits cleaning and scaling once, on the train split, and K-fold cross-validation then pools
train + validation and cuts it into folds, so fold k's held-out rows partly took part in that (label-free)
fit. This trains each fold model twice on the same rows and seed: once on the pipeline's scaling, once
rescaled by a scaler refitted on the fold's own training part, and prints how far the two scalers are
apart and both models' out-of-fold metrics, pooled over the folds.

    .venv/bin/python benchmarks/fold_scaler.py [--folds 5] [overrides, e.g. model=bnn]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from dl_uncertainty.config.compose import load_config  # noqa: E402
from dl_uncertainty.data.folds import fold_splits  # noqa: E402
from dl_uncertainty.data.rows import unscaled  # noqa: E402
from dl_uncertainty.data.splits import Schema, Split  # noqa: E402
from dl_uncertainty.data.tables import _fit_scaling, prepare  # noqa: E402
from dl_uncertainty.training.loop import train_model, val_log_probs  # noqa: E402
from dl_uncertainty.uncertainty import metrics as M  # noqa: E402


def refitted(train: Split, val: Split) -> tuple[Split, Split, float, float]:
    """Both splits rescaled by the scaling method refitted on ``train``'s raw rows; and the largest
    relative change of the center and of the scale."""
    stats = train.schema.cleaning
    fit = _fit_scaling(unscaled(np.asarray(train.x, np.float64), train.schema), stats["scaling"])
    old_c, old_s, new_c, new_s = (np.asarray(v) for v in (stats["center"], stats["scale"], fit["center"], fit["scale"]))
    schema = Schema(**{**train.schema.__dict__, "cleaning": {**stats, **fit}})

    def rescale(split: Split) -> Split:
        raw = unscaled(np.asarray(split.x, np.float64), split.schema)
        return Split(((raw - new_c) / new_s).astype(np.float32), split.y, schema)

    center = float(np.max(np.abs(new_c - old_c) / old_s))  # in units of the old scale
    return rescale(train), rescale(val), center, float(np.max(np.abs(new_s / old_s - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(["model=mc_dropout_dnn", *args.overrides])
    splits = prepare(cfg.data, cfg.seed)
    pooled = {"pipeline": ([], []), "refitted": ([], [])}
    for k in range(args.folds):
        train, val = fold_splits(splits["train"], splits["val"], args.folds, k, cfg.seed)
        r_train, r_val, center, scale = refitted(train, val)
        line = f"fold {k}: refitted scaler's center moved {center:.4f} old scales, its scale by {scale:.2%}"
        for name, (tr, va) in {"pipeline": (train, val), "refitted": (r_train, r_val)}.items():
            model = train_model(cfg, tr, va, quiet=True).model
            pooled[name][0].append(val_log_probs(model, va.x, cfg.evaluate.mc_samples).numpy())
            pooled[name][1].append(va.y)
            line += f"; {name} val NLL {M.nll(pooled[name][0][-1], va.y):.4f}"
        print(line, flush=True)
    print(f"\n{cfg.model.name}, {args.folds} folds, out of fold over {sum(len(y) for y in pooled['pipeline'][1])} rows:")
    for name, (lps, ys) in pooled.items():
        lp, y = np.concatenate(lps, axis=1), np.concatenate(ys)
        print(f"  {name:9s} scaler: acc {M.accuracy(lp, y):.4f}  NLL {M.nll(lp, y):.4f}  ECE {M.ece(lp, y):.4f}")


if __name__ == "__main__":
    main()
