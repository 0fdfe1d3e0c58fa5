"""The contract every model family keeps, and the two functions the rest of the core needs from it.

A family says how its network is built (``build``), what it is trained on (``loss_terms``), how its
predictive distribution is sampled (``sample``: MC passes through the engine, its members, or its
own sampler), what happens after training (``after_training``, ``epoch_end``), and what its
penultimate features are (``features``). Everything else (training loop, evaluation, calibration,
serving, reports, the pipeline) goes through :func:`family_of` / :func:`build_model` and never asks
which family it holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from dl_uncertainty.families.losses import Mix, mixed_loss
from dl_uncertainty.families.networks import build_network, penultimate
from dl_uncertainty.families.outliers import with_outlier_term, with_outliers
from dl_uncertainty.families.registry import get_family
from dl_uncertainty.uncertainty.draws import SampleCache
from dl_uncertainty.uncertainty.engine import mc_log_probs

if TYPE_CHECKING:
    from dl_uncertainty.data.splits import Split

FAMILY_ATTR = "dlu_family"  # set on every built model: which family's contract it follows


class Family:
    """Defaults: one network from ``model.arch``, the data loss alone, sampled by the MC engine."""

    name: ClassVar[str] = "network"
    #: How ``sample`` draws: "engine" (the MC engine patches its stochastic modules), "members"
    #: (each member is one sample) or "own" (the family draws its own weights).
    sampling: ClassVar[str] = "engine"
    #: True only when one forward pass is every MC sample. The engine never assumes it.
    deterministic: ClassVar[bool] = False

    def check(self, cfg: DictConfig) -> None:
        """Family-specific value checks on ``cfg.model`` (raise ``UserError`` naming the key)."""

    def build(self, cfg: DictConfig, feature_shape: list[int], num_classes: int) -> nn.Module:
        return build_network(cfg, feature_shape, num_classes, bayesian=False)

    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig,
                   kl_w: float, mix: Mix | None = None) -> dict[str, torch.Tensor]:
        """The training objective ``loss`` and its parts for one batch (``mix``: after mixup/cutmix)."""
        rows, n = with_outliers(model, x if mix is None else mix.x, cfg)
        logits = model(rows).float()
        nll = mixed_loss(logits[:n], y, mix, cfg.train)
        return with_outlier_term({"loss": nll, "nll": nll}, logits[n:], cfg)

    def sample(self, model: nn.Module, x: torch.Tensor, samples: int, *, strategy: str = "auto",
               seed: int | None = None, cache: SampleCache | None = None) -> torch.Tensor:
        """Per-sample log-softmax ``[T, N, K]`` for one batch; with ``seed``, each row's answer is its
        own, and ``cache`` may keep the seeded draws for the next call (the same answers, drawn once)."""
        return mc_log_probs(model, x, samples, strategy=strategy, row_seed=seed,
                            deterministic=self.deterministic, cache=cache)

    def epoch_end(self, model: nn.Module, epoch: int, cfg: DictConfig) -> None:
        """Called after every training epoch with the current weights (e.g. to collect SWA moments)."""

    def after_training(self, model: nn.Module, train: Split, val: Split, cfg: DictConfig) -> None:
        """Called once with the best weights loaded (e.g. to fit a posterior around them)."""

    def networks(self, model: nn.Module) -> list[nn.Module]:
        """The networks an explanation (Grad-CAM) averages over."""
        return [model]

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, F]``: the input of the last linear layer, in eval mode."""
        return penultimate(model, x)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[M, N, K]`` of the point estimate, one per network (eval mode: no dropout), for the energy score."""
        out = []
        for net in self.networks(model):
            was_training = net.training
            net.eval()
            with torch.inference_mode():
                out.append(net(x).float())
            net.train(was_training)
        return torch.stack(out)


def family_of(model: nn.Module) -> Family:
    """The family a built model belongs to; any other network is sampled by the engine as it is."""
    name = getattr(model, FAMILY_ATTR, None)
    return _ANY_NETWORK if name is None else get_family(name)


def build_model(model_cfg: DictConfig, feature_shape: list[int], num_classes: int) -> nn.Module:
    """Build ``model_cfg.name`` for these inputs and classes, after its family's value checks."""
    family = get_family(model_cfg.name)
    family.check(model_cfg)
    model = family.build(model_cfg, feature_shape, num_classes)
    setattr(model, FAMILY_ATTR, family.name)
    return model


_ANY_NETWORK = Family()
