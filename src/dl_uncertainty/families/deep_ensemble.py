"""``model=deep_ensemble``: M independently initialised networks; each member is one MC sample."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import Family
from dl_uncertainty.families.losses import Mix, mixed_loss
from dl_uncertainty.families.networks import build_network, penultimate
from dl_uncertainty.families.outliers import with_outlier_term, with_outliers


class Ensemble(nn.Module):
    """M independently initialised members; their predictions are the ensemble's samples."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members])  # [M, N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # log of the mean member probability: a proper logit vector for the ensemble prediction
        log_probs = torch.log_softmax(self.member_logits(x), dim=-1)
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))


class DeepEnsemble(Family):
    name = "deep_ensemble"
    sampling = "members"

    def check(self, cfg: DictConfig) -> None:
        if cfg.ensemble_size < 1:
            raise UserError(f"model.ensemble_size must be >= 1, got {cfg.ensemble_size}")

    def build(self, cfg: DictConfig, feature_shape: list[int], num_classes: int) -> nn.Module:
        return Ensemble([build_network(cfg, feature_shape, num_classes, bayesian=False)
                         for _ in range(cfg.ensemble_size)])

    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig,
                   kl_w: float, mix: Mix | None = None) -> dict[str, torch.Tensor]:
        rows, n = with_outliers(model, x if mix is None else mix.x, cfg)
        all_logits = model.member_logits(rows)
        logits, members = all_logits[:, :n], all_logits.shape[0]
        partner = None if mix is None else Mix(mix.x, mix.y_partner.repeat(members), mix.lam)
        nll = mixed_loss(logits.reshape(-1, logits.shape[-1]).float(), y.repeat(members), partner,
                         cfg.train) * members  # sum of the members' mean losses: each learns as if alone
        return with_outlier_term({"loss": nll, "nll": nll / members}, all_logits[:, n:], cfg, scale=members)

    def sample(self, model: nn.Module, x: torch.Tensor, samples: int, *, strategy: str = "auto",
               seed: int | None = None, cache=None) -> torch.Tensor:
        """The members' log-softmax ``[M, N, K]`` (``samples`` does not apply: M is the sample count)."""
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            out = torch.log_softmax(model.member_logits(x).float(), dim=-1)
        model.train(was_training)
        return out

    def networks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.members)

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The members' penultimate features side by side."""
        return torch.cat([penultimate(member, x) for member in model.members], dim=1)


FAMILY = DeepEnsemble()
