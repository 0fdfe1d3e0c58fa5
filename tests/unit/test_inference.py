"""The MC inference engine: every strategy samples torchbnn's / dropout's own distribution."""

from __future__ import annotations

import math

import pytest
import torch
import torchbnn
from torch import nn

from dl_uncertainty.uncertainty.draws import SampleCache
from dl_uncertainty.uncertainty.engine import mc_log_probs
from dl_uncertainty.uncertainty.mc_plan import STRATEGIES, mc_mode, mc_plan

EXACT = ("repeat", "lrt", "auto")  # compared against "loop", the modules' own sampling
Z = 5.0  # two-sided z bound; with ~10^3 comparisons per test a false alarm has p < 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def _bnn(log_sigma: float = -1.0, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        torchbnn.BayesLinear(0.0, 0.1, 6, 16, bias=bias), nn.ReLU(),
        torchbnn.BayesLinear(0.0, 0.1, 16, 16), nn.Tanh(),
        torchbnn.BayesLinear(0.0, 0.1, 16, 3),
    )
    for m in model.modules():
        if isinstance(m, torchbnn.BayesLinear):
            nn.init.constant_(m.weight_log_sigma, log_sigma)
            if m.bias:
                nn.init.constant_(m.bias_log_sigma, log_sigma)
    return model


def _conv_bnn() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Unflatten(1, (2, 6, 6)),
        torchbnn.BayesConv2d(0.0, 0.1, 2, 4, 3, stride=2, padding=1), nn.ReLU(),
        torchbnn.BayesConv2d(0.0, 0.1, 4, 4, 3, padding=1, bias=False), nn.ReLU(),
        nn.Dropout(0.1),
        nn.Flatten(),
        torchbnn.BayesLinear(0.0, 0.1, 4 * 3 * 3, 3),
    )
    for m in model.modules():
        if isinstance(m, (torchbnn.BayesLinear, torchbnn.BayesConv2d)):
            nn.init.constant_(m.weight_log_sigma, -1.5)
            if m.bias:
                nn.init.constant_(m.bias_log_sigma, -1.5)
    return model


def _dropout_dnn() -> nn.Module:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(16, 3),
    )
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _assert_same_distribution(ref: torch.Tensor, got: torch.Tensor) -> None:
    """Per example and class: means and variances of the two sample sets agree within
    sampling error (z-tests with the samples' own standard errors)."""
    t_ref, t_got = ref.shape[0], got.shape[0]
    m1, m2 = ref.mean(0), got.mean(0)
    v1, v2 = ref.var(0), got.var(0)
    se_mean = (v1 / t_ref + v2 / t_got).sqrt()
    assert ((m1 - m2).abs() <= Z * se_mean + 1e-6).all(), (m1 - m2).abs().max()
    # Var(s^2) ~ (mu4 - sigma^4) / T
    mu4_1 = ((ref - m1) ** 4).mean(0)
    mu4_2 = ((got - m2) ** 4).mean(0)
    se_var = ((mu4_1 - v1**2).clamp_min(0) / t_ref + (mu4_2 - v2**2).clamp_min(0) / t_got).sqrt()
    assert ((v1 - v2).abs() <= Z * se_var + 1e-6).all(), (v1 - v2).abs().max()
    assert (v1 > 0).all() and (v2 > 0).all()


def _assert_matches_loop(model: nn.Module, x: torch.Tensor, samples: int, strategy: str, seed: int,
                         **kwargs) -> torch.Tensor:
    """Sample with ``strategy`` and with the reference loop; the distributions must agree."""
    g = torch.Generator().manual_seed(seed)
    ref = mc_log_probs(model, x, samples, strategy="loop", generator=g)
    got = mc_log_probs(model, x, samples, strategy=strategy, generator=g, **kwargs)
    assert got.shape == ref.shape
    _assert_same_distribution(ref, got)
    return got


def _mutual_information(log_probs: torch.Tensor) -> torch.Tensor:
    probs = log_probs.exp()
    mean = probs.mean(0)
    total = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
    expected = -(probs * log_probs).sum(-1).mean(0)
    return total - expected


