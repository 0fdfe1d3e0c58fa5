"""What the Monte-Carlo engine will do for a model: which modules are stochastic, whether examples
of a batch are coupled, and the cost and memory models that choose the chunk shape (:func:`mc_plan`).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

try:  # torchbnn is a project dependency, but keep this module importable without it.
    import torchbnn as _tbnn

    _BAYES_LINEAR: tuple[type, ...] = (_tbnn.BayesLinear,)
    _BAYES_CONV: tuple[type, ...] = (_tbnn.BayesConv2d,)
    _BAYES_BN: tuple[type, ...] = (_tbnn.BayesBatchNorm2d,)
except ImportError:  # pragma: no cover
    _BAYES_LINEAR = _BAYES_CONV = _BAYES_BN = ()

STRATEGIES = ("auto", "loop", "repeat", "lrt")

_DROPOUT = nn.modules.dropout._DropoutNd
_BATCHNORM = nn.modules.batchnorm._NormBase


# ----------------------------------------------------------------------------- modes


@contextmanager
def mc_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``eval()`` every module, then ``train()`` only ``nn.Dropout*``; restore all modes on exit.

    BatchNorm therefore uses its running statistics and never updates them.
    """
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    for m in model.modules():
        if isinstance(m, _DROPOUT):
            m.training = True
    try:
        yield model
    finally:
        for m, training in saved:
            if m.training != training:
                m.training = training


# ----------------------------------------------------------------------------- analysis


def _frozen(m: nn.Module) -> bool:
    return getattr(m, "weight_eps", None) is not None


def _is_stochastic(m: nn.Module) -> bool:
    if isinstance(m, _DROPOUT):
        return m.p > 0
    if isinstance(m, _BAYES_LINEAR + _BAYES_CONV):
        return not _frozen(m)
    if isinstance(m, _BAYES_BN):
        return bool(m.affine) and not _frozen(m)
    return False


def _couples_batch(m: nn.Module) -> bool:
    """True if the module's output for one example depends on the other examples (in eval)."""
    return isinstance(m, _BATCHNORM) and (not m.track_running_stats or m.running_mean is None)


@dataclass(frozen=True)
class Plan:
    """What :func:`mc_log_probs` will do: strategy, and how rows are chunked."""

    strategy: str  # "deterministic", "loop", "repeat", "lrt" or "auto"
    samples_per_chunk: int  # MC samples per forward call
    examples_per_chunk: int  # examples per forward call
    reason: str
    est_seconds: float = float("nan")  # the cost model's estimate for the whole call


@dataclass(frozen=True)
class _Costs:
    """This machine's cost (seconds) of one normal, one uniform, one flop, one elementwise op
    and one module call, and its cache size: the constants of the cost model."""

    normal: float
    uniform: float
    flop: float
    elem: float
    call: float
    cache_bytes: int


_COSTS: _Costs | None = None


def _cache_bytes() -> int:
    """Total L2 cache (per-core size x cores sharing none of it) from sysfs; 1 MiB if unknown."""
    for idx in range(8):
        base = f"/sys/devices/system/cpu/cpu0/cache/index{idx}/"
        try:
            with open(base + "level") as fh:
                level = int(fh.read())
            with open(base + "size") as fh:
                txt = fh.read().strip().upper()
        except (OSError, ValueError):
            continue
        if level == 2:
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
            return int(txt.rstrip("KMG")) * mult * max(1, torch.get_num_threads())
    return 1 << 20


def _machine_costs() -> _Costs:
    """Measure the cost model's constants once per process (~10 ms)."""
    global _COSTS
    if _COSTS is None:
        with torch.inference_mode():
            gen = torch.Generator().manual_seed(0)  # measuring must not move the global RNG
            buf = torch.empty(1 << 16)
            a = torch.randn(256, 256, generator=gen)
            tiny = torch.zeros(1, 1)
            relu = nn.ReLU()

            def best(fn) -> float:
                fn()
                return min(_timed(fn) for _ in range(5))

            normal = best(lambda: buf.normal_(generator=gen)) / buf.numel()
            uniform = best(lambda: buf.uniform_(generator=gen)) / buf.numel()
            elem = best(lambda: buf.mul_(1.0)) / buf.numel()
            flop = best(lambda: torch.mm(a, a)) / (2 * 256**3)
            call = best(lambda: relu(tiny))
        _COSTS = _Costs(normal, uniform, flop, elem, call, _cache_bytes())
    return _COSTS


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass(frozen=True)
class _Step:
    """One leaf module as executed on one example: its kind and per-example sizes."""

    kind: str  # "det", "dropout", "bayes_linear", "bayes_conv", "bayes_bn"
    in_numel: int
    out_numel: int
    flops: float  # multiply-adds x 2 for one example (matmul-like modules), else 0
    weights: int  # number of sampled weights (Bayes modules)
    out_features: int  # LRT draws one normal per output element


