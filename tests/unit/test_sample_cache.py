"""The sample cache of per-row-seeded MC draws: one stack per layer, replayed without a copy, the bytes
it counts are the bytes it holds, and a replayed answer is the drawn answer bit for bit."""

from __future__ import annotations

import pytest
import torch
import torchbnn
from torch import nn

from dl_uncertainty.uncertainty.draws import SampleCache
from dl_uncertainty.uncertainty.engine import mc_log_probs

T = 30


pytestmark = pytest.mark.usefixtures("one_thread")


def _bnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(torchbnn.BayesLinear(0.0, 0.1, 6, 16), nn.ReLU(), nn.Dropout(0.2),
                          torchbnn.BayesLinear(0.0, 0.1, 16, 3, bias=False))
    for m in model.modules():
        if isinstance(m, torchbnn.BayesLinear):
            nn.init.constant_(m.weight_log_sigma, -1.0)
            if m.bias:
                nn.init.constant_(m.bias_log_sigma, -1.0)
    return model


def _per_sample_bytes(model: nn.Module, strategy: str) -> int:
    """What one MC sample draws: per BayesLinear a noise vector (auto) or a weight set (repeat), per dropout a mask."""
    floats = 0
    for m in model.modules():
        if isinstance(m, torchbnn.BayesLinear):
            floats += m.out_features if strategy == "auto" else m.weight_mu.numel() + (m.out_features if m.bias else 0)
        elif isinstance(m, nn.Dropout):
            floats += 16  # the dropout's input width
    return 4 * floats


def _held(cache: SampleCache) -> dict[int, int]:
    """The storages the cache's tensors keep alive: data pointer -> bytes."""
    held = {}
    for tape in cache._tapes.values():
        for entry in tape:
            for t in entry if isinstance(entry, tuple) else (entry,):
                if t is not None:
                    held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return held


@pytest.mark.parametrize("strategy", ["auto", "repeat"])
def test_a_call_s_draws_are_held_as_one_stack_per_draw_and_counted_as_held(strategy: str) -> None:
    net, x = _bnn(), torch.randn(1, 6)
    cache = SampleCache(1 << 24)
    fresh = mc_log_probs(net, x, T, strategy=strategy, row_seed=5)
    assert torch.equal(mc_log_probs(net, x, T, strategy=strategy, row_seed=5, cache=cache), fresh)
    assert cache.bytes == T * _per_sample_bytes(net, strategy)
    held = _held(cache)
    assert sum(held.values()) == cache.bytes
    draws = 3 if strategy == "auto" else 4  # noise x2 + mask, or weight + bias, mask, weight
    assert len(held) == draws  # one stack per draw of the call, all T samples in it
    for _ in range(2):
        assert torch.equal(mc_log_probs(net, x, T, strategy=strategy, row_seed=5, cache=cache), fresh)
    assert _held(cache) == held  # replaying allocates nothing the cache keeps


@pytest.mark.parametrize("strategy", ["auto", "repeat"])
def test_a_small_cache_keeps_copies_of_the_samples_that_fit_and_counts_only_those(strategy: str) -> None:
    net, x = _bnn(), torch.randn(1, 6)
    fresh = mc_log_probs(net, x, T, strategy=strategy, row_seed=5)
    per_sample = _per_sample_bytes(net, strategy)
    small = SampleCache(4 * per_sample + per_sample // 2)
    for _ in range(3):  # fill, then replay 4 samples and draw 26 in the same call
        assert torch.equal(mc_log_probs(net, x, T, strategy=strategy, row_seed=5, cache=small), fresh)
        assert len(small) == 4 and small.bytes == 4 * per_sample <= small.max_bytes
        assert sum(_held(small).values()) == small.bytes  # no kept slice holds its whole stack alive


@pytest.mark.parametrize("strategy", ["auto", "repeat"])
def test_draws_cached_from_one_row_serve_any_batch_and_chunking_bit_for_bit(strategy: str) -> None:
    net, x = _bnn(), torch.randn(9, 6)
    cache = SampleCache(1 << 24)
    mc_log_probs(net, x[:1], T, strategy=strategy, row_seed=5, cache=cache)  # all T samples in one call
    for chunk in (None, 40, 9):  # 9 rows per call: one MC sample per call, a slice of the cached stacks
        drawn = mc_log_probs(net, x, T, strategy=strategy, row_seed=5, chunk_size=chunk)
        replayed = mc_log_probs(net, x, T, strategy=strategy, row_seed=5, chunk_size=chunk, cache=cache)
        assert torch.equal(replayed, drawn)
        torch.testing.assert_close(replayed[:, 3:4], mc_log_probs(net, x[3:4], T, strategy=strategy, row_seed=5),
                                   atol=1e-6, rtol=0)
    assert len(cache) == T


def test_bayes_linear_on_extra_dims_draws_weight_sets_and_rows_stay_independent_of_the_batch() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(torchbnn.BayesLinear(0.0, 0.1, 4, 5), nn.Flatten(), nn.Linear(15, 3))
    x = torch.randn(6, 3, 4)  # three positions per row: whole weight sets keep them one draw
    cache = SampleCache(1 << 24)
    batch = mc_log_probs(net, x, T, row_seed=2, cache=cache)
    assert cache.bytes == T * 4 * (4 * 5 + 5)
    torch.testing.assert_close(mc_log_probs(net, x[2:3], T, row_seed=2), batch[:, 2:3], atol=1e-6, rtol=0)
    assert torch.equal(mc_log_probs(net, x, T, row_seed=2, cache=cache), batch)
