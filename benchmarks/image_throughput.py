"""Image throughput: training and MC evaluation of the ResNet, in images per second.

On a generated image folder (circles/squares/triangles, decoded by the image_folder loader),
for each model family: training images/s of the ResNet (with flips and crops) beside the MLP on
the same images, and MC evaluation images/s with our engine (``strategy=auto``) beside the naive
loop of T forward passes. Everything runs in this process, alternating; medians are printed.
On CUDA, training uses the AMP path of ``dl_uncertainty.training`` (float16 autocast and a
GradScaler) when ``train.amp`` is on (the default); the header says whether it was.

    python benchmarks/image_throughput.py [--images 600] [--size 32] [--samples 50] [key=value overrides]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dl_uncertainty.config.compose import load_config  # noqa: E402
from dl_uncertainty.data.augment import augment  # noqa: E402
from dl_uncertainty.data.shapes import make_shapes  # noqa: E402
from dl_uncertainty.data.tables import prepare  # noqa: E402
from dl_uncertainty.families.base import build_model as get_model  # noqa: E402
from dl_uncertainty.families.networks import resolve_device  # noqa: E402
from dl_uncertainty.families.predict import predict_log_probs  # noqa: E402
from dl_uncertainty.training.loop import kl_scale, loss_terms, make_optimizer, set_threads  # noqa: E402


def train_seconds(model, cfg, x, y, shape, epochs: int) -> float:
    """The training loop of dl_uncertainty.training: tensors on the device, augmented by index batch,
    float16 autocast with a GradScaler on CUDA when ``train.amp`` is on."""
    opt = make_optimizer(cfg.train, model.parameters())
    use_amp = amp_on(cfg, x.device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    gen = torch.Generator().manual_seed(0)
    model.train()
    tic = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for start in range(0, len(x), cfg.train.batch_size):
            idx = order[start : start + cfg.train.batch_size]
            xb = augment(x[idx], shape, cfg.data.hflip, cfg.data.crop_padding)
            with torch.autocast(x.device.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_terms(model, xb, y[idx], cfg, kl_scale(cfg.model, epoch, len(x)))["loss"]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def amp_on(cfg, device: torch.device) -> bool:
    return bool(cfg.train.amp) and device.type == "cuda"  # as dl_uncertainty.training decides


def mc_seconds(model, x, samples: int, strategy: str) -> float:
    tic = time.perf_counter()
    predict_log_probs(model, x, samples, strategy=strategy)
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600, help="generated images, all three classes")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=50, help="MC samples per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="bnn,mc_dropout_dnn,deep_ensemble")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="shapes-"))
    make_shapes(folder, per_class=args.images // 3, size=args.size)
    base = ["data=image_folder", f"data.path={folder}", f"data.image_size=[{args.size},{args.size}]",
            *args.overrides]
    cfg = load_config(base)
    set_threads(cfg.num_threads)
    tic = time.perf_counter()
    splits = prepare(cfg.data, cfg.seed)
    decode = time.perf_counter() - tic
    device = resolve_device(cfg.device)
    train, test = splits["train"], splits["test"]
    x, y = torch.as_tensor(train.x, device=device), torch.as_tensor(train.y, device=device)
    shape = train.schema.feature_shape
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"# {platform.machine()}, {name}, torch {torch.__version__} on {torch.get_num_threads()} thread(s); "
          f"{args.images} images {shape}, train {len(x)}, test {len(test.y)}, epochs={args.epochs}, "
          f"T={args.samples}, repeats={args.repeats}, AMP {'on' if amp_on(cfg, device) else 'off'}")
    print(f"# image folder decoded and split: {args.images / decode:,.0f} images/s")
    print("| model | train img/s resnet | train img/s mlp | resnet time / mlp time | MC eval img/s ours | MC eval img/s loop "
          "| ours/loop |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model_name in args.models.split(","):
        runs = {}
        for arch in ("resnet", "mlp"):
            cfg = load_config([*base, f"model={model_name}", f"model.arch={arch}"])
            torch.manual_seed(cfg.seed)
            runs[arch] = (cfg, get_model(cfg.model, shape, len(train.schema.class_names)).to(device))
        times: dict[str, list[float]] = {k: [] for k in ("resnet", "mlp", "ours", "loop")}
        for _ in range(args.repeats):
            for arch in ("resnet", "mlp"):
                cfg, initial = runs[arch]
                times[arch].append(train_seconds(copy.deepcopy(initial), cfg, x, y, shape, args.epochs))
            for strategy, label in (("auto", "ours"), ("loop", "loop")):
                times[label].append(mc_seconds(runs["resnet"][1], test.x, args.samples, strategy))
        t = {k: statistics.median(v) for k, v in times.items()}
        seen, evaluated = len(x) * args.epochs, len(test.y)
        print(f"| {model_name} | {seen / t['resnet']:,.0f} | {seen / t['mlp']:,.0f} | {t['resnet'] / t['mlp']:.1f}x | "
              f"{evaluated / t['ours']:,.0f} | {evaluated / t['loop']:,.0f} | {t['loop'] / t['ours']:.2f}x |")


if __name__ == "__main__":
    main()
