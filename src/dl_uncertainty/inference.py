"""Monte-Carlo inference engine: T stochastic forward passes, as fast as we can make them exact.

Every place that needs MC samples (evaluate step, CLI, the MLflow pyfunc ``predict``) calls
:func:`mc_log_probs`, which returns the per-sample log-softmax ``[T, N, K]`` of a model whose
``forward`` maps ``[N, ...]`` to logits ``[N, K]``.

Strategies (``STRATEGIES``):

``"loop"``
    The reference: T ordinary forward passes of the unmodified model in :func:`mc_mode`
    (torchbnn draws one weight set per pass, dropout one mask per element). Slow, obviously right.
``"repeat"``
    Batched engine. Several MC samples travel through one forward call as extra rows
    (``rows = T_chunk * N_chunk``). Dropout draws an independent mask per row. Bayes layers draw
    one weight set per MC sample (exactly torchbnn's distribution), one at a time so memory stays
    at one weight set.
``"lrt"``
    Batched engine, plus the local reparameterization trick for ``BayesLinear``: the
    pre-activation of a mean-field Gaussian linear layer is Gaussian, per example,
    ``N(x W_mu^T + b_mu, x^2 (sigma_W^2)^T + sigma_b^2)``, so it is sampled directly (one normal
    per output instead of one per weight). Exact per example (units use disjoint weight rows, so
    they are independent given the input); it only drops the correlation *between* examples of one
    MC sample, which no per-example quantity depends on. ``BayesConv2d`` keeps one kernel set per
    MC sample: kernel weights are shared across spatial positions, so per-unit sampling there
    would not be exact.
``"auto"`` (default)
    Batched engine; each ``BayesLinear`` chooses, at call time, LRT or per-sample weights from a
    cost model (random normals drawn + matmul flops, weighted by this machine's measured cost of
    one normal and one flop). Chunk rows come from a memory model (the cache this machine
    reports). Models whose modules couple examples of a batch (BatchNorm using batch statistics)
    fall back to ``"loop"``; models with nothing stochastic are run once and expanded.

Two exact savings apply to every batched strategy: (1) everything before the first stochastic
module is computed once per example, not once per MC sample — modules see the un-repeated
batch until a stochastic module widens it to ``T_chunk * N_chunk`` rows; (2) dropout masks come
from ``rand >= p`` (Bernoulli(1-p) to float32 resolution, like ``torch.bernoulli``), which is
~2.5x cheaper on CPU than ``F.dropout``'s ``bernoulli_``. If a model's forward cannot take the
un-repeated batch next to a widened one (e.g. it concatenates both), the engine repeats the input
up front instead.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # torchbnn is a project dependency, but keep this module importable without it.
    import torchbnn as _tbnn

    _BAYES_LINEAR: tuple[type, ...] = (_tbnn.BayesLinear,)
    _BAYES_CONV: tuple[type, ...] = (_tbnn.BayesConv2d,)
    _BAYES_BN: tuple[type, ...] = (_tbnn.BayesBatchNorm2d,)
except ImportError:  # pragma: no cover
    _BAYES_LINEAR = _BAYES_CONV = _BAYES_BN = ()

__all__ = ["STRATEGIES", "SampleCache", "mc_log_probs", "mc_mode", "mc_plan"]

STRATEGIES = ("auto", "loop", "repeat", "lrt")

_DROPOUT = nn.modules.dropout._DropoutNd
_BATCHNORM = nn.modules.batchnorm._NormBase
_LOCK = threading.RLock()  # module forwards are patched while sampling: one sampler at a time
_NEEDS_EAGER: weakref.WeakSet = weakref.WeakSet()  # models whose forward rejects lazy widening


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
            chunk_size: int | None = None) -> Plan:
    """The plan :func:`mc_log_probs` follows for this model, input and T.

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
    key = (kinds, coupled, tuple(x.shape), x.dtype, samples, strategy, chunk_size)
    plans = _PLANS.setdefault(model, {})
    if key not in plans:
        if len(plans) > 256:  # many input shapes: keep the cache bounded
            plans.clear()
        plans[key] = _make_plan(model, x, samples, strategy, chunk_size, kinds, coupled)
    return plans[key]


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_plan(model: nn.Module, x: torch.Tensor, samples: int, strategy: str,
               chunk_size: int | None, kinds: tuple[str, ...], coupled: bool) -> Plan:
    n = max(1, x.shape[0])
    if all(k == "det" for k in kinds):
        return Plan("deterministic", 1, min(n, chunk_size or n), "nothing stochastic: one pass")
    if strategy == "loop" or (strategy == "auto" and coupled):
        why = "forced" if strategy == "loop" else "a BatchNorm uses batch statistics"
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


