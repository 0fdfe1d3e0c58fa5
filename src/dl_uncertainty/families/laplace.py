"""``model=laplace``: a deterministic network with a Laplace posterior over its last linear layer.

The network is trained on the data loss alone. After training, at the best (MAP) weights, the last
layer's weights and bias ``theta`` get the posterior ``N(theta_MAP, (H + delta I)^-1)``: ``H`` is the
generalised Gauss-Newton matrix of the softmax likelihood (equal to its Fisher), summed over the
training split, either its diagonal or Kronecker-factored, ``H ~ N (G kron A)`` with ``A = E[a a^T]``
of the penultimate features ``a`` (a 1 appended for the bias) and ``G = E[diag(p) - p p^T]`` (Ritter
et al. 2018; Daxberger et al. 2021, "Laplace Redux"). The prior precision ``delta`` is given, or fitted
by the Laplace evidence on the training split or by a grid search of the validation NLL. The
curvature is that of softmax cross-entropy whatever ``train.loss`` was, and the network runs in eval
mode (configured dropout is off: the posterior is the only source of samples).

Weights are laid out ``[K, F + 1]`` (class rows, bias last). Both structures are stored alike, as
``U_out``, ``U_in`` and ``variance`` with covariance ``(U_out kron U_in) diag(variance) (...)^T``:
identities for ``diag``, the eigenvectors of ``G`` and ``A`` for ``kron``. All are buffers, sized at
build time, so the bundle's state_dict restores the posterior into a fresh build.

Links: ``mc`` draws T last-layer weight sets over features computed once; weight set t comes from a
generator seeded by (seed, t) and is shared by every row, so a row's answer does not depend on its
batch. ``probit`` is MacKay's (1992) probit approximation of the predictive: one deterministic
distribution, repeated T times. Its samples never disagree, so its mutual information is 0 and all
of its uncertainty shows as entropy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import Family
from dl_uncertainty.families.networks import build_network, last_linear, penultimate

if TYPE_CHECKING:
    from dl_uncertainty.data.splits import Split

HESSIANS, LINKS, PRIOR_FITS = ("diag", "kron"), ("mc", "probit"), ("marglik", "val_nll", "none")
VAL_GRID = torch.logspace(-4, 4, 41, dtype=torch.float64)  # prior precisions tried by val_nll
FIT_BATCH = 1024


class LastLayerLaplace(nn.Module):
    """The trained network plus the Gaussian posterior of its last layer (zero variance until fitted)."""

    def __init__(self, net: nn.Module, hessian: str, link: str):
        super().__init__()
        self.net, self.hessian, self.link = net, hessian, link
        layer = last_linear(net)
        classes, inputs = layer.out_features, layer.in_features + 1
        self.register_buffer("basis_out", torch.eye(classes))
        self.register_buffer("basis_in", torch.eye(inputs))
        self.register_buffer("variance", torch.zeros(classes, inputs))
        self.register_buffer("prior_precision", torch.zeros(()))  # the delta fitted with; 0: not fitted

    @property
    def fitted(self) -> bool:
        return bool(self.prior_precision > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # the MAP logits: what training optimises

    def weights(self) -> torch.Tensor:
        """The last layer's MAP weights and bias as one ``[K, F + 1]`` matrix."""
        layer = last_linear(self.net)
        return torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach()

    def covariance(self) -> torch.Tensor:
        """The dense posterior covariance over the ``[K, F + 1]`` weights, flattened row-major."""
        basis = torch.kron(self.basis_out, self.basis_in)
        return basis @ torch.diag(self.variance.flatten()) @ basis.T


def augmented(features: torch.Tensor) -> torch.Tensor:
    return torch.cat([features, torch.ones_like(features[:, :1])], dim=1)


def split_features(model: LastLayerLaplace, x: np.ndarray) -> torch.Tensor:
    """Augmented penultimate features of every row of ``x`` (a memory-mapped x is read in batches)."""
    device = next(model.parameters()).device
    parts = [augmented(penultimate(model.net, torch.as_tensor(np.asarray(x[i:i + FIT_BATCH], np.float32),
                                                                device=device)))
             for i in range(0, len(x), FIT_BATCH)]
    return torch.cat(parts).double()


