"""MC prediction for every model family: [T, N, K] per-sample log-probabilities."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .inference import SampleCache, mc_log_probs
from .models import Ensemble


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
    """Per-sample log-softmax outputs [T, N, K] on the CPU; an ensemble's members are its samples.

    With ``seed``, the MC samples are reproducible, row by row: MC sample t uses the same dropout
    masks and weights for every row, so a row gets the same answer alone or anywhere in any batch;
    ``cache`` then keeps those draws for the next call (the same answers, bit for bit, drawn once).
    No rows: a ``[T, 0, K]`` tensor.
    """
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
        if isinstance(model, Ensemble):
            was_training = model.training
            model.eval()
            with torch.inference_mode():
                chunks.append(torch.log_softmax(model.member_logits(batch).float(), dim=-1).cpu())
            model.train(was_training)
        else:
            chunks.append(mc_log_probs(model, batch, samples, strategy=strategy, row_seed=seed,
                                       cache=cache).float().cpu())
    return torch.cat(chunks, dim=1)

