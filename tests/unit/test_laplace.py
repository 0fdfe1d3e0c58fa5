"""model=laplace: the last-layer posterior against brute force, its links, seeding, bundle and config checks."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.splits import Schema, Split
from dl_uncertainty.errors import UserError
from dl_uncertainty.families import laplace as L
from dl_uncertainty.families.base import build_model, family_of
from dl_uncertainty.families.networks import last_linear, penultimate
from dl_uncertainty.families.predict import predict_log_probs
from dl_uncertainty.tracking.bundle import load_bundle, save_bundle
from dl_uncertainty.uncertainty import metrics as M

FEATURES, CLASSES = 4, 3


def _cfg(**keys):
    base = {"name": "laplace", "arch": "mlp", "hidden_sizes": [5], "conv_channels": [2], "res_blocks": 1,
            "activation": "tanh", "dropout": 0.0, "hessian": "kron", "prior_precision": 1.0,
            "prior_precision_fit": "none", "link": "mc"}
    return OmegaConf.create({**base, **keys})


def _split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    schema = Schema(feature_shape=[FEATURES], class_names=["a", "b", "c"], ood_class_names=[], source="test")
    return Split(x, rng.integers(0, CLASSES, n), schema)


def _fitted(seed: int = 0, n: int = 30, **keys):
    torch.manual_seed(seed)
    cfg = _cfg(**keys)
    model = build_model(cfg, [FEATURES], CLASSES)
    with torch.no_grad():  # a confident network, so the posterior is not just the prior
        last_linear(model.net).weight.mul_(4)
    train = _split(n, seed)
    family_of(model).after_training(model, train, _split(20, seed + 1), OmegaConf.create(
        {"model": cfg, "evaluate": {"mc_samples": 20}, "seed": 3}))
    return model, train


def _ggn_by_jacobians(model, x: np.ndarray) -> torch.Tensor:
    """sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n, J_n by autograd w.r.t. the [K, F+1] weights."""
    feats = penultimate(model.net, torch.as_tensor(x)).double().clone()
    theta = model.weights().double()
    h = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for a in feats:
        def logits(t, a=a):
            return t[:, :-1] @ a + t[:, -1]
        jac = torch.autograd.functional.jacobian(logits, theta).reshape(CLASSES, -1)
        p = torch.softmax(logits(theta), 0)
        h += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return h


def test_diag_posterior_is_the_inverse_of_the_brute_force_ggn_diagonal_plus_prior():
    model, train = _fitted(hessian="diag", prior_precision=0.7)
    h = _ggn_by_jacobians(model, train.x)
    expected = torch.diag(1.0 / (torch.diag(h) + 0.7))
    torch.testing.assert_close(model.covariance().double(), expected, rtol=1e-4, atol=1e-6)


def test_kron_posterior_inverts_n_g_kron_a_from_the_factors_definitions():
    model, train = _fitted(hessian="kron", prior_precision=0.7)
    a = torch.cat([penultimate(model.net, torch.as_tensor(train.x)).double(), torch.ones(len(train.x), 1,
                                                                                          dtype=torch.float64)], 1)
    p = torch.softmax(a @ model.weights().double().T, 1)
    big_a = sum(torch.outer(r, r) for r in a) / len(a)
    big_g = sum(torch.diag(q) - torch.outer(q, q) for q in p) / len(a)
    precision = len(a) * torch.kron(big_g, big_a) + 0.7 * torch.eye(a.shape[1] * CLASSES, dtype=torch.float64)
    torch.testing.assert_close(model.covariance().double(), torch.linalg.inv(precision), rtol=1e-3, atol=1e-5)
    # and on a single example the Kronecker product is exact: the brute-force GGN itself
    one, _ = _fitted(hessian="kron", n=1, prior_precision=0.7)
    exact = _ggn_by_jacobians(one, _split(1, 0).x) + 0.7 * torch.eye(CLASSES * (5 + 1), dtype=torch.float64)
    torch.testing.assert_close(one.covariance().double(), torch.linalg.inv(exact), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("hessian", ["diag", "kron"])
def test_marglik_prior_precision_maximises_the_brute_force_laplace_evidence(hessian):
    model, train = _fitted(hessian=hessian, prior_precision_fit="marglik")
    delta = float(model.prior_precision)
    precision = torch.linalg.inv(model.covariance().double())  # H + delta I, as the model holds it
    h = precision - delta * torch.eye(len(precision), dtype=torch.float64)
    theta_sq = float(model.weights().double().pow(2).sum())

    def evidence(d):  # log p(theta*; d) - 1/2 log det(H + d I) + const, by dense slogdet
        return (0.5 * len(h) * math.log(d) - 0.5 * d * theta_sq
                - 0.5 * torch.linalg.slogdet(h + d * torch.eye(len(h), dtype=torch.float64))[1].item())

    assert 0 < delta < 1e6
    assert evidence(delta) > evidence(delta * 1.2) and evidence(delta) > evidence(delta / 1.2)


def test_mc_logits_have_the_posterior_moments():
    model, train = _fitted(prior_precision=3.0)
    model = model.double()
    a = L.augmented(penultimate(model.net, torch.as_tensor(train.x[:5], dtype=torch.float64))).double()
    logits = L.sample_logits(model, a, 20000, seed=5)
    cov = model.covariance().double()
    for n in range(5):  # f = W a: mean W* a, covariance J Sigma J^T with J = I kron a^T
        jac = torch.kron(torch.eye(CLASSES, dtype=torch.float64), a[n][None])
        torch.testing.assert_close(logits[:, n].mean(0), model.weights().double() @ a[n], atol=0.03, rtol=0)
        torch.testing.assert_close(logits[:, n].T.cov(), jac @ cov @ jac.T, atol=0.03, rtol=0.05)


def test_mc_and_probit_approach_the_exact_predictive_of_a_binary_toy():
    """Class 0's logit fixed at 0, class 1's ~ N(mu, v): p_1 = E[sigmoid(f)], by Gauss-Hermite quadrature;
    the probit link is then exactly MacKay's sigmoid(mu / sqrt(1 + pi v / 8))."""
    torch.manual_seed(0)
    model = build_model(_cfg(), [FEATURES], 2).double()
    with torch.no_grad():
        layer = last_linear(model.net)
        layer.weight[0], layer.bias[0] = 0.0, 0.0
        layer.weight[1].mul_(6)
        layer.bias[1] = 2.0
        model.variance[1] = 2.0  # row 0 stays 0: class 0's logit is exactly 0
        model.prior_precision.fill_(1.0)
    a = L.augmented(penultimate(model.net, torch.as_tensor(_split(12, 3).x, dtype=torch.float64))).double()
    mu, var = a @ model.weights()[1], 2.0 * (a * a).sum(1)
    z, w = np.polynomial.hermite_e.hermegauss(80)
    exact = (torch.sigmoid(mu[:, None] + var.sqrt()[:, None] * torch.as_tensor(z)) @ torch.as_tensor(w)) / w.sum()
    mc = torch.softmax(L.sample_logits(model, a, 40000, seed=1), -1).mean(0)[:, 1]
    probit = L.probit_log_probs(model, a).exp()[:, 1]
    assert var.min() > 2 and (torch.sigmoid(mu) - exact).abs().max() > 0.1  # the variance matters here
    torch.testing.assert_close(mc, exact, atol=0.01, rtol=0)
    torch.testing.assert_close(probit, exact, atol=0.02, rtol=0)


