"""LAC, APS and RAPS sets on a problem whose conditional distribution is known: coverage in the
finite-sample band, nesting in alpha, rows independent of their batch, and refusals of bad options."""

import math

import numpy as np
import pytest

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.errors import UserError
from dl_uncertainty.uncertainty import calibration as C
from dl_uncertainty.uncertainty import conformal as CF

K = 10


def known_problem(n: int, rng: np.random.Generator):
    """Inputs x, the true p(y | x) = softmax(W x) and labels drawn from it: the oracle model is known."""
    w = np.random.default_rng(123).normal(0, 1.2, (K, 6))
    x = rng.normal(size=(n, 6)).astype(np.float32)
    logits = x @ w.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = (rng.uniform(size=(n, 1)) > probs.cumsum(1)).sum(1)
    return x, probs, np.minimum(labels, K - 1)


def calibration(method: str, nonempty: bool = False, seed: int = 0) -> C.Calibration:
    return C.Calibration(1.0, 1.0, math.nan, math.nan, 0.1, method, {}, math.inf, 0.01, 0, k_reg=1, lam=0.02,
                         nonempty=nonempty, randomized=True, seed=seed)


VARIANTS = [("lac", False), ("aps", False), ("raps", False), ("lac", True), ("aps", True), ("raps", True)]


@pytest.mark.parametrize(("method", "nonempty"), VARIANTS)
def test_average_coverage_is_in_the_finite_sample_band(method, nonempty):
    alpha, n, reps, coverages = 0.1, 200, 150, []
    rng = np.random.default_rng(7)
    for rep in range(reps):
        x, probs, labels = known_problem(n + 1000, rng)
        cal = calibration(method, nonempty, seed=rep)
        u = cal.uniforms(x)
        tau = cal.threshold(probs[:n], labels[:n], u[:n], method, alpha)
        sets = cal.sets(probs[n:], u[n:], method, tau)
        coverages.append(CF.set_metrics(sets, labels[n:])["coverage"])
    low, high = CF.coverage_band(alpha, n)
    # per repetition coverage varies by ~0.023 (calibration draw + 1000 test rows): 3 sd of the mean
    slack = 3 * np.std(coverages) / math.sqrt(reps)
    assert np.mean(coverages) >= low - slack, np.mean(coverages)
    if not nonempty:  # forcing the top class in only adds coverage: no upper bound
        assert np.mean(coverages) <= high + slack, np.mean(coverages)


def test_randomised_aps_of_the_true_distribution_has_the_known_quantile():
    """With the oracle's probabilities the randomised APS score of the label is uniform on (0, 1), so its
    1 - alpha quantile is 1 - alpha; without the randomisation (u = 1) it is not."""
    x, probs, labels = known_problem(20000, np.random.default_rng(3))
    u = CF.row_uniforms(x, seed=0)
    for alpha in (0.05, 0.1, 0.3):
        scores = CF.true_class_scores(CF.class_scores(probs, "aps", u), labels)
        assert CF.threshold(scores, alpha) == pytest.approx(1 - alpha, abs=0.01)
    assert np.histogram(scores, bins=10, range=(0, 1))[0] == pytest.approx(np.full(10, 2000), rel=0.1)
    plain = CF.true_class_scores(CF.class_scores(probs, "aps"), labels)
    assert CF.threshold(plain, 0.3) > 0.7 + 0.05


def test_raps_penalises_deep_ranks_and_is_aps_without_penalty():
    probs = np.array([[0.5, 0.2, 0.3]])
    u = np.array([0.5])
    np.testing.assert_allclose(CF.class_scores(probs, "aps", u), [[0.25, 0.9, 0.65]])
    np.testing.assert_allclose(CF.class_scores(probs, "raps", u, k_reg=1, lam=0.1), [[0.25, 1.1, 0.75]])
    np.testing.assert_allclose(CF.class_scores(probs, "raps", u, k_reg=0, lam=0.0), CF.class_scores(probs, "aps", u))
    np.testing.assert_allclose(CF.class_scores(probs, "aps"), [[0.5, 1.0, 0.8]])  # u = 1: not randomised


@pytest.mark.parametrize("method", ["aps", "raps"])
def test_sets_are_nested_in_alpha(method):
    x, probs, labels = known_problem(3000, np.random.default_rng(5))
    cal = calibration(method)
    u = cal.uniforms(x)
    sets = [cal.sets(probs[1000:], u[1000:], method, cal.threshold(probs[:1000], labels[:1000], u[:1000], method, a))
            for a in (0.01, 0.05, 0.1, 0.2, 0.4)]
    for wider, narrower in zip(sets, sets[1:], strict=False):
        assert not (narrower & ~wider).any()
    assert sets[0].sum() > sets[-1].sum()


