"""MC prediction for every model family: [T, N, K] per-sample log-probabilities, and the one
prediction that is served (evaluation, calibration and the MLflow model all call it)."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from dl_uncertainty.families.base import family_of
from dl_uncertainty.uncertainty.draws import SampleCache


def predict_log_probs(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    samples: int,
    *,
    strategy: str = "auto",
    batch_size: int = 1024,
    seed: int | None = None,
    cache: SampleCache | None = None,
) -> torch.Tensor:
    """Per-sample log-softmax outputs [T, N, K] on the CPU, drawn the way the model's family samples.

    With ``seed``, the MC samples are reproducible, row by row: MC sample t uses the same dropout
    masks and Bayesian noise for every row, so a row gets the same answer alone or anywhere in any batch;
    ``cache`` then keeps those draws for the next call (the same answers, bit for bit, drawn once).
    No rows: a ``[T, 0, K]`` tensor.
    """
    family = family_of(model)
    device = next(model.parameters()).device
    if seed is not None:  # only the generator that samples (torch.manual_seed also queues CUDA's: slow)
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
    chunks = []
    for start in range(0, max(len(x), 1), batch_size):  # a memory-mapped x is read one batch at a time
        rows = x[start : start + batch_size]
        rows = np.array(rows, np.float32) if isinstance(rows, np.ndarray) else rows  # a copy of one batch
        batch = torch.as_tensor(rows, dtype=torch.float32).to(device)
        chunks.append(family.sample(model, batch, samples, strategy=strategy, seed=seed, cache=cache).float().cpu())
    return torch.cat(chunks, dim=1)


def served_log_probs(model: nn.Module, x: np.ndarray | torch.Tensor, cfg: DictConfig,
                     cache: SampleCache | None = None) -> torch.Tensor:
    """The served prediction: ``evaluate.mc_samples`` samples by ``evaluate.strategy``, seeded by
    ``seed`` row by row. Evaluation, calibration and serving call this, so they agree exactly."""
    e = cfg.evaluate
    return predict_log_probs(model, x, e.mc_samples, strategy=e.strategy, batch_size=e.batch_size, seed=cfg.seed,
                             cache=cache)
