"""Per-epoch cost of the training loop's validation on images, against a bare optimizer loop.

scikit-learn's 1,797 real 8x8 digits read at 28x28 (897 training and 270 validation images, the
image CNN defaults of ``data=image_folder``): ``train_model`` runs a few epochs with each per-epoch
validation setting (``train.val_mc_samples``), and a bare loop runs the same optimizer steps on the
same model (forward, backward, step; no validation, no bookkeeping). Both run in this process,
alternating; medians of the seconds per epoch are printed, with their ratio to the bare loop.

    python benchmarks/epoch_validation.py [--epochs 3] [--repeats 3] [--val-samples 10 0] [--models ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from image_uncertainty import data_overrides  # noqa: E402

from dl_uncertainty.config.compose import load_config  # noqa: E402
from dl_uncertainty.data.image_splits import prepare_images  # noqa: E402
from dl_uncertainty.families.base import build_model  # noqa: E402
from dl_uncertainty.training.loop import (  # noqa: E402
    kl_scale,
    loss_terms,
    make_optimizer,
    seed_everything,
    set_threads,
    train_model,
)


def loop_seconds_per_epoch(cfg, train, val) -> float:
    """``train_model``'s wall time per epoch, read between its per-epoch callbacks."""
    stamps = [time.perf_counter()]
    train_model(cfg, train, val, quiet=True, on_epoch=lambda epoch, metrics: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def bare_seconds_per_epoch(cfg, train, epochs: int) -> float:
    """The same optimizer steps in a textbook loop: shuffle, forward, loss, backward, step."""
    seed_everything(cfg.seed)
    shape = train.schema.feature_shape
    model = build_model(cfg.model, shape, len(train.schema.class_names))
    optimizer = make_optimizer(cfg.train, model.parameters())
    x, y = torch.as_tensor(train.x), torch.as_tensor(train.y, dtype=torch.long)
    model.train()
    tic = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(y)).split(cfg.train.batch_size):
            loss = loss_terms(model, x[idx], y[idx], cfg, kl_scale(cfg.model, epoch, len(y)))["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return (time.perf_counter() - tic) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--val-samples", type=int, nargs="+", default=[10, 0],
                        help="train.val_mc_samples settings to time (0: the deterministic pass)")
    parser.add_argument("--models", default="mc_dropout_dnn,bnn")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="epoch-validation-"))
    base = [*data_overrides("digits", root), "num_threads=1", f"train.epochs={args.epochs}",
            "train.early_stopping_patience=0"]
    cfg = load_config(base)
    set_threads(cfg.num_threads)
    splits = prepare_images(cfg.data, cfg.seed)
    train, val = splits["train"], splits["val"]
    load = os.getloadavg()[0]
    print(f"# {len(train.y)} train / {len(val.y)} val images {train.schema.feature_shape}, {args.epochs} epochs, "
          f"median of {args.repeats}, torch {torch.__version__} on {torch.get_num_threads()} thread(s), "
          f"load average {load:.1f} at the start")
    print("| model | val_mc_samples | s/epoch train_model | s/epoch bare loop | train_model / bare |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for model_name in args.models.split(","):
        times: dict[str, list[float]] = {str(t): [] for t in args.val_samples} | {"bare": []}
        for _ in range(args.repeats):
            for samples in args.val_samples:
                cfg = load_config([*base, f"model={model_name}", f"train.val_mc_samples={samples}"])
                times[str(samples)].append(loop_seconds_per_epoch(cfg, train, val))
            times["bare"].append(bare_seconds_per_epoch(cfg, train, args.epochs))
        med = {k: statistics.median(v) for k, v in times.items()}
        for samples in args.val_samples:
            print(f"| {model_name} | {samples} | {med[str(samples)]:.3f} | {med['bare']:.3f} | "
                  f"{med[str(samples)] / med['bare']:.2f}x |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