def curvature(a: torch.Tensor, probs: torch.Tensor, hessian: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_out, U_in, eigenvalues [K, F+1])`` of the summed last-layer GGN, diag or Kronecker-factored."""
    n, classes = probs.shape
    if hessian == "diag":  # diag of sum_n Lambda_n kron a_n a_n^T: p_k (1 - p_k) a_j^2
        h = (probs * (1 - probs)).T @ (a * a)
        return torch.eye(classes, dtype=a.dtype), torch.eye(a.shape[1], dtype=a.dtype), h
    g = (torch.diag(probs.sum(0)) - probs.T @ probs) / n
    eig_g, u_out = torch.linalg.eigh(g)
    eig_a, u_in = torch.linalg.eigh(a.T @ a / n)
    return u_out, u_in, n * eig_g.clamp_min(0)[:, None] * eig_a.clamp_min(0)[None, :]


def marglik_prior_precision(eig: torch.Tensor, theta_sq: float, steps: int = 500) -> float:
    """The delta maximising the Laplace log evidence, which depends on it through
    ``-delta |theta|^2 / 2 + P log(delta) / 2 - sum log(eig + delta) / 2``: MacKay's fixed point
    delta = gamma / |theta|^2, gamma = sum eig / (eig + delta) (the parameters the data determine)."""
    delta = 1.0
    for _ in range(steps):
        new = max(float((eig / (eig + delta)).sum()) / theta_sq, 1e-8)
        if abs(new - delta) <= 1e-10 * delta:
            return new
        delta = new
    return delta


def set_posterior(model: LastLayerLaplace, basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  delta: float) -> None:
    u_out, u_in, eig = basis
    model.basis_out.copy_(u_out)
    model.basis_in.copy_(u_in)
    model.variance.copy_(1.0 / (eig + delta))
    model.prior_precision.fill_(delta)


def sample_logits(model: LastLayerLaplace, a: torch.Tensor, samples: int, seed: int | None) -> torch.Tensor:
    """Logits ``[T, N, K]`` of T last-layer weight draws for augmented features ``a``."""
    classes, inputs = model.variance.shape
    shape, kw = (classes, inputs), {"dtype": a.dtype, "device": a.device}
    if seed is None:
        eps = torch.randn((samples, *shape), **kw)
    else:  # weight set t from (seed, t), as the MC engine seeds its per-row draws
        eps = torch.stack([torch.randn(shape, generator=torch.Generator(a.device).manual_seed(seed * 1_000_003 + t),
                                       **kw) for t in range(samples)])
    noise = torch.einsum("nj,tkj->tnk", a @ model.basis_in, eps * model.variance.sqrt()) @ model.basis_out.T
    return a @ model.weights().T + noise


def probit_log_probs(model: LastLayerLaplace, a: torch.Tensor) -> torch.Tensor:
    """log softmax(mu_k / sqrt(1 + pi/8 var_k)): MacKay's probit approximation, per-class logit variance."""
    b = a @ model.basis_in
    var = ((b * b) @ model.variance.T) @ (model.basis_out**2).T  # diag of U_out diag(c) U_out^T per row
    return torch.log_softmax(a @ model.weights().T / torch.sqrt(1 + math.pi / 8 * var), dim=-1)


def predictive_log_probs(model: LastLayerLaplace, a: torch.Tensor, samples: int, seed: int | None) -> torch.Tensor:
    if model.link == "probit":
        return probit_log_probs(model, a).expand(samples, -1, -1)
    return torch.log_softmax(sample_logits(model, a, samples, seed), dim=-1)


def val_prior_precision(model: LastLayerLaplace, basis, val: Split, samples: int, seed: int) -> float:
    """The delta on :data:`VAL_GRID` with the lowest validation NLL of the predictive (fixed MC seed)."""
    a = split_features(model, val.x).float()
    y = torch.as_tensor(val.y, dtype=torch.long, device=a.device)
    best, best_nll = float(VAL_GRID[0]), math.inf
    for delta in VAL_GRID.tolist():
        set_posterior(model, basis, delta)
        log_probs = predictive_log_probs(model, a, samples, seed)
        nll = float(-(torch.logsumexp(log_probs[:, torch.arange(len(y)), y], 0) - math.log(samples)).mean())
        if nll < best_nll:
            best, best_nll = delta, nll
    return best


class Laplace(Family):
    name = "laplace"
    sampling = "own"

    def check(self, cfg: DictConfig) -> None:
        for key, allowed in (("hessian", HESSIANS), ("link", LINKS), ("prior_precision_fit", PRIOR_FITS)):
            if cfg[key] not in allowed:
                raise UserError(f"model.{key}={cfg[key]!r} is not one of {', '.join(allowed)}")
        if not (math.isfinite(cfg.prior_precision) and cfg.prior_precision > 0):
            raise UserError(f"model.prior_precision must be a number > 0, got {cfg.prior_precision}")

    def build(self, cfg: DictConfig, feature_shape: list[int], num_classes: int) -> nn.Module:
        return LastLayerLaplace(build_network(cfg, feature_shape, num_classes, bayesian=False), cfg.hessian, cfg.link)

    def sample(self, model: nn.Module, x: torch.Tensor, samples: int, *, strategy: str = "auto",
               seed: int | None = None, cache=None) -> torch.Tensor:
        """``[T, N, K]``: the MAP network's prediction until the posterior is fitted (training's
        validation passes), then the ``model.link`` predictive. ``strategy`` does not apply."""
        with torch.inference_mode():
            features = penultimate(model.net, x)
            if not model.fitted:
                layer = last_linear(model.net)
                logits = F.linear(features, layer.weight, layer.bias)
                return torch.log_softmax(logits, -1).expand(samples, -1, -1)
            return predictive_log_probs(model, augmented(features), samples, seed)

    def after_training(self, model: nn.Module, train: Split, val: Split, cfg: DictConfig) -> None:
        """Fit the posterior at the loaded best weights: curvature on train, then the prior precision."""
        m = cfg.model
        with torch.inference_mode():
            a = split_features(model, train.x)
            probs = torch.softmax(a @ model.weights().double().T, dim=-1)
            basis = curvature(a, probs, model.hessian)
            if m.prior_precision_fit == "marglik":
                delta = marglik_prior_precision(basis[2], float(model.weights().double().pow(2).sum()))
            elif m.prior_precision_fit == "val_nll":
                if len(val.y) == 0:
                    raise UserError("model.prior_precision_fit=val_nll needs a validation split (data.val_fraction > 0)")
                delta = val_prior_precision(model, basis, val, cfg.evaluate.mc_samples, cfg.seed)
            else:
                delta = float(m.prior_precision)
            set_posterior(model, basis, delta)

    def networks(self, model: nn.Module) -> list[nn.Module]:
        return [model.net]

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return penultimate(model.net, x)


FAMILY = Laplace()
