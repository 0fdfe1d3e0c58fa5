"""Outlier exposure (Hendrycks et al. 2019) with synthetic outliers made from the training batch.

Each training step may add outlier rows to the batch and push their predictions toward the uniform
distribution, so inputs unlike any training image get a high predictive entropy. The outliers are
the batch's own images with their structure destroyed, three ways chosen per row:

- ``permuted``: the image's pixels shuffled to random positions (same pixel values, no shape);
- ``jigsaw``: the image cut into a 4x4 grid of tiles put back in random order (local strokes, no shape);
- ``smeared``: the average of two different images, box-blurred over a quarter of the image side.

None of them is one of the generated far-OOD kinds evaluation reports (``uncertainty.far_ood``:
uniform noise, blobs, inverted images, constants, zoomed patches), so those stay a fair test.
``model.outlier_exposure`` weighs the term; 0 (the default outside image recipes) turns it off;
``model.outlier_kinds`` lists the generators used (all three unless a recipe says otherwise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from dl_uncertainty.families.networks import image_shape_of

TILES = 4  # jigsaw grid per side


def _permuted(images: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = images.shape
    flat = images.reshape(batch, channels, height * width)
    order = torch.rand(batch, height * width, device=images.device).argsort(dim=1)
    return flat.gather(2, order[:, None, :].expand(-1, channels, -1)).reshape(images.shape)


def _jigsaw(images: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = images.shape
    th, tw = height // TILES, width // TILES
    if th == 0 or tw == 0:
        return _permuted(images)
    core = images[:, :, : th * TILES, : tw * TILES]
    tiles = core.reshape(batch, channels, TILES, th, TILES, tw).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(batch, TILES * TILES, channels, th, tw)
    order = torch.rand(batch, TILES * TILES, device=images.device).argsort(dim=1)
    tiles = tiles[torch.arange(batch, device=images.device)[:, None], order]
    tiles = tiles.reshape(batch, TILES, TILES, channels, th, tw).permute(0, 3, 1, 4, 2, 5)
    out = images.clone()
    out[:, :, : th * TILES, : tw * TILES] = tiles.reshape(batch, channels, th * TILES, tw * TILES)
    return out


def _smeared(images: torch.Tensor) -> torch.Tensor:
    _, channels, height, width = images.shape
    mixed = 0.5 * (images + images.roll(1, dims=0))
    k = max(3, (min(height, width) // 4) | 1)  # odd kernel, a quarter of the side
    kernel = torch.full((channels, 1, k, k), 1.0 / (k * k), device=images.device, dtype=images.dtype)
    return F.conv2d(F.pad(mixed, [k // 2] * 4, mode="replicate"), kernel, groups=channels)


KINDS = {"permuted": _permuted, "jigsaw": _jigsaw, "smeared": _smeared}


def synthetic_outliers(x: torch.Tensor, shape: list[int], count: int,
                       kinds: tuple[str, ...] = tuple(KINDS)) -> torch.Tensor:
    """``count`` outlier rows made from the flat image rows ``x`` [B, C*H*W], each of one of ``kinds``
    chosen at random (see the module doc)."""
    pick = torch.randint(len(x), (count,)).to(x.device)
    images = x[pick].reshape(count, *shape)
    kind = torch.randint(len(kinds), (count,)).to(x.device)[:, None, None, None]
    made = [KINDS[name](images) for name in kinds]
    out = made[-1]
    for i in range(len(kinds) - 2, -1, -1):
        out = torch.where(kind == i, made[i], out)
    return out.reshape(count, -1)


def outlier_kinds(cfg: DictConfig) -> tuple[str, ...]:
    """``model.outlier_kinds`` (checked with the config): which generators make the training outliers."""
    return tuple(cfg.get("outlier_kinds") or KINDS)


def with_outliers(model: nn.Module, x: torch.Tensor, cfg: DictConfig) -> tuple[torch.Tensor, int]:
    """The batch to forward: ``x`` and, with ``model.outlier_exposure > 0`` on image data, outlier
    rows after it; and how many rows are in-distribution."""
    weight = cfg.model.get("outlier_exposure", 0.0)
    shape = image_shape_of(model)
    if not weight or shape is None or len(x) < 2:
        return x, len(x)
    count = max(1, math.ceil(cfg.model.get("outlier_share", 0.5) * len(x)))
    return torch.cat([x, synthetic_outliers(x.detach(), shape, count, outlier_kinds(cfg.model))]), len(x)


def uniform_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the predictions to the uniform distribution, minus its minimum log K (>= 0)."""
    if logits.shape[-2] == 0:
        return logits.new_zeros(())
    return -F.log_softmax(logits.float(), dim=-1).mean(-1).mean() - math.log(logits.shape[-1])


def with_outlier_term(terms: dict[str, torch.Tensor], outlier_logits: torch.Tensor, cfg: DictConfig,
                      scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``terms`` with ``scale * model.outlier_exposure * uniform_loss`` added to the loss (when on)."""
    if outlier_logits.shape[-2] == 0:
        return terms
    oe = uniform_loss(outlier_logits)
    return {**terms, "loss": terms["loss"] + scale * cfg.model.outlier_exposure * oe, "outlier": oe}
