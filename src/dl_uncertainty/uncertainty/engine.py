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

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from dl_uncertainty.uncertainty.draws import SampleCache, _Layout, _LayoutError
from dl_uncertainty.uncertainty.mc_plan import (
    _BAYES_BN,
    _BAYES_CONV,
    _BAYES_LINEAR,
    Plan,
    _is_stochastic,
    _lrt_cheaper,
    _machine_costs,
    mc_mode,
    mc_plan,
)

_LOCK = threading.RLock()  # module forwards are patched while sampling: one sampler at a time
_NEEDS_EAGER: weakref.WeakSet = weakref.WeakSet()  # models whose forward rejects lazy widening


# ----------------------------------------------------------------------------- batched engine







def _lazy(fn):
    """``fn()`` computed on first use: a replayed weight set needs no sigma (an exp over every weight)."""
    box: list = []

    def get():
        if not box:
            box.append(fn())
        return box[0]

    return get


def _sigmas(m: nn.Module):
    """Lazy (weight sigma, bias sigma or None) of a torchbnn layer."""
    return _lazy(lambda: (torch.exp(m.weight_log_sigma),
                          torch.exp(m.bias_log_sigma) if m.bias else None))


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
    mu, b_mu = m.weight_mu, (m.bias_mu if m.bias else None)
    sigmas = _sigmas(m)
    squares = _lazy(lambda: tuple(None if s is None else s * s for s in sigmas()))
    n_w = mu.numel()

    def use_lrt(rows_per_sample: int, shared: bool) -> bool:
        if lay.mode != "auto":
            return lay.mode == "lrt"
        return _lrt_cheaper(lay.costs, n_w, m.out_features, rows_per_sample,
                            lay.tc if shared else 1)

    def sample(g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        sigma, b_sigma = sigmas()
        w = torch.randn(mu.shape, generator=g, dtype=mu.dtype, device=mu.device).mul_(sigma).add_(mu)
        if b_mu is None:
            return w, None
        return w, torch.randn(b_mu.shape, generator=g, dtype=mu.dtype, device=mu.device).mul_(b_sigma).add_(b_mu)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        shared = lay.shared(inp)
        tc, nc = lay.tc, lay.nc
        per_row = inp[0].numel() // m.in_features  # extra (non-batch) leading dims of F.linear
        if lay.seeded and per_row == 1 and lay.mode != "repeat":
            # local reparameterization with one noise vector per MC sample, drawn from (row_seed, t) and
            # shared by every row: each row's pre-activation is exactly N(x mu + b_mu, x^2 sigma^2 + b_sigma^2)
            # and does not depend on the batch; only whole weight sets would also tie rows together
            eps = lay.draw(torch.randn, (m.out_features,), mu).unsqueeze(1)
            sigma2, b_sigma2 = squares()
            mean = F.linear(inp, mu, b_mu)
            std = F.linear(inp * inp, sigma2, b_sigma2).sqrt_()
            if not shared:
                mean, std = mean.view(tc, nc, -1), std.view(tc, nc, -1)
            return torch.addcmul(mean, eps, std).view(tc * nc, m.out_features)
        if lay.seeded:  # the tc weight sets as one stack: one batched matmul for the chunk
            w, b = lay.stacked(sample)
            x = inp.reshape(1, nc * per_row, m.in_features).expand(tc, -1, -1) if shared else \
                inp.reshape(tc, nc * per_row, m.in_features)
            y = torch.bmm(x, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            return y.view(tc * nc, *inp.shape[1:-1], m.out_features)
        if use_lrt(nc * per_row, shared):
            sigma2, b_sigma2 = squares()
            mean = F.linear(inp, mu, b_mu)
            std = F.linear(inp * inp, sigma2, b_sigma2).sqrt_()
            if shared:
                eps = torch.randn((tc, *mean.shape), dtype=mean.dtype, device=mean.device)
                return eps.mul_(std).add_(mean).view(tc * nc, *mean.shape[1:])
            return torch.randn_like(mean).mul_(std).add_(mean)
        # one weight set per MC sample, shared by that sample's rows (torchbnn's own sampling), drawn one
        # at a time so memory stays at one weight set
        out = inp.new_empty((tc, nc, *inp.shape[1:-1], m.out_features))
        xs = inp if shared else inp.reshape(tc, nc, *inp.shape[1:])
        for t in range(tc):
            w, b = sample()
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
    mu, b_mu = m.weight_mu, (m.bias_mu if m.bias else None)
    sigmas = _sigmas(m)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        shared = lay.shared(inp)
        tc, nc = lay.tc, lay.nc
        # one kernel set per MC sample (kernels are shared across positions: LRT is not exact)
        w = lay.draw(torch.randn, tuple(mu.shape), mu, lambda r: r.mul_(sigmas()[0]).add_(mu))
        b = None
        if b_mu is not None:
            b = lay.draw(torch.randn, tuple(b_mu.shape), mu, lambda r: r.mul_(sigmas()[1]).add_(b_mu))
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
    sigmas = _lazy(lambda: (torch.exp(m.weight_log_sigma), torch.exp(m.bias_log_sigma)))

    def forward(inp: torch.Tensor) -> torch.Tensor:
        x = lay.widen(inp)
        m._check_input_dim(x)
        y = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        tc = lay.tc
        shape = (tc, 1, m.num_features) + (1,) * (y.dim() - 2)
        w = lay.draw(torch.randn, (m.num_features,), y, lambda r: r.mul_(sigmas()[0]).add_(m.weight_mu)).view(shape)
        b = lay.draw(torch.randn, (m.num_features,), y, lambda r: r.mul_(sigmas()[1]).add_(m.bias_mu)).view(shape)
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
    row's answer its own: MC sample t uses the same dropout masks and weights for every row, drawn
    from a generator seeded by (row_seed, t), so a row gets the same answer alone or in any batch, at
    any position (LRT is not used; the loop strategy and dropout types other than ``nn.Dropout``
    still draw per row). ``cache`` (with ``row_seed``) keeps those per-sample draws for the next call
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
