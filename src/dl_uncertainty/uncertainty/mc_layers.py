"""The MC engine's forwards of stochastic modules: each sees the engine's row layout (``tc`` MC samples
x ``nc`` examples, see :class:`~dl_uncertainty.uncertainty.draws._Layout`) and draws what its samples
need, from the layout's seeded generators when rows must not depend on their batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dl_uncertainty.uncertainty.draws import _Layout
from dl_uncertainty.uncertainty.mc_plan import (
    _BAYES_BN,
    _BAYES_CONV,
    _BAYES_LINEAR,
    _is_stochastic,
    _lrt_cheaper,
)


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
            if shared:  # one matmul of the shared rows with all tc weight sets side by side
                y = F.linear(inp, w.flatten(0, 1), None if b is None else b.flatten())
                y = y.view(nc, *inp.shape[1:-1], tc, m.out_features).movedim(-2, 0)
                return y.reshape(tc * nc, *inp.shape[1:-1], m.out_features)
            x = inp.reshape(tc, nc * per_row, m.in_features)
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
