"""``model=bnn``: a Bayesian network of torchbnn's mean-field Gaussian layers, trained by the ELBO.

MC samples are weight draws, made by the engine (one weight set per sample, or the local
reparameterisation trick where it is exact and cheaper).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torchbnn
from omegaconf import DictConfig
from torch import nn

from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import Family
from dl_uncertainty.families.losses import Mix, mixed_loss
from dl_uncertainty.families.networks import bayesian_head, build_network, penultimate
from dl_uncertainty.families.outliers import with_outlier_term, with_outliers

BAYES_LAYERS = (torchbnn.BayesLinear, torchbnn.BayesConv2d)


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """KL(q || p) summed over every Bayesian weight and bias (the ELBO's KL, not torchbnn's mean)."""
    return torchbnn.functional.bayesian_kl_loss(model, reduction="sum", last_layer_only=False)


def init_posterior_scale(model: nn.Module, log_sigma: float) -> None:
    # torchbnn starts the posterior at log(prior_sigma): with a wide prior the first epochs
    # are pure noise. Starting near-deterministic lets the data speak first.
    for module in model.modules():
        if isinstance(module, BAYES_LAYERS):
            nn.init.constant_(module.weight_log_sigma, log_sigma)
            if getattr(module, "bias_log_sigma", None) is not None:
                nn.init.constant_(module.bias_log_sigma, log_sigma)


@contextmanager
def posterior_mean(model: nn.Module):
    """Every Bayesian weight at its posterior mean (sigma 0) inside the block. Zero-sigma copies are
    swapped in and the trained parameters put back untouched, so a served model's sample cache,
    keyed on those parameters, stays valid."""
    swapped = []
    for module in model.modules():
        if isinstance(module, BAYES_LAYERS):
            for name in ("weight_log_sigma", "bias_log_sigma"):
                param = module._parameters.get(name)
                if param is not None:
                    swapped.append((module, name, param))
                    module._parameters[name] = nn.Parameter(torch.full_like(param, -math.inf), requires_grad=False)
    try:
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


class BNN(Family):
    name = "bnn"

    def check(self, cfg: DictConfig) -> None:
        if cfg.get("spectral_norm"):
            raise UserError("model.spectral_norm applies to deterministic networks, not the BNN's torchbnn "
                            "layers; set model.spectral_norm=null")
        if cfg.prior_sigma <= 0:
            raise UserError(f"model.prior_sigma must be > 0, got {cfg.prior_sigma}")
        if cfg.kl_weight < 0:
            raise UserError(f"model.kl_weight must be >= 0, got {cfg.kl_weight}")
        if cfg.get("bayesian_layers", "all") not in ("all", "head", "last"):
            raise UserError(f"model.bayesian_layers must be all, head or last, got {cfg.bayesian_layers!r}")
        if cfg.kl_anneal_epochs < 0:
            raise UserError("model.kl_anneal_epochs must be >= 0")

    def build(self, cfg: DictConfig, feature_shape: list[int], num_classes: int) -> nn.Module:
        layers = cfg.get("bayesian_layers", "all")
        if layers != "all":
            model = bayesian_head(build_network(cfg, feature_shape, num_classes, bayesian=False), cfg,
                                  last_only=layers == "last")
        else:
            model = build_network(cfg, feature_shape, num_classes, bayesian=True)
        init_posterior_scale(model, cfg.posterior_log_sigma_init)
        return model

    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig,
                   kl_w: float, mix: Mix | None = None) -> dict[str, torch.Tensor]:
        """The ELBO: the data term of every family plus the summed KL, weighted by ``kl_w``."""
        rows, n = with_outliers(model, x if mix is None else mix.x, cfg)
        logits = model(rows).float()
        nll = mixed_loss(logits[:n], y, mix, cfg.train)
        kl = kl_divergence(model).squeeze()
        return with_outlier_term({"loss": nll + kl_w * kl, "nll": nll, "kl": kl}, logits[n:], cfg)

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features at the posterior mean: one deterministic answer per input."""
        with posterior_mean(model):
            return penultimate(model, x)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with posterior_mean(model):
            return super().logits(model, x)


FAMILY = BNN()