def test_a_row_gets_the_same_answer_alone_or_in_any_batch():
    model, _ = _fitted()
    x = torch.as_tensor(_split(9, 7).x)
    family = family_of(model)
    batch = family.sample(model, x, 30, seed=11)
    alone = family.sample(model, x[4:5], 30, seed=11)
    reversed_ = family.sample(model, x.flip(0), 30, seed=11).flip(1)
    torch.testing.assert_close(alone[:, 0], batch[:, 4], atol=1e-5, rtol=0)
    torch.testing.assert_close(reversed_, batch, atol=1e-5, rtol=0)
    chunked = predict_log_probs(model, x, 30, batch_size=2, seed=11)
    torch.testing.assert_close(chunked, batch, atol=1e-5, rtol=0)
    assert ((batch[1:] - batch[:-1]).abs().amax(-1) > 0).all()  # the weight draws differ
    assert not torch.equal(batch, family.sample(model, x, 30, seed=12))


def test_probit_link_is_one_distribution_repeated_so_its_mutual_information_is_zero():
    model, _ = _fitted(link="probit")
    lp = predict_log_probs(model, _split(6, 2).x, 7, seed=1)
    assert lp.shape == (7, 6, CLASSES)
    assert torch.equal(lp[0], lp[6])
    assert np.allclose(M.mutual_information(lp.numpy()), 0, atol=1e-6)


def test_before_fitting_the_samples_are_the_map_network(tiny_cfg):
    model = build_model(_cfg(), [FEATURES], CLASSES)
    x = torch.as_tensor(_split(4, 0).x)
    lp = family_of(model).sample(model, x, 3)
    torch.testing.assert_close(lp, torch.log_softmax(model.eval()(x), -1).expand(3, -1, -1).detach())


@pytest.mark.parametrize(("hessian", "link"), [("diag", "mc"), ("kron", "probit")])
def test_a_bundle_round_trip_gives_identical_predictions(tmp_path, hessian, link):
    cfg = load_config(["model=laplace", f"model.hessian={hessian}", f"model.link={link}", "model.arch=mlp",
                       "model.hidden_sizes=[5]", "model.activation=tanh"])
    model, train = _fitted(hessian=hessian, link=link)
    save_bundle(model, cfg, train.schema, tmp_path)
    loaded, *_ = load_bundle(tmp_path)
    assert loaded.fitted and loaded.prior_precision == model.prior_precision
    x = _split(11, 4).x
    assert torch.equal(predict_log_probs(loaded, x, 25, seed=42), predict_log_probs(model, x, 25, seed=42))


def test_training_fits_a_posterior_with_disagreeing_samples(tiny_cfg, digits_splits):
    from dl_uncertainty.training.loop import train_model

    model = train_model(tiny_cfg("model=laplace"), digits_splits["train"], digits_splits["val"], quiet=True).model
    assert model.fitted
    test = digits_splits["test"]
    lp = predict_log_probs(model, test.x, 20, seed=0).numpy()
    assert M.accuracy(lp, test.y) > 0.8
    assert M.mutual_information(lp).mean() > 0
    assert family_of(model).features(model, torch.as_tensor(test.x[:3])).shape == (3, 64)


@pytest.mark.parametrize(("override", "key"), [
    ("model.prior_precision=-1", "model.prior_precision"),
    ("model.prior_precision=0", "model.prior_precision"),
    ("model.hessian=full", "model.hessian"),
    ("model.link=logit", "model.link"),
    ("model.prior_precision_fit=cv", "model.prior_precision_fit"),
])
def test_a_bad_laplace_config_is_one_user_error_naming_the_key(override, key):
    cfg = load_config(["model=laplace", override])
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_model(cfg.model, [FEATURES], CLASSES)


def test_a_prior_precision_of_the_wrong_type_is_refused_at_load():
    with pytest.raises(UserError, match=r"model\.prior_precision"):
        load_config(["model=laplace", "model.prior_precision=abc"])