# ----------------------------------------------------------------------------- batched engine


class _Layout:
    """Rows of the current forward call: ``tc`` MC samples x ``nc`` examples, sample-major.

    A tensor whose leading dim is ``nc`` (and ``tc > 1``) is *shared*: the same for every MC
    sample, not yet widened.
    """

    def __init__(self, mode: str, costs: _Costs) -> None:
        self.mode = mode  # "repeat" | "lrt" | "auto"
        self.costs = costs
        self.tc = 1
        self.nc = 1
        self.seeds: list[int] | None = None  # per-row seeding: one generator seed per MC sample of the chunk
        self.device = torch.device("cpu")
        self._gens: list[torch.Generator | None] = []
        self._replay: list[list | None] = []  # per MC sample of the chunk: its cached draws, in draw order
        self._record: list[list] = []  # ... or the draws made now, in the same order
        self._pos: list[int] = []

    @property
    def seeded(self) -> bool:
        return self.seeds is not None

    def start(self, seeds: list[int] | None, device: torch.device, replay: list[list | None]) -> None:
        """A new forward call whose MC sample i draws from a generator seeded by ``seeds[i]``, or
        replays ``replay[i]`` (what that generator gave before, in draw order) when it is not None."""
        self.seeds, self.device = seeds, device
        n = len(seeds) if seeds is not None else 0
        self._gens, self._replay, self._record, self._pos = [None] * n, replay, [[] for _ in range(n)], [0] * n

    def recorded(self, i: int) -> list | None:
        """MC sample i's draws of the last forward call, when they were drawn rather than replayed."""
        return self._record[i] if self._replay[i] is None else None

    def sampled(self, i: int, make):
        """``make(generator)`` for MC sample i of the chunk: a sampled weight set or mask, drawn from
        sample i's own generator, or the identical tensor(s) replayed from the cache."""
        tape = self._replay[i]
        if tape is not None:
            self._pos[i] += 1
            return tape[self._pos[i] - 1]
        if self._gens[i] is None:
            self._gens[i] = torch.Generator(self.device).manual_seed(self.seeds[i])
        value = make(self._gens[i])
        self._record[i].append(value)
        return value

    def draw(self, fn, shape: tuple[int, ...], like: torch.Tensor, finish=None) -> torch.Tensor:
        """``finish(fn(...))`` (fn: torch.rand / torch.randn; finish: elementwise) of shape ``[tc, *shape]``;
        with per-row seeding, MC sample t's slice comes from its own generator, so it does not depend on
        the batch or the chunking."""
        kw = {"dtype": like.dtype, "device": like.device}
        if self.seeds is None:
            r = fn((self.tc, *shape), **kw)
            return r if finish is None else finish(r)

        def make(g: torch.Generator) -> torch.Tensor:
            r = fn(shape, generator=g, **kw)
            return r if finish is None else finish(r)

        return torch.stack([self.sampled(i, make) for i in range(self.tc)])

    def shared(self, t: torch.Tensor) -> bool:
        if self.tc == 1:
            return False
        if t.shape[0] == self.nc:
            return True
        if t.shape[0] == self.tc * self.nc:
            return False
        raise _LayoutError(f"unexpected batch dim {t.shape[0]} (nc={self.nc}, tc={self.tc})")

    def widen(self, t: torch.Tensor) -> torch.Tensor:
        if self.shared(t):
            return t.unsqueeze(0).expand(self.tc, *t.shape).reshape(self.tc * self.nc, *t.shape[1:])
        return t