@pytest.mark.parametrize("strategy", EXACT)
@pytest.mark.parametrize("bias", [True, False])
def test_bnn_strategies_sample_torchbnns_distribution(strategy: str, bias: bool) -> None:
    model = _bnn(bias=bias)
    x = torch.randn(5, 6) * 2
    got = _assert_matches_loop(model, x, 4000, strategy, seed=3)
    assert got.shape == (4000, 5, 3)


@pytest.mark.parametrize("strategy", EXACT)
def test_conv_bnn_strategies_sample_torchbnns_distribution(strategy: str) -> None:
    model = _conv_bnn()
    x = torch.randn(4, 72)
    _assert_matches_loop(model, x, 2500, strategy, seed=4)


@pytest.mark.parametrize("strategy", EXACT)
def test_dropout_strategies_sample_dropouts_distribution(strategy: str) -> None:
    model = _dropout_dnn()
    x = torch.randn(5, 6)
    _assert_matches_loop(model, x, 4000, strategy, seed=5)


@pytest.mark.parametrize("strategy", EXACT)
@pytest.mark.parametrize("small_chunks", [False, True])
def test_forced_chunking_keeps_the_distribution(strategy: str, small_chunks: bool) -> None:
    model = _bnn()
    x = torch.randn(7, 6)
    _assert_matches_loop(model, x, 2000, strategy, seed=6, chunk_size=50 if small_chunks else None)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_samples_are_independent_mutual_information_on_ood(strategy: str) -> None:
    model = _bnn(log_sigma=-0.5)
    ood = torch.randn(16, 6) * 10
    lp = mc_log_probs(model, ood, 50, strategy=strategy)
    assert (_mutual_information(lp) > 0.0).all()
    # consecutive samples differ for every example
    assert ((lp[1:] - lp[:-1]).abs().amax(-1) > 0).all()


@pytest.mark.parametrize("strategy", ("lrt", "auto", "repeat"))
def test_repeated_examples_get_their_own_noise(strategy: str) -> None:
    for model in (_bnn(), _dropout_dnn()):
        x = torch.randn(1, 6).repeat(4, 1)
        lp = mc_log_probs(model, x, 20, strategy=strategy)
        if strategy == "repeat" and not isinstance(model[-1], nn.Linear):
            continue  # one weight set per sample is shared by the batch, as in torchbnn
        assert (lp[:, 0] != lp[:, 1]).any(-1).all()


