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

Per-row seeding (``row_seed``): MC sample t draws from a generator seeded by (row_seed, t), and its
draws are shared by every row, so a row's answer does not depend on its batch. Dropout draws one mask
per sample; ``BayesLinear`` on 2-D inputs (under ``"auto"`` and ``"lrt"``) draws one noise vector per
sample and output unit and applies it by local reparameterization: each row's pre-activation is
exactly its Gaussian, and the batch cannot change it. Under ``"repeat"`` (and on inputs with extra
dims) it draws whole weight sets, stacked ``[T, out, in]``, one batched matmul per layer. Those draws
can be kept in a :class:`SampleCache` and replayed: a cached BNN then reads T noise vectors per layer
(T x out floats) instead of T weight sets (T x out x in).

Two exact savings apply to every batched strategy: (1) everything before the first stochastic
module is computed once per example, not once per MC sample — modules see the un-repeated
batch until a stochastic module widens it to ``T_chunk * N_chunk`` rows; (2) dropout masks come
from ``rand >= p`` (Bernoulli(1-p) to float32 resolution, like ``torch.bernoulli``), which is
~2.5x cheaper on CPU than ``F.dropout``'s ``bernoulli_``. If a model's forward cannot take the
un-repeated batch next to a widened one (e.g. it concatenates both), the engine repeats the input
up front instead.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from dl_uncertainty.uncertainty.draws import SampleCache, _Layout, _LayoutError
from dl_uncertainty.uncertainty.mc_layers import _patched
from dl_uncertainty.uncertainty.mc_plan import (
    Plan,
    _machine_costs,
    mc_mode,
    mc_plan,
)

_LOCK = threading.RLock()  # module forwards are patched while sampling: one sampler at a time
_NEEDS_EAGER: weakref.WeakSet = weakref.WeakSet()  # models whose forward rejects lazy widening


# ----------------------------------------------------------------------------- batched engine


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
                    cache.put_all([(key, lay.recorded(i)) for i, key in enumerate(keys)])
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
                 deterministic: bool = False, cache: SampleCache | None = None) -> torch.Tensor:
    """Log-softmax of ``samples`` Monte-Carlo forward passes: a ``[T, N, K]`` tensor.

    ``model(x)`` must return logits ``[N, K]`` and treat examples independently (in eval mode).
    The model runs in :func:`mc_mode` (only dropout stochastic; BatchNorm on running stats) and
    its modes are restored afterwards. ``strategy`` is one of :data:`STRATEGIES` (see the module
    docstring); every strategy draws from the same per-example predictive distribution.
    ``chunk_size`` bounds the rows (MC samples x examples) of one forward call; by default it
    comes from a memory model. ``generator`` makes the draws reproducible. ``row_seed`` makes each
    row's answer its own: MC sample t uses the same dropout masks and Bayesian noise (a noise vector
    per ``BayesLinear``, whole weight sets under ``"repeat"``) for every row, drawn from a generator
    seeded by (row_seed, t), so a row gets the same answer alone or in any batch, at any position
    (the loop strategy and dropout types other than ``nn.Dropout`` still draw per row). ``cache`` (with ``row_seed``) keeps those per-sample draws for the next call
    with the same seed and input shape (see :class:`SampleCache`). ``deterministic=True`` declares
    that one pass is every sample: the result is then that pass expanded T times (a view). Without
    it, a model the engine finds nothing stochastic in is run T times (see :func:`mc_plan`). The
    result lives on the model's device.
    """
    x = x.to(_model_device(model, x))
    n = x.shape[0]
    with _LOCK, torch.inference_mode(), mc_mode(model), _seeded(generator):
        if n == 0:
            one = torch.log_softmax(model(x), dim=-1)
            return one.unsqueeze(0).expand(samples, *one.shape)
        plan = mc_plan(model, x, samples, strategy=strategy, chunk_size=chunk_size, deterministic=deterministic)
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