def test_a_rows_set_does_not_depend_on_its_batch():
    x, probs, labels = known_problem(400, np.random.default_rng(9))
    log_probs = np.log(probs)[None]
    cal = C.fit(log_probs[:, :200], labels[:200], load_config(["evaluate.conformal_method=aps"]).evaluate,
                rows=x[:200], seed=4)
    whole = C.decide(log_probs[:, 200:], cal, rows=x[200:])["sets"]
    order = np.random.default_rng(0).permutation(200)
    shuffled = C.decide(log_probs[:, 200:][:, order], cal, rows=x[200:][order])["sets"]
    np.testing.assert_array_equal(shuffled, whole[order])
    alone = np.concatenate([C.decide(log_probs[:, 200 + i:201 + i], cal, rows=x[200 + i:201 + i])["sets"]
                            for i in range(0, 200, 17)])
    np.testing.assert_array_equal(alone, whole[::17])
    # the seed keys the uniforms: another seed, other uniforms, other randomised sets on some rows
    assert not np.array_equal(CF.row_uniforms(x, 4), CF.row_uniforms(x, 5))
    assert CF.row_uniforms(x[:3], 4) == pytest.approx(CF.row_uniforms(x, 4)[:3])


def test_nonempty_sets_always_hold_the_top_class():
    rng = np.random.default_rng(11)
    x, truth, _ = known_problem(1000, rng)
    truth = truth ** 4 / (truth ** 4).sum(1, keepdims=True)
    labels = (rng.uniform(size=(1000, 1)) > truth.cumsum(1)).sum(1).clip(0, K - 1)
    sharp = truth ** 0.5 / (truth ** 0.5).sum(1, keepdims=True)  # accurate, under-confident: LAC sets often empty
    cal = calibration("lac")
    tau = cal.threshold(sharp[:500], labels[:500], None, "lac", 0.3)
    plain = cal.sets(sharp[500:], None, "lac", tau)
    assert (plain.sum(1) == 0).mean() > 0.05
    cal.nonempty = True
    forced = cal.sets(sharp[500:], None, "lac", tau)
    assert (forced.sum(1) >= 1).all() and forced[np.arange(500), sharp[500:].argmax(1)].all()
    assert not (plain & ~forced).any()


def test_per_class_and_by_set_size_tables_add_up():
    sets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], bool)
    labels = np.array([0, 1, 1, 2])
    assert CF.per_class(sets, labels, ["a", "b", "c"]) == [
        {"class": "a", "examples": 1, "coverage": 1.0, "set_size": 1.0},
        {"class": "b", "examples": 2, "coverage": 0.5, "set_size": 1.5},
        {"class": "c", "examples": 1, "coverage": 0.0, "set_size": 0.0}]
    assert [(r["set_size"], r["examples"], r["coverage"]) for r in CF.by_set_size(sets, labels)] == [
        (0, 1, 0.0), (1, 2, 0.5), (2, 1, 1.0)]
    assert CF.coverage_band(0.1, 99) == pytest.approx((0.9, 0.91))


def test_bad_options_are_user_errors_naming_the_key():
    probs = np.full((50, 3), 1 / 3)
    labels = np.arange(50) % 3
    with pytest.raises(UserError, match=r"the calibration split has 50 rows, too few for evaluate.alpha=0.01 .*99 rows"):
        C.fit(np.log(probs)[None], labels, load_config(["evaluate.alpha=0.01"]).evaluate)
    C.fit(np.log(probs)[None], labels, load_config(["evaluate.alpha=0.02"]).evaluate)  # 1/51 = 0.0196
    with pytest.raises(UserError, match="evaluate.conformal_method"):
        load_config(["evaluate.conformal_method=thr"])
    with pytest.raises(UserError, match="evaluate.conformal_method='thr'"):
        CF.class_scores(probs, "thr")
    with pytest.raises(UserError, match="evaluate.raps_k_reg"):
        load_config(["evaluate.raps_lambda=-1"])


def test_lac_scores_of_confident_rows_do_not_round_to_ties_so_sets_do_not_over_cover():
    """A sharp model's top class has 1 - p below float64's resolution: computed as 1 - p, most
    calibration scores tie at 0 and every confident row is covered; summed from the other classes,
    they stay apart and fresh exchangeable rows are covered about 1 - alpha of the time."""
    from dl_uncertainty.uncertainty.conformal import class_scores, sets_from_scores, threshold

    rng = np.random.default_rng(0)
    n, k = 4000, 4
    margins = rng.uniform(40, 80, n)  # log-odds of the top class against the rest: p_top rounds to 1
    rest = np.exp(-margins)[:, None] * rng.dirichlet(np.ones(k - 1), n)
    probs = np.concatenate([1 - rest.sum(1, keepdims=True), rest], axis=1)
    assert (1 - probs[:, 0] == 0).mean() > 0.9  # the rounding this is about
    scores = class_scores(probs, "lac")
    np.testing.assert_allclose(scores[:, 0], rest.sum(1), rtol=1e-12)
    calib, test = np.arange(n // 2), np.arange(n // 2, n)
    tau = threshold(scores[calib, 0], 0.1)
    assert len(np.unique(scores[calib, 0])) == len(calib)
    coverage = sets_from_scores(scores[test], tau, probs[test])[:, 0].mean()
    assert 0.87 <= coverage <= 0.93  # 1 - alpha, within the sampling noise of 2000 rows