def test_only_dropout_is_stochastic_and_modes_are_restored() -> None:
    model = _dropout_dnn()
    model.train()
    bn = model[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(8, 6)
    for strategy in STRATEGIES:
        mc_log_probs(model, x, 10, strategy=strategy)
    after = bn.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert all(m.training for m in model.modules())
    model.eval()
    with mc_mode(model):
        assert not bn.training and model[3].training and model[6].training and not model[0].training
    assert not any(m.training for m in model.modules())
    # with dropout off the model is deterministic: no other module samples
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    lp = mc_log_probs(model, x, 5)
    assert torch.equal(lp[0], lp[4])


def test_deterministic_model_returns_identical_samples_from_one_pass() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(10, 6)
    lp = mc_log_probs(model, x, 30, deterministic=True)
    assert lp.shape == (30, 10, 3) and len(calls) == 1
    assert torch.equal(lp[0], lp[29])
    assert torch.allclose(lp[0], torch.log_softmax(model(x), -1))


def test_frozen_bnn_is_deterministic_and_matches_its_forward() -> None:
    model = _bnn()
    for m in model.modules():
        if isinstance(m, torchbnn.BayesLinear):
            m.freeze()
    x = torch.randn(3, 6)
    lp = mc_log_probs(model, x, 4)
    with torch.no_grad():
        assert torch.allclose(lp[2], torch.log_softmax(model(x), -1), atol=1e-6)


@pytest.mark.parametrize("factory, width", [(_bnn, 6), (_dropout_dnn, 6), (_conv_bnn, 72)])
def test_auto_handles_every_batch_size(factory, width: int) -> None:
    model = factory()
    for n in (1, 2, 3, 5, 33, 257, 1000, 5000):
        lp = mc_log_probs(model, torch.randn(n, width), 10)
        assert lp.shape == (10, n, 3)
        assert torch.isfinite(lp).all()
        assert torch.allclose(lp.exp().sum(-1), torch.ones(10, n), atol=1e-5)
    assert mc_log_probs(model, torch.randn(0, width), 4).shape == (4, 0, 3)


def test_generator_makes_draws_reproducible_and_plan_is_reported() -> None:
    model = _bnn()
    x = torch.randn(4, 6)
    for strategy in STRATEGIES:
        a = mc_log_probs(model, x, 8, strategy=strategy, generator=torch.Generator().manual_seed(9))
        b = mc_log_probs(model, x, 8, strategy=strategy, generator=torch.Generator().manual_seed(9))
        assert torch.equal(a, b)
    plan = mc_plan(model, torch.randn(1, 6), 50)
    assert plan.samples_per_chunk == 50 and plan.examples_per_chunk == 1
    assert math.isfinite(plan.est_seconds)


def test_bad_arguments_and_batch_statistics() -> None:
    model = _bnn()
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="strategy"):
        mc_log_probs(model, x, 3, strategy="bmm")
    with pytest.raises(ValueError, match="samples"):
        mc_log_probs(model, x, 0)
    coupled = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, track_running_stats=False),
                            nn.Dropout(0.5), nn.Linear(4, 3))
    assert mc_plan(coupled, x, 3).strategy == "loop"
    assert mc_log_probs(coupled, x, 3).shape == (3, 2, 3)
    with pytest.raises(ValueError, match="batch statistics"):
        mc_log_probs(coupled, x, 3, strategy="repeat")


class _Skip(nn.Module):
    """Concatenates its input with a stochastic branch: cannot mix un-repeated and repeated rows."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(torchbnn.BayesLinear(0.0, 0.1, 6, 4), nn.Dropout(0.2))
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([x, self.branch(x)], dim=1))


def test_forward_mixing_shared_and_sampled_rows_falls_back_to_repeating_up_front() -> None:
    torch.manual_seed(0)
    model = _Skip()
    x = torch.randn(6, 6)
    _assert_matches_loop(model, x, 3000, "auto", seed=7)


@pytest.mark.parametrize("model", [_bnn, _conv_bnn, _dropout_dnn])
def test_row_seed_gives_each_row_its_answer_alone_or_anywhere_in_any_batch(model) -> None:
    net = model()
    x = torch.randn(9, 72 if model is _conv_bnn else 6)
    for strategy in EXACT:
        batch = mc_log_probs(net, x, 30, strategy=strategy, row_seed=11)
        reversed_ = mc_log_probs(net, x.flip(0), 30, strategy=strategy, row_seed=11).flip(1)
        alone = mc_log_probs(net, x[4:5], 30, strategy=strategy, row_seed=11)
        chunked = mc_log_probs(net, x, 30, strategy=strategy, row_seed=11, chunk_size=20)
        torch.testing.assert_close(reversed_, batch, atol=1e-5, rtol=0)
        torch.testing.assert_close(alone[:, 0], batch[:, 4], atol=1e-5, rtol=0)
        torch.testing.assert_close(chunked, batch, atol=1e-5, rtol=0)
        assert not torch.equal(batch, mc_log_probs(net, x, 30, strategy=strategy, row_seed=12))
        assert ((batch[1:] - batch[:-1]).abs().amax(-1) > 0).all()  # the T samples still differ


@pytest.mark.parametrize(("model", "strategy"), [(_bnn, "auto"), (_bnn, "repeat"), (_conv_bnn, "auto"),
                                               (_dropout_dnn, "auto")])
def test_row_seed_samples_the_same_distribution_per_example(model, strategy: str) -> None:
    """auto: the BNN's linear layers by one noise vector per sample; repeat: by whole weight sets."""
    net = model()
    x = torch.randn(4, 72 if model is _conv_bnn else 6) * 2
    ref = mc_log_probs(net, x, 3000, strategy="loop", generator=torch.Generator().manual_seed(8))
    _assert_same_distribution(ref, mc_log_probs(net, x, 3000, strategy=strategy, row_seed=8))


