"""Training throughput: our index-batched tensors-on-device loop vs a per-item DataLoader loop.

For each model on digits (default configs), both loops train the same network from the same
initial weights for the same epochs, alternating, in this process; prints samples/s, seconds per
epoch, the ratio ours / DataLoader, and the process's peak RSS.

    python benchmarks/train_throughput.py [--epochs 10] [--repeats 3] [key=value overrides]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dl_uncertainty.config.compose import load_config  # noqa: E402
from dl_uncertainty.data.tables import prepare  # noqa: E402
from dl_uncertainty.families.base import build_model as get_model  # noqa: E402
from dl_uncertainty.training.loop import kl_scale, loss_terms, make_optimizer, set_threads  # noqa: E402


def ours(model, cfg, x, y, epochs: int) -> float:
    """Tensors already on the device, batches by index (what dl_uncertainty.training does)."""
    opt = make_optimizer(cfg.train, model.parameters())
    gen = torch.Generator().manual_seed(0)
    tic = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), cfg.train.batch_size):
            idx = order[start : start + cfg.train.batch_size]
            loss = loss_terms(model, x[idx], y[idx], cfg, kl_scale(cfg.model, epoch, len(x)))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - tic


def dataloader(model, cfg, x, y, epochs: int) -> float:
    """The tutorial loop: a Dataset indexed item by item, collated by a DataLoader."""
    opt = make_optimizer(cfg.train, model.parameters())
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    tic = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for xb, yb in loader:
            loss = loss_terms(model, xb, yb, cfg, kl_scale(cfg.model, epoch, len(x)))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="bnn,mc_dropout_dnn,deep_ensemble")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    set_threads(load_config(args.overrides).num_threads)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} on "
          f"{torch.get_num_threads()} thread(s); epochs={args.epochs}, repeats={args.repeats}")
    print("| model | ours samples/s | DataLoader samples/s | ours s/epoch | ratio ours/DataLoader |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        cfg = load_config([f"model={name}", *args.overrides])
        set_threads(cfg.num_threads)
        train = prepare(cfg.data, cfg.seed)["train"]
        x, y = torch.as_tensor(train.x), torch.as_tensor(train.y)
        torch.manual_seed(cfg.seed)
        initial = get_model(cfg.model, train.schema.feature_shape, len(train.schema.class_names))
        times = {"ours": [], "dataloader": []}
        for _ in range(args.repeats):
            for label, loop in (("ours", ours), ("dataloader", dataloader)):
                times[label].append(loop(copy.deepcopy(initial), cfg, x, y, args.epochs))
        seen = len(x) * args.epochs
        t_ours, t_dl = statistics.median(times["ours"]), statistics.median(times["dataloader"])
        print(f"| {name} | {seen / t_ours:,.0f} | {seen / t_dl:,.0f} | {t_ours / args.epochs:.4f} | "
              f"{t_dl / t_ours:.2f}x |")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
