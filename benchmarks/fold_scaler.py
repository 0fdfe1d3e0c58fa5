"""K-fold cross-validation: what refitting the scaler on each fold's training part changes.

The pipeline fits cleaning and scaling once, on the train split; K-fold cross-validation pools train +
validation and cuts it into folds, so with one scaler fold k's held-out rows would partly have taken
part in that (label-free) fit. ``data.folds.fold_splits`` refits the scaling on each fold's training
part. This trains each fold model twice on the same rows and seed, in the train split's scaling and in
the refitted one, and prints how far the two scalers are apart and both arms' out-of-fold metrics.

    .venv/bin/python benchmarks/fold_scaler.py [--folds 5] [overrides, e.g. data.scaling=standard]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from dl_uncertainty.config.compose import load_config  # noqa: E402
from dl_uncertainty.data.folds import fold_splits, rescaled  # noqa: E402
from dl_uncertainty.data.tables import prepare  # noqa: E402
from dl_uncertainty.training.loop import train_model, val_log_probs  # noqa: E402
from dl_uncertainty.uncertainty import metrics as M  # noqa: E402


def apart(one: dict, other: dict) -> tuple[float, float]:
    """The largest move of the center (in units of ``one``'s scale) and relative change of the scale."""
    c1, s1, c2, s2 = (np.asarray(v) for v in (one["center"], one["scale"], other["center"], other["scale"]))
    return float(np.max(np.abs(c2 - c1) / s1)), float(np.max(np.abs(s2 / s1 - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(["model=mc_dropout_dnn", *args.overrides])
    splits = prepare(cfg.data, cfg.seed)
    pooled = {"train split": ([], []), "refitted": ([], [])}
    for k in range(args.folds):
        r_train, r_val = fold_splits(splits["train"], splits["val"], args.folds, k, cfg.seed)
        one = splits["train"].schema
        train, val = rescaled(r_train, one), rescaled(r_val, one)  # the train split's scaling, as before the refit
        center, scale = apart(one.cleaning, r_train.schema.cleaning)
        line = f"fold {k}: refitted scaler's center moved {center:.4f} old scales, its scale by {scale:.2%}"
        for name, (tr, va) in {"train split": (train, val), "refitted": (r_train, r_val)}.items():
            model = train_model(cfg, tr, va, quiet=True).model
            pooled[name][0].append(val_log_probs(model, va.x, cfg.evaluate.mc_samples).numpy())
            pooled[name][1].append(va.y)
            line += f"; {name} val NLL {M.nll(pooled[name][0][-1], va.y):.4f}"
        print(line, flush=True)
    print(f"\n{cfg.model.name}, {args.folds} folds, out of fold over {sum(len(y) for y in pooled['train split'][1])} rows:")
    for name, (lps, ys) in pooled.items():
        lp, y = np.concatenate(lps, axis=1), np.concatenate(ys)
        print(f"  {name:11s} scaler: acc {M.accuracy(lp, y):.4f}  NLL {M.nll(lp, y):.4f}  ECE {M.ece(lp, y):.4f}")


if __name__ == "__main__":
    main()