_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kind(m: nn.Module) -> str:
    if not _is_stochastic(m):
        return "det"
    if isinstance(m, _BAYES_LINEAR):
        return "bayes_linear"
    if isinstance(m, _BAYES_CONV):
        return "bayes_conv"
    if isinstance(m, _BAYES_BN):
        return "bayes_bn"
    return "dropout"


def _trace(model: nn.Module, x: torch.Tensor, kinds: tuple[str, ...]) -> list[_Step]:
    """Execution-order sizes of the leaf modules for one example (cached per model + shape)."""
    key = (tuple(x.shape[1:]), x.dtype, kinds)
    per_model = _TRACES.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    steps: list[_Step] = []

    def hook(m: nn.Module, inputs, output) -> None:
        if not inputs or not torch.is_tensor(inputs[0]) or not torch.is_tensor(output):
            return
        inp, n_rows = inputs[0], max(1, inputs[0].shape[0])
        in_numel, out_numel = inp.numel() // n_rows, output.numel() // n_rows
        flops, weights, out_features = 0.0, 0, out_numel
        if isinstance(m, (nn.Linear, *_BAYES_LINEAR)):
            flops = 2.0 * in_numel * m.out_features
            out_features = m.out_features
        elif isinstance(m, (nn.modules.conv._ConvNd, *_BAYES_CONV)):
            w = m.weight_mu if isinstance(m, _BAYES_CONV) else m.weight
            flops = 2.0 * out_numel * (w[0].numel())
        if isinstance(m, _BAYES_LINEAR + _BAYES_CONV):
            weights = m.weight_mu.numel()
        steps.append(_Step(_kind(m), in_numel, out_numel, flops, weights, out_features))

    leaves = [m for m in model.modules()
              if not list(m.children()) or isinstance(m, _BAYES_LINEAR + _BAYES_CONV + _BAYES_BN)]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.random.fork_rng(devices=[]):  # the probe must not shift the caller's RNG
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    per_model[key] = steps
    return steps


def _lrt_cheaper(c: _Costs, weights: int, out_features: int, rows_per_sample: int,
                 share: int) -> bool:
    """Per MC sample of a BayesLinear: LRT (two matmuls, done once for ``share`` samples when
    the input is not yet sample-specific, plus one normal per output) vs one sampled weight set
    shared by the sample's rows (one normal per weight, one matmul)."""
    flops_per_row = 2.0 * weights
    weight_cost = weights * (c.normal + 2 * c.elem) + rows_per_sample * flops_per_row * c.flop
    lrt_cost = (rows_per_sample * out_features * (c.normal + 3 * c.elem)
                + 2 * rows_per_sample * flops_per_row * c.flop / share)
    return lrt_cost < weight_cost


