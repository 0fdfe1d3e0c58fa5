"""Metrics checked against independent implementations (torchmetrics, scikit-learn, brute force)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
)

from dl_uncertainty.errors import UserError
from dl_uncertainty.uncertainty import metrics as M

K = 6


def random_log_probs(seed: int, t: int = 5, n: int = 300, k: int = K, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k, generator=g) * scale
    noise = torch.randn(t, n, k, generator=g) * scale / 2
    lp = F.log_softmax((base + noise).double(), dim=-1).numpy()
    labels = torch.randint(0, k, (n,), generator=g).numpy()
    # make the model better than chance so calibration bins are populated differently
    hit = torch.rand(n, generator=g).numpy() < 0.5
    labels[hit] = np.exp(lp).mean(0).argmax(1)[hit]
    return lp, labels


def naive_mean_probs(lp):
    return np.exp(lp).mean(axis=0)


SEEDS = [0, 1, 2]


# --------------------------------------------------------------------------- basic metrics


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_probs_matches_naive_average(seed):
    lp, _ = random_log_probs(seed)
    p = M.mean_probs(lp)
    np.testing.assert_allclose(p, naive_mean_probs(lp), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_nll_matches_sklearn_log_loss(seed):
    lp, y = random_log_probs(seed)
    expected = log_loss(y, naive_mean_probs(lp), labels=list(range(K)))
    assert M.nll(lp, y) == pytest.approx(expected, rel=1e-9)


def test_nll_accepts_torch_tensors_and_2d_input():
    lp, y = random_log_probs(3, t=1)
    a = M.nll(torch.from_numpy(lp), torch.from_numpy(y))
    b = M.nll(lp[0], y)
    expected = F.nll_loss(torch.from_numpy(lp[0]), torch.from_numpy(y)).item()
    assert a == pytest.approx(expected, rel=1e-12)
    assert b == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_matches_torchmetrics(seed):
    lp, y = random_log_probs(seed)
    expected = multiclass_accuracy(
        torch.from_numpy(naive_mean_probs(lp)), torch.from_numpy(y), num_classes=K, average="micro"
    ).item()
    assert M.accuracy(lp, y) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_brier_matches_sklearn(seed):
    lp, y = random_log_probs(seed)
    expected = brier_score_loss(y, naive_mean_probs(lp), labels=list(range(K)), scale_by_half=False)
    assert M.brier(lp, y) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_ece_and_mce_match_torchmetrics(seed, scale):
    lp, y = random_log_probs(seed, scale=scale)
    p = torch.from_numpy(naive_mean_probs(lp)).float()
    t = torch.from_numpy(y)
    for norm, fn in (("l1", M.ece), ("max", M.mce)):
        expected = multiclass_calibration_error(p, t, num_classes=K, n_bins=15, norm=norm).item()
        assert fn(lp, y) == pytest.approx(expected, abs=1e-5), norm


def reference_aece(p, y, n_bins=15):
    conf, pred = p.max(1), p.argmax(1)
    order = sorted(range(len(conf)), key=lambda i: conf[i])
    n = len(order)
    total, start = 0.0, 0
    for b in range(n_bins):
        size = n // n_bins + (1 if b < n % n_bins else 0)
        idx = order[start : start + size]
        start += size
        if idx:
            acc = sum(pred[i] == y[i] for i in idx) / len(idx)
            c = sum(conf[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(acc - c)
    return total


@pytest.mark.parametrize("seed", SEEDS)
def test_aece_matches_loop_reference(seed):
    lp, y = random_log_probs(seed, n=301)
    assert M.aece(lp, y) == pytest.approx(reference_aece(naive_mean_probs(lp), y), abs=1e-12)


# --------------------------------------------------------------------------- edge cases


def one_hot_log_probs(pred, k=K, t=3, low=-1e4):
    lp = np.full((t, len(pred), k), low)
    lp[:, np.arange(len(pred)), pred] = 0.0
    return lp


def test_perfect_confident_correct():
    y = np.arange(20) % K
    lp = one_hot_log_probs(y)
    s = M.summarize(lp, y)
    assert s["acc"] == 1.0
    assert s["nll"] == pytest.approx(0.0, abs=1e-12)
    assert s["brier"] == pytest.approx(0.0, abs=1e-12)
    assert s["ece"] == pytest.approx(0.0, abs=1e-12)
    assert s["mce"] == pytest.approx(0.0, abs=1e-12)
    assert s["aurc"] == 0.0
    assert s["entropy"] == pytest.approx(0.0, abs=1e-12)
    expected = multiclass_calibration_error(
        torch.from_numpy(M.mean_probs(lp)), torch.from_numpy(y), num_classes=K, n_bins=15
    ).item()
    assert s["ece"] == pytest.approx(expected, abs=1e-6)


def test_perfect_confident_wrong_underflow_is_finite():
    y = np.arange(20) % K
    lp = one_hot_log_probs((y + 1) % K)  # true class has log-prob -1e4: probability underflows to 0
    s = M.summarize(lp, y, ood_log_probs=lp, far_ood_log_probs=lp)
    assert all(math.isfinite(v) for v in s.values()), s
    assert s["acc"] == 0.0
    assert s["ece"] == pytest.approx(1.0) and s["mce"] == pytest.approx(1.0)
    assert s["brier"] == pytest.approx(2.0)
    assert 700 < s["nll"] <= -M.MIN_LOG_PROB + 1e-9  # huge but finite


def test_minus_inf_log_probs_are_clamped():
    y = np.zeros(4, dtype=int)
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]))[None]  # has -inf
    for v in M.uncertainty_scores(lp).values():
        assert np.isfinite(v).all()
    assert math.isfinite(M.nll(lp, y))
    with pytest.raises(ValueError):
        M.nll(np.full((1, 2, 2), np.nan), [0, 1])


def test_uniform_predictions_by_hand():
    n, k = 10, 4
    lp = np.full((5, n, k), -math.log(k))
    y = np.arange(n) % k
    sc = M.uncertainty_scores(lp)
    np.testing.assert_allclose(sc["entropy"], math.log(k))
    np.testing.assert_allclose(sc["expected_entropy"], math.log(k))
    np.testing.assert_allclose(sc["mutual_info"], 0.0, atol=1e-12)
    np.testing.assert_allclose(sc["max_prob"], 1 - 1 / k)
    assert M.nll(lp, y) == pytest.approx(math.log(k))
    assert M.brier(lp, y) == pytest.approx(1 - 1 / k)


# --------------------------------------------------------------------------- uncertainty decomposition


@pytest.mark.parametrize("seed", SEEDS)
def test_uncertainty_decomposition_matches_torch_distributions(seed):
    lp, _ = random_log_probs(seed)
    sc = M.uncertainty_scores(lp)
    p_bar = torch.from_numpy(naive_mean_probs(lp))
    total = torch.distributions.Categorical(probs=p_bar).entropy().numpy()
    aleatoric = (
        torch.distributions.Categorical(logits=torch.from_numpy(lp)).entropy().mean(0).numpy()
    )
    np.testing.assert_allclose(sc["entropy"], total, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sc["expected_entropy"], aleatoric, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sc["mutual_info"], np.maximum(total - aleatoric, 0), atol=1e-10)
    np.testing.assert_allclose(sc["max_prob"], 1 - p_bar.max(1).values.numpy(), atol=1e-12)
    np.testing.assert_allclose(M.predictive_entropy(lp), sc["entropy"])
    np.testing.assert_allclose(M.expected_entropy(lp), sc["expected_entropy"])
    np.testing.assert_allclose(M.mutual_information(lp), sc["mutual_info"])
    assert (sc["mutual_info"] >= 0).all()
    assert (sc["mutual_info"] > 1e-3).mean() > 0.9  # samples disagree -> epistemic > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_mutual_information_zero_for_identical_samples(seed):
    lp, _ = random_log_probs(seed, t=1)
    same = np.repeat(lp, 7, axis=0)
    mi = M.mutual_information(same)
    assert (mi >= 0).all()
    np.testing.assert_allclose(mi, 0.0, atol=1e-12)


def test_mutual_information_of_disagreeing_one_hot_samples_is_log2():
    lp = np.array([[[0.0, -1e4]], [[-1e4, 0.0]]])  # two samples, certain of different classes
    sc = M.uncertainty_scores(lp)
    assert sc["entropy"][0] == pytest.approx(math.log(2))
    assert sc["expected_entropy"][0] == pytest.approx(0.0, abs=1e-12)
    assert sc["mutual_info"][0] == pytest.approx(math.log(2))


# --------------------------------------------------------------------------- selective prediction


def test_risk_coverage_by_hand():
    conf = np.array([0.6, 0.9, 0.7, 0.8])
    correct = np.array([0, 1, 1, 0])  # by confidence: 0.9 ok, 0.8 wrong, 0.7 ok, 0.6 wrong
    cov, risk = M.risk_coverage_curve(conf, correct)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 2 / 4])
    assert M.aurc(conf, correct) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert M.accuracy_at_coverage(conf, correct, 0.5) == pytest.approx(0.5)
    assert M.accuracy_at_coverage(conf, correct, 0.25) == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_selective_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    conf = rng.random(200)
    correct = (rng.random(200) < conf).astype(int)
    risks = []
    for k in range(1, 201):
        kept = np.argsort(conf)[::-1][:k]
        risks.append(1 - correct[kept].mean())
    assert M.aurc(conf, correct) == pytest.approx(np.mean(risks), abs=1e-12)
    for cov in (0.9, 0.95):
        kept = np.argsort(conf)[::-1][: math.ceil(cov * 200)]
        assert M.accuracy_at_coverage(conf, correct, cov) == pytest.approx(correct[kept].mean())
    # a ranking that puts errors first is worse than the one that puts them last
    assert M.aurc(correct + 0.0, correct) < M.aurc(-correct + 0.0, correct)


# --------------------------------------------------------------------------- OOD detection


def reference_ood(s_in, s_out):
    # AUROC = P(score_ood > score_id) + 0.5 P(tie)  (Mann-Whitney)
    diff = s_out[:, None] - s_in[None, :]
    auroc = np.mean((diff > 0) + 0.5 * (diff == 0))
    # AP = mean over positives of precision at that positive's threshold
    precs = []
    for s in s_out:
        tp = np.sum(s_out >= s)
        fp = np.sum(s_in >= s)
        precs.append(tp / (tp + fp))
    aupr = np.mean(precs)
    # FPR at the largest threshold that flags >= 95% of OOD examples
    thresholds = np.sort(np.r_[s_in, s_out])[::-1]
    fpr95 = next(np.mean(s_in >= t) for t in thresholds if np.mean(s_out >= t) >= 0.95)
    return auroc, aupr, fpr95


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shift", [0.0, 0.7, 2.0])
def test_ood_metrics_match_reference(seed, shift):
    rng = np.random.default_rng(seed)
    s_in = rng.normal(0, 1, 150)
    s_out = rng.normal(shift, 1, 90)
    out = M.ood_metrics(s_in, s_out)
    auroc, aupr, fpr95 = reference_ood(s_in, s_out)
    assert out["auroc"] == pytest.approx(auroc, abs=1e-12)
    assert out["aupr"] == pytest.approx(aupr, abs=1e-12)
    assert out["fpr95"] == pytest.approx(fpr95, abs=1e-12)


def test_ood_metrics_with_ties_and_perfect_separation():
    rng = np.random.default_rng(0)
    s_in = rng.integers(0, 4, 100).astype(float)  # many ties
    s_out = rng.integers(2, 6, 60).astype(float)
    out = M.ood_metrics(s_in, s_out)
    auroc, aupr, fpr95 = reference_ood(s_in, s_out)
    assert out["auroc"] == pytest.approx(auroc) and out["aupr"] == pytest.approx(aupr)
    assert out["fpr95"] == pytest.approx(fpr95)
    perfect = M.ood_metrics([0.1, 0.2, 0.3], [0.5, 0.9])
    assert perfect == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}


# --------------------------------------------------------------------------- summary


def test_summarize_names_types_and_consistency():
    lp, y = random_log_probs(0)
    ood, _ = random_log_probs(1, scale=0.5)
    far, _ = random_log_probs(2, scale=0.1)
    s = M.summarize(lp, y, ood_log_probs=ood, far_ood_log_probs=far)
    base = [
        "acc",
        "nll",
        "brier",
        "ece",
        "aece",
        "mce",
        "aurc",
        "acc_cov90",
        "acc_cov95",
        "entropy",
        "mutual_info",
        "test_accuracy",
        "avg_test_uncertainty",
    ]
    ood_keys = [
        f"{p}{m}_{sc}"
        for p in ("", "far_")
        for m in ("auroc", "aupr", "fpr95")
        for sc in ("max_prob", "entropy", "mutual_info")
    ]
    assert set(s) == set(base + ood_keys)
    assert all(type(v) is float and math.isfinite(v) for v in s.values())
    assert s["test_accuracy"] == s["acc"] == M.accuracy(lp, y)
    assert (
        s["avg_test_uncertainty"] == s["entropy"] == pytest.approx(M.predictive_entropy(lp).mean())
    )
    assert s["nll"] == M.nll(lp, y) and s["ece"] == M.ece(lp, y)
    assert (
        s["far_auroc_entropy"]
        == M.ood_metrics(M.predictive_entropy(lp), M.predictive_entropy(far))["auroc"]
    )
    assert s["acc_cov90"] >= s["acc"] - 0.05  # selective accuracy is not far below full accuracy
    only_ood = M.summarize(lp, y, ood_log_probs=ood)
    assert "auroc_entropy" in only_ood and not any(k.startswith("far_") for k in only_ood)


# --------------------------------------------------------------------------- temperature scaling


def overconfident_model(seed, n=2000, t=4, sharpen=4.0):
    g = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, K, generator=g) * 1.5
    labels = torch.distributions.Categorical(logits=true_logits).sample().numpy()
    logits = sharpen * (true_logits + 0.3 * torch.randn(t, n, K, generator=g))
    return F.log_softmax(logits.double(), -1).numpy(), labels


def test_apply_temperature_renormalizes():
    lp, _ = random_log_probs(0)
    np.testing.assert_allclose(M.apply_temperature(lp, 1.0), lp, atol=1e-12)
    for temp in (0.5, 3.0):
        out = M.apply_temperature(lp, temp)
        np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, atol=1e-12)
        expected = torch.log_softmax(torch.from_numpy(lp) / temp, -1).numpy()
        np.testing.assert_allclose(out, expected, atol=1e-12)
    with pytest.raises(ValueError):
        M.apply_temperature(lp, 0.0)


def test_fit_temperature_lowers_nll_of_overconfident_model():
    lp, y = overconfident_model(0)
    temp = M.fit_temperature(lp, y)
    assert temp > 1.5
    before = M.nll(lp, y)
    after = M.nll(M.apply_temperature(lp, temp), y)
    assert after < before - 0.1
    # independent check: coarse grid search with torch's cross-entropy on the MC average
    grid = np.exp(np.linspace(np.log(0.5), np.log(20), 400))
    lpt = torch.from_numpy(lp)

    def torch_nll(t):
        p = torch.softmax(lpt / t, -1).mean(0)
        return F.nll_loss(torch.log(p), torch.from_numpy(y)).item()

    best = grid[np.argmin([torch_nll(t) for t in grid])]
    assert temp == pytest.approx(best, rel=0.02)
    assert after <= torch_nll(best) + 1e-9
    # and the ECE typically improves too
    assert M.ece(M.apply_temperature(lp, temp), y) < M.ece(lp, y)


def test_fit_temperature_on_calibrated_model_is_near_one():
    lp, y = overconfident_model(1, n=5000, t=1, sharpen=1.0)
    # labels drawn from softmax(true_logits); model = true_logits + noise, so T stays close to 1
    assert 0.7 < M.fit_temperature(lp, y) < 1.4


# --------------------------------------------------------------------------- distribution shift


@pytest.fixture(scope="module")
def digits():
    return load_digits().images[:200]  # [N, 8, 8], values 0..16


@pytest.mark.parametrize("kind", M.CORRUPTIONS)
def test_corrupt_shapes_determinism_and_range(digits, kind):
    for x in (digits, digits[:, None].astype(np.float32)):
        out = M.corrupt(x, kind, 3, seed=1)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert np.isfinite(out).all()
        assert out.min() >= x.min() - 1e-5 and out.max() <= x.max() + 1e-5
        np.testing.assert_array_equal(out, M.corrupt(x, kind, 3, seed=1))
    assert not np.array_equal(
        M.corrupt(digits, kind, 3, seed=1), M.corrupt(digits, kind, 3, seed=2)
    )


@pytest.mark.parametrize("kind", M.CORRUPTIONS)
def test_corrupt_higher_severity_moves_input_further(digits, kind):
    dist = [np.linalg.norm(M.corrupt(digits, kind, s, seed=0) - digits) for s in range(1, 6)]
    assert all(a < b for a, b in zip(dist, dist[1:], strict=False)), dist
    assert dist[0] > 0


def test_rotation_by_90_degrees_is_rot90(digits):
    out = M.corrupt(digits, "rotation", 5, seed=0)
    for img, rot in zip(digits, out, strict=True):
        assert np.allclose(rot, np.rot90(img, 1), atol=1e-9) or np.allclose(
            rot, np.rot90(img, -1), atol=1e-9
        )


def test_corrupt_rejects_bad_arguments(digits):
    with pytest.raises(UserError, match="blur"):
        M.corrupt(digits, "blur", 1)
    with pytest.raises(UserError, match="severity"):
        M.corrupt(digits, "rotation", 6)
    with pytest.raises(ValueError):
        M.corrupt(digits[0], "rotation", 1)


def test_uniform_noise_like(digits):
    out = M.uniform_noise_like(digits, 50, seed=3)
    assert out.shape == (50, 8, 8) and out.dtype == digits.dtype
    assert out.min() >= digits.min() and out.max() <= digits.max()
    assert out.std() > 3  # spread over the 0..16 range, not a constant
    np.testing.assert_array_equal(out, M.uniform_noise_like(digits, 50, seed=3))
