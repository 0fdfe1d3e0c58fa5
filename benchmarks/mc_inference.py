"""MC inference speed: naive loop vs ours (``mc_log_probs``, strategy auto) vs torch-uncertainty.

For the BNN (torchbnn) and the MC-Dropout DNN, on the default digits MLP (64-256-256-8) and a
larger MLP (784-1024-1024-10), for T in {10, 50, 100} and batch sizes {1, 32, 256, 2048}:
wall time per 1,000 examples of

  loop  T forward passes of the unmodified model in mc_mode (what torchbnn / plain MC-Dropout do)
  ours  dl_uncertainty.inference.mc_log_probs(model, x, T)
  tu    torch_uncertainty.methods.mc_dropout.mc_dropout(model, T) (MC-Dropout only; if importable)

measured in one process on the same model, weights and input, methods alternating within each
repeat (rotating order), medians over repeats. GFLOP/s counts the naive matmul flops
(T x N x 2 x sum(in x out)) over the measured time; "mm" is a bare torch.mm on the same layer
shapes. Run ``python benchmarks/mc_inference.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path

import torch
import torchbnn
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dl_uncertainty.uncertainty.engine import mc_log_probs
from dl_uncertainty.uncertainty.mc_plan import mc_mode, mc_plan  # noqa: E402

try:
    from torch_uncertainty.methods.mc_dropout import mc_dropout as tu_mc_dropout
except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
    tu_mc_dropout = None
    TU_WHY = f"{type(exc).__name__}: {exc}".splitlines()[0]
else:
    TU_WHY = ""

ARCHS = {"digits": (64, 256, 256, 8), "large": (784, 1024, 1024, 10)}
DROPOUT = 0.25  # configs/model/mc_dropout_dnn.yaml
LOG_SIGMA = -5.0  # configs/model/bnn.yaml posterior_log_sigma_init (does not affect speed)


def build(kind: str, widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    pairs = list(pairwise(widths))
    for i, (n_in, n_out) in enumerate(pairs):
        last = i == len(pairs) - 1
        if kind == "bnn":
            layer = torchbnn.BayesLinear(0.0, 1.0, n_in, n_out)
            nn.init.constant_(layer.weight_log_sigma, LOG_SIGMA)
            nn.init.constant_(layer.bias_log_sigma, LOG_SIGMA)
            layers.append(layer)
        else:
            layers.append(nn.Linear(n_in, n_out))
        if not last:
            layers.append(nn.ReLU())
            if kind == "mc_dropout_dnn":
                layers.append(nn.Dropout(DROPOUT))
    return nn.Sequential(*layers).eval()


def naive_loop(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    with torch.inference_mode(), mc_mode(model):
        return torch.stack([torch.log_softmax(model(x), -1) for _ in range(samples)])


def ours(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    return mc_log_probs(model, x, samples)


def make_tu(model: nn.Module, samples: int):
    wrapped = tu_mc_dropout(model, num_estimators=samples, last_layer=False, on_batch=True)
    wrapped.eval()  # the wrapper keeps its dropout layers stochastic in eval

    def run(_model: nn.Module, x: torch.Tensor, _samples: int) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(wrapped(x), -1)

    return run


def timed(fn, *args, min_seconds: float) -> float:
    """Seconds per call; repeats short calls so one measurement lasts >= min_seconds."""
    t0 = time.perf_counter()
    fn(*args)
    once = time.perf_counter() - t0
    reps = max(1, math.ceil(min_seconds / max(once, 1e-6))) if once < min_seconds else 1
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t0) / reps


def bare_mm_seconds(widths: tuple[int, ...], n: int, samples: int, min_seconds: float) -> float:
    """torch.mm on the layer shapes of one pass, times T (the matmul floor of the loop)."""
    mats = [(torch.randn(n, a), torch.randn(b, a)) for a, b in pairwise(widths)]

    def one_pass() -> None:
        for x, w in mats:
            torch.mm(x, w.t())

    with torch.inference_mode():
        return samples * statistics.median(timed(one_pass, min_seconds=min_seconds)
                                           for _ in range(3))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="T=50 only, 3 repeats (a few minutes on 2 cores)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per cell (default 5, quick 3)")
    ap.add_argument("--samples", type=int, nargs="*", default=None, help="T values")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 32, 256, 2048])
    ap.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--models", nargs="*", default=["bnn", "mc_dropout_dnn"],
                    choices=["bnn", "mc_dropout_dnn"])
    ap.add_argument("--min-seconds", type=float, default=0.05,
                    help="shortest single measurement (short calls are repeated)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, = cores)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    samples_list = args.samples or ([50] if args.quick else [10, 50, 100])

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    header = [
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average at start {os.getloadavg()[0]:.2f}",
        "torch-uncertainty: " + ("available" if tu_mc_dropout is not None
                                 else f"NOT available ({TU_WHY}); column tu skipped"),
        f"repeats {repeats} (median), methods alternate in rotating order",
    ]
    print("\n".join(header), flush=True)
    cols = ["model", "arch", "T", "N", "loop ms/1k", "ours ms/1k", "tu ms/1k", "loop/ours",
            "tu/ours", "ours GFLOP/s", "mm GFLOP/s", "ours % mm", "plan (T_chunk x N_chunk)"]
    rows = [cols]
    print(" | ".join(cols), flush=True)
    for model_kind in args.models:
        for arch in args.archs:
            widths = ARCHS[arch]
            model = build(model_kind, widths)
            flops_per_example = 2 * sum(a * b for a, b in pairwise(widths))
            for samples in samples_list:
                for n in args.batches:
                    x = torch.randn(n, widths[0])
                    methods = {"loop": naive_loop, "ours": ours}
                    if model_kind == "mc_dropout_dnn" and tu_mc_dropout is not None:
                        methods["tu"] = make_tu(model, samples)
                    for fn in methods.values():  # warm-up (ours: trace + cost constants)
                        fn(model, x, samples)
                    times: dict[str, list[float]] = {k: [] for k in methods}
                    names = list(methods)
                    for rep in range(repeats):
                        order = names[rep % len(names):] + names[:rep % len(names)]
                        for name in order:
                            times[name].append(timed(methods[name], model, x, samples,
                                                     min_seconds=args.min_seconds))
                    med = {k: statistics.median(v) for k, v in times.items()}
                    mm = bare_mm_seconds(widths, n, samples, args.min_seconds)
                    flops = samples * n * flops_per_example
                    plan = mc_plan(model, x, samples)
                    per_k = {k: v / n * 1000 * 1000 for k, v in med.items()}  # ms per 1k examples
                    row = [
                        model_kind, arch, str(samples), str(n),
                        f"{per_k['loop']:.1f}", f"{per_k['ours']:.1f}",
                        f"{per_k['tu']:.1f}" if "tu" in per_k else "-",
                        f"{med['loop'] / med['ours']:.2f}x",
                        f"{med['tu'] / med['ours']:.2f}x" if "tu" in med else "-",
                        f"{flops / med['ours'] / 1e9:.0f}",
                        f"{flops / mm / 1e9:.0f}",
                        f"{100 * mm / med['ours']:.0f}%",
                        f"{plan.samples_per_chunk} x {plan.examples_per_chunk}",
                    ]
                    rows.append(row)
                    print(" | ".join(row), flush=True)
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    table += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    text = "\n".join(header) + "\n\n" + "\n".join(table) + "\n"
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