def _chunk_cost(steps: list[_Step], c: _Costs, mode: str, tc: int, nc: int) -> float:
    """Cost-model seconds of one forward call carrying tc MC samples x nc examples."""
    total, shared = 0.0, tc > 1
    for s in steps:
        rows = nc if shared else tc * nc
        total += c.call
        if s.kind == "det":
            total += rows * (s.flops * c.flop + s.out_numel * c.elem)
        elif s.kind == "dropout":
            shared = False
            total += tc * nc * s.out_numel * (c.uniform + 2 * c.elem)
        elif s.kind == "bayes_linear":
            per_sample = nc * max(1, s.out_numel // max(1, s.out_features))
            lrt = mode == "lrt" or (mode == "auto" and _lrt_cheaper(
                c, s.weights, s.out_features, per_sample, tc if shared else 1))
            if lrt:
                total += (2 * rows * s.flops * c.flop
                          + tc * nc * s.out_numel * (c.normal + 3 * c.elem))
            else:
                total += tc * (s.weights * (c.normal + 2 * c.elem) + nc * s.flops * c.flop
                               + c.call)
            shared = False
        elif s.kind == "bayes_conv":
            shared = False
            total += tc * s.weights * (c.normal + 2 * c.elem) + tc * nc * s.flops * c.flop
        else:  # bayes_bn
            shared = False
            total += tc * nc * s.out_numel * 4 * c.elem
    return total


def mc_plan(model: nn.Module, x: torch.Tensor, samples: int, *, strategy: str = "auto",
            chunk_size: int | None = None, deterministic: bool = False) -> Plan:
    """The plan :func:`mc_log_probs` follows for this model, input and T.

    ``deterministic``: the caller's word that one forward pass is every sample. Without it, a model
    with no stochastic module the engine recognises still gets T passes (``loop``): a module that
    samples its own weights in ``forward`` is invisible to the analysis, and copying one pass T times
    would report zero disagreement for it.
    Cheap: one traced forward of one example per (model, input shape), then arithmetic.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}")
    modules = list(model.modules())
    kinds = tuple(_kind(m) for m in modules)
    coupled = any(_couples_batch(m) for m in modules)
    key = (kinds, coupled, tuple(x.shape), x.dtype, samples, strategy, chunk_size, deterministic)
    plans = _PLANS.setdefault(model, {})
    if key not in plans:
        if len(plans) > 256:  # many input shapes: keep the cache bounded
            plans.clear()
        plans[key] = _make_plan(model, x, samples, strategy, chunk_size, kinds, coupled, deterministic)
    return plans[key]


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_plan(model: nn.Module, x: torch.Tensor, samples: int, strategy: str,
               chunk_size: int | None, kinds: tuple[str, ...], coupled: bool, deterministic: bool) -> Plan:
    n = max(1, x.shape[0])
    recognised = any(k != "det" for k in kinds)
    if deterministic and strategy != "loop":
        return Plan("deterministic", 1, min(n, chunk_size or n), "declared deterministic: one pass")
    if strategy == "loop" or not recognised or (strategy == "auto" and coupled):
        why = ("forced" if strategy == "loop" else
               "no stochastic module the engine knows, and the model is not declared deterministic: "
               "T ordinary passes, so randomness inside forward is sampled, not copied" if not recognised
               else "a BatchNorm uses batch statistics")
        # batch-coupled models must see the whole batch, as they would outside MC sampling
        return Plan("loop", 1, n if coupled else min(n, chunk_size or n), why)
    if coupled:
        raise ValueError(
            f"strategy {strategy!r} puts several MC samples of an example in one batch, but this "
            "model has a BatchNorm that uses batch statistics; use strategy='loop'"
        )
    c = _machine_costs()
    with torch.inference_mode(), mc_mode(model):
        steps = _trace(model, x, kinds)
    if chunk_size is None:
        # Memory model: the widest activation of a chunk stays within the cache, or within
        # 8x the cache when the caller's own batch is that large (the loop would hold it too).
        widest = max([s.out_numel for s in steps] + [x[0].numel()])
        fit = max(1, c.cache_bytes // (x.element_size() * widest))
        chunk_size = max(fit, min(n, 8 * fit))
    # Cost model over chunk shapes: all samples per call share the deterministic prefix,
    # all examples per call share a sampled weight set; rows per call are bounded.
    best: tuple[float, int, int] | None = None
    tcs = sorted({max(1, min(samples, chunk_size)), *(
        math.ceil(samples / k) for k in range(1, samples + 1)
        if math.ceil(samples / k) <= chunk_size)})
    for tc in tcs:
        nc = max(1, min(n, chunk_size // tc))
        calls = math.ceil(samples / tc) * math.ceil(n / nc)
        cost = calls * _chunk_cost(steps, c, strategy, tc, nc)
        if best is None or cost < best[0]:
            best = (cost, tc, nc)
    assert best is not None
    return Plan(strategy, best[1], best[2], f"cost model, rows per call <= {chunk_size}", best[0])