class _SelfSampling(nn.Module):
    """Samples its own weights in forward: nothing the engine's analysis can see."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.lin.weight + torch.randn_like(self.lin.weight)).T


@pytest.mark.parametrize("strategy", ["auto", "loop", "repeat"])
def test_randomness_the_engine_cannot_see_is_sampled_not_copied(strategy: str) -> None:
    torch.manual_seed(0)
    model, x = _SelfSampling(), torch.randn(5, 4)
    plan = mc_plan(model, x, 10, strategy=strategy)
    assert plan.strategy == "loop" and ("forced" in plan.reason or "not declared deterministic" in plan.reason)
    lp = mc_log_probs(model, x, 10, strategy=strategy)
    assert len({tuple(lp[t].flatten().tolist()) for t in range(10)}) == 10  # T distinct samples


def test_loop_always_loops_even_for_a_declared_deterministic_model() -> None:
    model, calls = nn.Sequential(nn.Linear(4, 3)), []
    model.register_forward_hook(lambda *args: calls.append(1))
    mc_log_probs(model, torch.randn(5, 4), 7, strategy="loop", deterministic=True)
    assert len(calls) == 7


@pytest.mark.parametrize("model", [_bnn, _conv_bnn, _dropout_dnn])
def test_sample_cache_replays_the_very_draws_and_keeps_within_its_bound(model) -> None:
    net = model()
    x = torch.randn(9, 72 if model is _conv_bnn else 6)
    for strategy, chunk in (("auto", None), ("repeat", 20)):
        fresh = mc_log_probs(net, x, 30, strategy=strategy, row_seed=11, chunk_size=chunk)
        cache = SampleCache(1 << 24)
        filling = mc_log_probs(net, x, 30, strategy=strategy, row_seed=11, chunk_size=chunk, cache=cache)
        assert len(cache) == 30 and 0 < cache.bytes <= cache.max_bytes
        replayed = mc_log_probs(net, x, 30, strategy=strategy, row_seed=11, chunk_size=chunk, cache=cache)
        assert torch.equal(filling, fresh) and torch.equal(replayed, fresh)  # bit for bit
        alone = mc_log_probs(net, x[4:5], 30, strategy=strategy, row_seed=11, cache=cache)
        assert torch.equal(alone, mc_log_probs(net, x[4:5], 30, strategy=strategy, row_seed=11))
        # a bound that holds three samples' draws: three are kept, the others drawn anew, answers unchanged
        per_sample = cache.bytes // 30
        small = SampleCache(3 * per_sample + per_sample // 2)
        for _ in range(2):
            got = mc_log_probs(net, x, 30, strategy=strategy, row_seed=11, chunk_size=chunk, cache=small)
            assert torch.equal(got, fresh)
            assert len(small) == 3 and small.bytes <= small.max_bytes
        none = SampleCache(0)
        assert torch.equal(mc_log_probs(net, x, 30, strategy=strategy, row_seed=11, chunk_size=chunk,
                                        cache=none), fresh) and len(none) == 0 and none.bytes == 0
    # another seed is another entry; changed weights empty the cache
    other = mc_log_probs(net, x, 30, row_seed=12, cache=cache)
    assert torch.equal(other, mc_log_probs(net, x, 30, row_seed=12))
    with torch.no_grad():
        next(net.parameters()).mul_(1.5)
    assert torch.equal(mc_log_probs(net, x, 30, row_seed=11, cache=cache), mc_log_probs(net, x, 30, row_seed=11))


def test_no_rows_give_an_empty_answer() -> None:
    from dl_uncertainty.families.predict import predict_log_probs

    assert predict_log_probs(_bnn(), torch.zeros(0, 6), 7, seed=3).shape == (7, 0, 3)
