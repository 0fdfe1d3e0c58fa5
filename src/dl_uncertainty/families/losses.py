"""The data term of every training objective: cross-entropy or focal loss, on mixed batches.

Label smoothing, focal loss and mixup/cutmix all act on the per-example loss, so the BNN's ELBO,
the MC-Dropout DNN and every ensemble member share them. With the defaults (``loss=ce``, no
mixing) the objective is ``F.cross_entropy`` exactly and no random numbers are drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dl_uncertainty.errors import UserError


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float, alpha: float = 1.0,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean of ``-alpha * sum_k q_k (1 - p_k)^gamma log p_k`` with q the (smoothed) one-hot target.

    For a one-hot target this is Lin et al.'s ``-alpha (1 - p_t)^gamma log p_t``; with gamma=0 and
    alpha=1 it is the cross-entropy with the same label smoothing.
    """
    log_p = F.log_softmax(logits, dim=-1)
    classes = logits.shape[-1]
    target = F.one_hot(y, classes).to(log_p.dtype) * (1 - label_smoothing) + label_smoothing / classes
    weight = (1 - log_p.exp()).clamp(min=0) ** gamma
    return -alpha * (target * weight * log_p).sum(-1).mean()


def data_loss(logits: torch.Tensor, y: torch.Tensor, cfg: DictConfig) -> torch.Tensor:
    """The configured per-batch data loss (``cfg`` is the ``train`` section)."""
    if cfg.loss == "focal":
        return focal_loss(logits, y, cfg.focal_gamma, cfg.focal_alpha, cfg.label_smoothing)
    return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)


@dataclass
class Mix:
    """A batch after mixup/cutmix: inputs, the partner labels and the share ``lam`` of the originals."""

    x: torch.Tensor
    y_partner: torch.Tensor
    lam: float


def mixed_loss(logits: torch.Tensor, y: torch.Tensor, mix: Mix | None, cfg: DictConfig) -> torch.Tensor:
    """``lam * loss(y) + (1 - lam) * loss(partner)``: the loss of the mixed target, since it is linear in it."""
    if mix is None or mix.lam == 1.0:
        return data_loss(logits, y, cfg)
    return mix.lam * data_loss(logits, y, cfg) + (1 - mix.lam) * data_loss(logits, mix.y_partner, cfg)


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator | None = None
               ) -> tuple[int, int, int, int]:
    """A box of area about ``(1 - lam) * H * W`` centred uniformly at random, clipped to the image."""
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = round(height * ratio), round(width * ratio)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    top, left = max(cy - cut_h // 2, 0), max(cx - cut_w // 2, 0)
    return top, min(cy + cut_h - cut_h // 2, height), left, min(cx + cut_w - cut_w // 2, width)


def cutmix(x: torch.Tensor, partner: torch.Tensor, image_shape: list[int], lam: float,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Paste a box of ``partner`` into ``x`` (flat rows of images); return them and the kept share."""
    channels, height, width = image_shape
    top, bottom, left, right = cutmix_box(height, width, lam, generator)
    images = x.reshape(len(x), channels, height, width).clone()
    images[:, :, top:bottom, left:right] = partner.reshape(images.shape)[:, :, top:bottom, left:right]
    return images.reshape(x.shape), 1 - (bottom - top) * (right - left) / (height * width)


def mix_batch(x: torch.Tensor, y: torch.Tensor, cfg: DictConfig, feature_shape: list[int]) -> Mix | None:
    """Mixup or cutmix of a batch with a shuffled copy of itself, as ``cfg`` (``train``) asks; None if not.

    One uniform draw per batch picks cutmix with probability ``cutmix_prob``, mixup with ``mixup_prob``,
    else nothing: the two never stack on one batch.
    """
    if cfg.mixup_prob <= 0 and cfg.cutmix_prob <= 0:
        return None
    if cfg.cutmix_prob > 0 and len(feature_shape) != 3:
        raise UserError(f"train.cutmix_prob needs image data [C, H, W], got features {feature_shape}; "
                        "set data.image_shape or use train.mixup_prob")
    draw = float(torch.rand(()))
    if draw >= cfg.cutmix_prob + cfg.mixup_prob:
        return None
    use_cutmix = draw < cfg.cutmix_prob
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    order = torch.randperm(len(x)).to(x.device)
    if not use_cutmix:
        return Mix(lam * x + (1 - lam) * x[order], y[order], lam)
    mixed, lam = cutmix(x, x[order], feature_shape, lam)
    return Mix(mixed, y[order], lam)