class _LayoutError(RuntimeError):
    pass


class SampleCache:
    """The per-row-seeded draws (sampled weight sets, dropout masks) of one model, kept for reuse.

    With ``row_seed``, what MC sample t draws depends only on (row_seed, t), the model's parameters
    and the per-example input shape, never on the rows: a server can draw it once and replay it for
    every request. Replayed tensors are the very tensors drawn the first time, so answers with the
    cache equal answers without it, bit for bit. At most ``max_bytes`` are held: an MC sample whose
    draws do not fit is drawn anew on every call (a model too big for the cache is never cached).
    Any change to the model's parameters (or a dropout's p) empties the cache.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._tapes: dict[tuple, list] = {}
        self._stamp: tuple | None = None

    def __len__(self) -> int:  # MC samples held (per row seed and input shape)
        return len(self._tapes)

    def clear(self) -> None:
        self._tapes.clear()
        self.bytes = 0

    def check(self, model: nn.Module) -> None:
        """Empty the cache unless ``model`` and its parameters are those it was filled from."""
        stamp = (id(model), tuple((p.data_ptr(), p._version) for p in model.parameters()),
                 tuple(m.p for m in model.modules() if isinstance(m, _DROPOUT)))
        if stamp != self._stamp:
            self.clear()
            self._stamp = stamp

    def get(self, key: tuple) -> list | None:
        return self._tapes.get(key)

    def put(self, key: tuple, tape: list) -> None:
        size = sum(t.numel() * t.element_size() for entry in tape
                   for t in (entry if isinstance(entry, tuple) else (entry,)) if t is not None)
        if key not in self._tapes and self.bytes + size <= self.max_bytes:
            self._tapes[key] = tape
            self.bytes += size


def _sigma(log_sigma: torch.Tensor | None) -> torch.Tensor | None:
    return None if log_sigma is None else torch.exp(log_sigma)


def _dropout_forward(m: nn.Dropout, lay: _Layout):
    def forward(inp: torch.Tensor) -> torch.Tensor:
        if not m.training or m.p == 0:
            return inp
        if m.p >= 1:
            return torch.zeros_like(lay.widen(inp))
        scale = 1.0 / (1.0 - m.p)
        if lay.seeded:  # per-row seeding: sample t's mask is shared by every row of the batch
            mask = lay.draw(torch.rand, (1, *inp.shape[1:]), inp, lambda r: r.ge_(m.p).mul_(scale))
            rows = inp.unsqueeze(0) if lay.shared(inp) else inp.view(lay.tc, lay.nc, *inp.shape[1:])
            return (mask * rows).view(lay.tc * lay.nc, *inp.shape[1:])
        if lay.shared(inp):
            mask = torch.rand((lay.tc, *inp.shape), dtype=inp.dtype, device=inp.device)
            out = mask.ge_(m.p).mul_(scale).mul_(inp)
            return out.view(lay.tc * lay.nc, *inp.shape[1:])
        mask = torch.rand_like(inp)
        return mask.ge_(m.p).mul_(scale).mul_(inp)

    return forward


def _generic_dropout_forward(m: nn.Module, lay: _Layout):
    orig = type(m).forward

    def forward(inp: torch.Tensor) -> torch.Tensor:
        return orig(m, lay.widen(inp))

    return forward


def _bayes_linear_forward(m: nn.Module, lay: _Layout):
    mu, sigma = m.weight_mu, _sigma(m.weight_log_sigma)
    b_mu = m.bias_mu if m.bias else None
    b_sigma = _sigma(m.bias_log_sigma) if m.bias else None
    sigma2 = sigma * sigma
    b_sigma2 = None if b_sigma is None else b_sigma * b_sigma
    n_w = mu.numel()

    def use_lrt(rows_per_sample: int, shared: bool) -> bool:
        if lay.seeded:  # LRT draws noise per row: per-row seeding needs whole weight sets
            return False
        if lay.mode != "auto":
            return lay.mode == "lrt"
        return _lrt_cheaper(lay.costs, n_w, m.out_features, rows_per_sample,
                            lay.tc if shared else 1)

    def sample_weight(t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if lay.seeded:
            kw = {"dtype": mu.dtype, "device": mu.device}

            def make(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
                w = torch.randn(mu.shape, generator=g, **kw).mul_(sigma).add_(mu)
                b = None if b_mu is None else torch.randn(b_mu.shape, generator=g, **kw).mul_(b_sigma).add_(b_mu)
                return w, b

            return lay.sampled(t, make)
        w = torch.randn_like(mu).mul_(sigma).add_(mu)
        b = None if b_mu is None else torch.randn_like(b_mu).mul_(b_sigma).add_(b_mu)
        return w, b

    def forward(inp: torch.Tensor) -> torch.Tensor:
        shared = lay.shared(inp)
        tc, nc = lay.tc, lay.nc
        per_row = inp[0].numel() // m.in_features  # extra (non-batch) leading dims of F.linear
        if use_lrt(nc * per_row, shared):
            mean = F.linear(inp, mu, b_mu)
            std = F.linear(inp * inp, sigma2, b_sigma2).sqrt_()
            if shared:
                eps = torch.randn((tc, *mean.shape), dtype=mean.dtype, device=mean.device)
                return eps.mul_(std).add_(mean).view(tc * nc, *mean.shape[1:])
            return torch.randn_like(mean).mul_(std).add_(mean)
        # one weight set per MC sample, shared by that sample's rows (torchbnn's own sampling)
        out = inp.new_empty((tc, nc, *inp.shape[1:-1], m.out_features))
        xs = inp if shared else inp.reshape(tc, nc, *inp.shape[1:])
        for t in range(tc):
            w, b = sample_weight(t)
            x_t = xs if shared else xs[t]
            if x_t.dim() == 2 and b is not None:
                torch.addmm(b, x_t, w.t(), out=out[t])
            else:
                out[t] = F.linear(x_t, w, b)
        return out.view(tc * nc, *out.shape[2:])

    return forward


def _conv(m: nn.Module, inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
          groups: int) -> torch.Tensor:
    """torchbnn's BayesConv2d.conv2d_forward with the weight and bias given."""
    if m.padding_mode == "circular":
        pad = ((m.padding[1] + 1) // 2, m.padding[1] // 2, (m.padding[0] + 1) // 2, m.padding[0] // 2)
        return F.conv2d(F.pad(inp, pad, mode="circular"), w, b, m.stride, 0, m.dilation, groups)
    return F.conv2d(inp, w, b, m.stride, m.padding, m.dilation, groups)


def _bayes_conv_forward(m: nn.Module, lay: _Layout):
    mu, sigma = m.weight_mu, _sigma(m.weight_log_sigma)
    b_mu = m.bias_mu if m.bias else None
    b_sigma = _sigma(m.bias_log_sigma) if m.bias else None

    def forward(inp: torch.Tensor) -> torch.Tensor:
        shared = lay.shared(inp)
        tc, nc = lay.tc, lay.nc
        # one kernel set per MC sample (kernels are shared across positions: LRT is not exact)
        w = lay.draw(torch.randn, tuple(mu.shape), mu, lambda r: r.mul_(sigma).add_(mu))
        b = None
        if b_mu is not None:
            b = lay.draw(torch.randn, tuple(b_mu.shape), mu, lambda r: r.mul_(b_sigma).add_(b_mu))
        if shared and m.groups == 1:
            # all tc kernel sets in one convolution of the shared input
            y = _conv(m, inp, w.flatten(0, 1), None if b is None else b.flatten(), 1)
            y = y.view(nc, tc, m.out_channels, *y.shape[2:]).transpose(0, 1)
            return y.reshape(tc * nc, m.out_channels, *y.shape[3:])
        # sample-specific inputs: one grouped convolution, sample t's channels meet kernel set t
        x = lay.widen(inp)
        x = x.view(tc, nc, *x.shape[1:]).transpose(0, 1).reshape(nc, tc * x.shape[1], *x.shape[2:])
        y = _conv(m, x, w.flatten(0, 1), None if b is None else b.flatten(), tc * m.groups)
        y = y.view(nc, tc, m.out_channels, *y.shape[2:]).transpose(0, 1)
        return y.reshape(tc * nc, m.out_channels, *y.shape[3:])

    return forward


def _bayes_bn_forward(m: nn.Module, lay: _Layout):
    w_sigma, b_sigma = _sigma(m.weight_log_sigma), _sigma(m.bias_log_sigma)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        x = lay.widen(inp)
        m._check_input_dim(x)
        y = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        tc = lay.tc
        shape = (tc, 1, m.num_features) + (1,) * (y.dim() - 2)
        w = lay.draw(torch.randn, (m.num_features,), y, lambda r: r.mul_(w_sigma).add_(m.weight_mu)).view(shape)
        b = lay.draw(torch.randn, (m.num_features,), y, lambda r: r.mul_(b_sigma).add_(m.bias_mu)).view(shape)
        yv = y.view(tc, -1, *y.shape[1:])
        return yv.mul_(w).add_(b).view_as(y)

    return forward


@contextmanager
def _patched(model: nn.Module, lay: _Layout) -> Iterator[None]:
    """Give stochastic modules a forward that understands the engine's row layout."""
    patched: list[tuple[nn.Module, object]] = []
    try:
        for m in model.modules():
            if not _is_stochastic(m):
                continue
            if isinstance(m, _BAYES_LINEAR):
                fwd = _bayes_linear_forward(m, lay)
            elif isinstance(m, _BAYES_CONV):
                fwd = _bayes_conv_forward(m, lay)
            elif isinstance(m, _BAYES_BN):
                fwd = _bayes_bn_forward(m, lay)
            elif type(m) is nn.Dropout:
                fwd = _dropout_forward(m, lay)
            else:
                fwd = _generic_dropout_forward(m, lay)
            patched.append((m, m.__dict__.get("forward")))
            m.__dict__["forward"] = fwd  # instance attribute shadows the class's forward
        yield
    finally:
        for m, prev in patched:
            if prev is None:
                del m.__dict__["forward"]
            else:
                m.__dict__["forward"] = prev


def _run_batched(model: nn.Module, x: torch.Tensor, samples: int, plan: Plan,
                 eager: bool, row_seed: int | None = None, cache: SampleCache | None = None) -> torch.Tensor:
    n = x.shape[0]
    out: torch.Tensor | None = None
    lay = _Layout(plan.strategy, _machine_costs() if plan.strategy == "auto" else None)
    cache = cache if row_seed is not None else None
    keys: list[tuple] = []
    with _patched(model, lay):
        for n0 in range(0, n, plan.examples_per_chunk):
            xc = x[n0:n0 + plan.examples_per_chunk]
            nc = xc.shape[0]
            for t0 in range(0, samples, plan.samples_per_chunk):
                tc = min(plan.samples_per_chunk, samples - t0)
                lay.tc, lay.nc = tc, nc
                if row_seed is not None:  # MC sample t draws from (row_seed, t) in every chunk of rows
                    keys = [(row_seed, t, tuple(x.shape[1:]), x.dtype, x.device) for t in range(t0, t0 + tc)]
                    lay.start([row_seed * 1_000_003 + t for t in range(t0, t0 + tc)], x.device,
                              [cache.get(k) for k in keys] if cache is not None else [None] * tc)
                logits = model(lay.widen(xc) if eager else xc)
                if cache is not None:  # only a forward call that completed records its draws
                    for i, key in enumerate(keys):
                        tape = lay.recorded(i)
                        if tape:
                            cache.put(key, tape)
                if logits.shape[0] == nc and tc > 1:  # nothing stochastic was reached
                    logits = logits.unsqueeze(0).expand(tc, *logits.shape)
                else:
                    logits = logits.reshape(tc, nc, *logits.shape[1:])
                if out is None:
                    out = logits.new_empty((samples, n, *logits.shape[2:]))
                torch.log_softmax(logits, dim=-1, out=out[t0:t0 + tc, n0:n0 + nc])
    assert out is not None
    return out


# ----------------------------------------------------------------------------- public API


def _model_device(model: nn.Module, x: torch.Tensor) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return x.device


def _seeded(generator: torch.Generator | None):
    """All sampling draws from torch's global RNG; a given generator seeds it for the call."""
    if generator is None:
        return nullcontext()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    @contextmanager
    def ctx():
        devices = [generator.device] if generator.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    return ctx()


def mc_log_probs(model: nn.Module, x: torch.Tensor, samples: int, *, strategy: str = "auto",
                 chunk_size: int | None = None,
                 generator: torch.Generator | None = None, row_seed: int | None = None,
                 cache: SampleCache | None = None) -> torch.Tensor:
    """Log-softmax of ``samples`` Monte-Carlo forward passes: a ``[T, N, K]`` tensor.

    ``model(x)`` must return logits ``[N, K]`` and treat examples independently (in eval mode).
    The model runs in :func:`mc_mode` (only dropout stochastic; BatchNorm on running stats) and
    its modes are restored afterwards. ``strategy`` is one of :data:`STRATEGIES` (see the module
    docstring); every strategy draws from the same per-example predictive distribution.
    ``chunk_size`` bounds the rows (MC samples x examples) of one forward call; by default it
    comes from a memory model. ``generator`` makes the draws reproducible. ``row_seed`` makes each
    row's answer its own: MC sample t uses the same dropout masks and weights for every row, drawn
    from a generator seeded by (row_seed, t), so a row gets the same answer alone or in any batch, at
    any position (LRT is not used; the loop strategy and dropout types other than ``nn.Dropout``
    still draw per row). ``cache`` (with ``row_seed``) keeps those per-sample draws for the next call
    with the same seed and input shape (see :class:`SampleCache`). The result lives on
    the model's device; for a deterministic model it is one pass expanded T times (a view).
    """
    x = x.to(_model_device(model, x))
    n = x.shape[0]
    with _LOCK, torch.inference_mode(), mc_mode(model), _seeded(generator):
        if n == 0:
            one = torch.log_softmax(model(x), dim=-1)
            return one.unsqueeze(0).expand(samples, *one.shape)
        plan = mc_plan(model, x, samples, strategy=strategy, chunk_size=chunk_size)
        if plan.strategy == "deterministic":
            parts = [torch.log_softmax(model(x[i:i + plan.examples_per_chunk]), dim=-1)
                     for i in range(0, n, plan.examples_per_chunk)]
            one = torch.cat(parts, 0) if len(parts) != 1 else parts[0]
            return one.unsqueeze(0).expand(samples, *one.shape)
        if plan.strategy == "loop":
            chunks = [x[i:i + plan.examples_per_chunk] for i in range(0, n, plan.examples_per_chunk)]
            out = None
            for t in range(samples):
                lp = torch.cat([torch.log_softmax(model(c), dim=-1) for c in chunks], 0)
                if out is None:
                    out = lp.new_empty((samples, *lp.shape))
                out[t] = lp
            return out
        eager = model in _NEEDS_EAGER
        if cache is not None:
            cache.check(model)
        try:
            return _run_batched(model, x, samples, plan, eager, row_seed, cache)
        except (_LayoutError, RuntimeError):
            if eager:
                raise
            _NEEDS_EAGER.add(model)  # forward mixes shared and widened rows: widen up front
            return _run_batched(model, x, samples, plan, True, row_seed, cache)
