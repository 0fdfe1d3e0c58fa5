"""Learning-rate schedules stepped once per optimizer step, and how batches group into optimizer steps.

``train.lr_schedule``: ``none`` (constant ``train.lr``), ``cosine`` (linear warm-up from 0 over
``train.warmup_fraction`` of the steps, then half a cosine down to 0) or ``onecycle`` (Smith &
Topin: up from lr/25 over the warm-up share, 0.3 when it is 0, then a cosine down to lr/1e4).
With ``train.accumulate_grad_batches`` = A, the gradients of A batches add up before one step.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

ONECYCLE_START, ONECYCLE_END, ONECYCLE_WARMUP = 1 / 25, 1e-4, 0.3


def lr_factor(schedule: str, step: int, total: int, warmup_fraction: float = 0.0) -> float:
    """The multiplier on ``train.lr`` at optimizer step ``step`` (0-based) of ``total``."""
    if schedule == "none" or total <= 0:
        return 1.0
    step = min(step, total - 1)
    if schedule == "onecycle":
        warm = max(1, round((warmup_fraction or ONECYCLE_WARMUP) * total))
        if step < warm:
            return ONECYCLE_START + (1 - ONECYCLE_START) * step / warm
        progress = (step - warm) / max(1, total - 1 - warm)
        return ONECYCLE_END + (1 - ONECYCLE_END) * 0.5 * (1 + math.cos(math.pi * progress))
    warm = round(warmup_fraction * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * progress))


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The sizes of an epoch's batches of ``n`` rows (the last one may be smaller)."""
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def step_groups(n: int, batch_size: int, accumulate: int) -> list[int]:
    """Per batch of an epoch: the rows of the optimizer step it belongs to. A batch's loss is
    weighted by its rows over that number, so the accumulated gradient is that of the mean loss
    over the step's rows (a BNN's KL term, in every batch's loss, counts once per step)."""
    sizes = batch_sizes(n, batch_size)
    rows = []
    for start in range(0, len(sizes), accumulate):
        group = sizes[start : start + accumulate]
        rows += [sum(group)] * len(group)
    return rows


def steps_per_epoch(n: int, batch_size: int, accumulate: int) -> int:
    return -(-len(batch_sizes(n, batch_size)) // accumulate)


def make_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, n_train: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A per-step scheduler for ``cfg`` (the ``train`` section) over every epoch's steps; None for ``none``."""
    schedule = cfg.get("lr_schedule", "none")
    if schedule == "none":
        return None
    total = cfg.epochs * steps_per_epoch(n_train, cfg.batch_size, cfg.get("accumulate_grad_batches", 1))
    warmup = cfg.get("warmup_fraction", 0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(schedule, step, total, warmup))
