import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from torch import nn

from dl_uncertainty.errors import UserError
from dl_uncertainty.uncertainty.density import ClassGaussianDensity, energy_score, fit_threshold


def test_log_density_is_the_class_weighted_gaussian_mixture():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (300, 3)), rng.normal(4, 2, (100, 3))]
    y = np.r_[np.zeros(300, int), np.ones(100, int)]
    dens = ClassGaussianDensity("per_class", ridge=0.0).fit(x, y)
    q = rng.normal(2, 3, (20, 3))
    expected = []
    for c, w in ((0, 0.75), (1, 0.25)):
        xc = x[y == c]
        cov = np.cov(xc, rowvar=False, bias=True)
        expected.append(np.log(w) + multivariate_normal(xc.mean(0), cov).logpdf(q))
    np.testing.assert_allclose(dens.log_density(q), logsumexp(np.stack(expected), axis=0), rtol=1e-8)
    # the nearest class mean in Mahalanobis distance is the one with the highest class density here
    assert dens.min_mahalanobis(q).shape == (20,)


def _tiny_trained_features():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.as_tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.as_tensor(d.target)
    body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
    model = nn.Sequential(body, nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train, test = slice(0, 1400), slice(1400, None)
    for _ in range(30):
        for idx in torch.randperm(1400).split(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[train][idx]), y[train][idx]).backward()
            opt.step()
    noise = torch.rand(300, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        return acc, body(x[train]).numpy(), y[train].numpy(), body(x[test]).numpy(), body(noise).numpy()


def _auroc(in_scores, out_scores):  # higher score = more in-distribution; P(in > out)
    diff = np.asarray(in_scores)[:, None] - np.asarray(out_scores)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def test_density_separates_uniform_noise_from_the_training_distribution():
    acc, f_train, y_train, f_test, f_noise = _tiny_trained_features()
    assert acc > 0.9
    dens = ClassGaussianDensity("per_class", ridge=1e-3).fit(f_train, y_train)
    s_test, s_noise = dens.log_density(f_test), dens.log_density(f_noise)
    assert np.isfinite(s_test).all() and np.isfinite(s_noise).all()
    assert _auroc(s_test, s_noise) > 0.95
    assert _auroc(-dens.min_mahalanobis(f_test), -dens.min_mahalanobis(f_noise)) > 0.95
    # an abstain threshold fitted on the test scores keeps that share of them and rejects the noise
    threshold = fit_threshold(s_test, 0.95)
    assert (s_test >= threshold).mean() == pytest.approx(0.95, abs=0.01)
    assert (s_noise < threshold).mean() > 0.8


def test_too_few_rows_per_class_without_a_ridge_names_the_key():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 20)), np.repeat([0, 1, 2], 10)  # 10 rows per class, 20 features
    with pytest.raises(UserError, match=r"evaluate\.density_ridge") as err:
        ClassGaussianDensity("per_class", ridge=0.0).fit(x, y)
    assert "class 0 has 10 training rows for 20 features" in str(err.value)
    scores = ClassGaussianDensity("per_class", ridge=1e-2).fit(x, y).log_density(rng.normal(size=(5, 20)))
    assert np.isfinite(scores).all()


def test_a_feature_that_never_varies_without_a_ridge_names_the_key():
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(size=(200, 4)), np.zeros(200)]  # a dead ReLU unit
    y = rng.integers(0, 2, 200)
    with pytest.raises(UserError, match=r"evaluate\.density_ridge"):
        ClassGaussianDensity("shared", ridge=0.0).fit(x, y)
    assert np.isfinite(ClassGaussianDensity("shared", ridge=1e-3).fit(x, y).log_density(x)).all()


def test_state_round_trips_through_plain_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 6)), rng.integers(0, 3, 100)
    dens = ClassGaussianDensity("per_class", ridge=1e-3).fit(x, y)
    np.savez(tmp_path / "density.npz", **dens.state_dict())
    back = ClassGaussianDensity.from_state(dict(np.load(tmp_path / "density.npz")))
    assert back.covariance == "per_class" and back.ridge == 1e-3
    np.testing.assert_array_equal(back.log_density(x), dens.log_density(x))


def test_energy_is_the_logsumexp_of_the_logits_averaged_over_samples():
    logits = np.random.default_rng(0).normal(size=(4, 7, 3))
    np.testing.assert_allclose(energy_score(logits[0]), logsumexp(logits[0], axis=-1))
    np.testing.assert_allclose(energy_score(logits), logsumexp(logits, axis=-1).mean(0))
    np.testing.assert_allclose(energy_score(logits[0], temperature=2.0), 2 * logsumexp(logits[0] / 2, axis=-1))
    with pytest.raises(UserError):
        fit_threshold([1.0, 2.0], 0.0)
