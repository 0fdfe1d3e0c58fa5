"""Temperature on the MC-averaged prediction (kept beyond its bootstrap noise), LAC as MAPIE has it, the abstain threshold."""

import math

import numpy as np
import pytest

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.errors import UserError
from dl_uncertainty.uncertainty import calibration as C
from dl_uncertainty.uncertainty import conformal as CF
from dl_uncertainty.uncertainty import metrics as M


def calibrated_data(n: int, k: int = 5, seed: int = 0):
    """Probabilities and labels drawn from them: the model is calibrated by construction."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(k, 0.4), size=n)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return probs, labels


def test_lac_sets_are_mapies():
    """MAPIE's split-conformal classifier, given the same probabilities, picks the same LAC sets."""
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    class GivenProbabilities(ClassifierMixin, BaseEstimator):  # predict_proba(X) = X
        def fit(self, x, y):
            self.classes_ = np.arange(x.shape[1])
            return self

        def predict_proba(self, x):
            return x

        def predict(self, x):
            return x.argmax(1)

    probs, labels = calibrated_data(600, seed=3)
    for alpha in (0.05, 0.1, 0.2):
        mapie = SplitConformalClassifier(GivenProbabilities().fit(probs, labels), confidence_level=1 - alpha,
                                         conformity_score="lac", prefit=True)
        mapie.conformalize(probs[:300], labels[:300])
        expected = mapie.predict_set(probs[300:])[1][:, :, 0]
        tau = CF.threshold(CF.true_class_scores(CF.class_scores(probs[:300], "lac"), labels[:300]), alpha)
        ours = CF.sets_from_scores(CF.class_scores(probs[300:], "lac"), tau, probs[300:])
        np.testing.assert_array_equal(ours, expected)


def test_conformal_threshold_is_the_finite_sample_quantile():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    labels = np.array([0, 0, 1, 1])  # LAC scores 0.1, 0.4, 0.2, 0.7
    scores = CF.true_class_scores(CF.class_scores(probs, "lac"), labels)
    # n = 4, alpha = 0.4: ceil(5 * 0.6) / 4 = 0.75 -> the 3rd smallest score
    assert CF.threshold(scores, 0.4) == pytest.approx(0.4)
    with pytest.raises(UserError, match=r"the calibration split has 4 rows, too few for evaluate.alpha=0.1 .*9 rows.*data.calib_fraction or evaluate.alpha"):
        CF.threshold(scores, 0.1)  # ceil(5 * 0.9) > 4: only the full set is guaranteed


def test_temperature_is_kept_on_a_mis_scaled_model_and_refused_on_a_noise_level_gain():
    rng = np.random.default_rng(1)
    probs, labels = calibrated_data(300, seed=1)
    # overconfident MC samples: sharpen the calibrated logits, plus per-sample noise
    logits = np.log(probs)[None] * 3 + rng.normal(0, 0.3, (10, *probs.shape))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    cfg = load_config([]).evaluate
    fitted = C.fit(log_probs, labels, cfg)
    mean = M.mean_log_probs(log_probs)
    assert fitted.temperature > 1.5 and fitted.temperature_reason.startswith("kept")
    assert fitted.nll_gain[1] > 0 and fitted.val_nll_calibrated < fitted.val_nll
    assert fitted.val_nll == pytest.approx(M.nll(mean, labels))
    # the served distribution is the mean of the scaled samples: T minimises its NLL
    assert fitted.temperature == pytest.approx(M.fit_temperature(log_probs, labels))
    assert M.nll(C.served_mean(log_probs, fitted.temperature), labels) < M.nll(
        C.served_mean(log_probs, M.fit_temperature(mean, labels)), labels)
    # models calibrated already: in-sample a fitted T always "helps"; beyond its bootstrap noise it does not
    in_sample_gains, held_out_gains, kept = 0, 0, 0
    for seed in range(20):
        p, y = calibrated_data(217, seed=seed)
        exact = C.fit(np.log(p)[None], y, cfg)
        in_sample_gains += M.nll(M.apply_temperature(np.log(p), exact.fitted_temperature), y) < exact.val_nll
        held_out_gains += exact.nll_gain[0] > 0
        kept += exact.temperature != 1.0
        assert (exact.temperature != 1.0) == (exact.nll_gain[1] > 0)
        assert exact.temperature_reason.startswith("kept" if exact.temperature != 1.0 else "not kept")
    assert in_sample_gains == 20 and held_out_gains >= 1 and kept <= 1
    off = C.fit(log_probs, labels, load_config(["evaluate.calibration=none"]).evaluate)
    assert off.temperature == 1.0 and off.val_nll_calibrated == off.val_nll
    assert off.temperature_reason == "not kept: evaluate.calibration=none"


def test_no_temperature_is_kept_when_the_model_makes_no_validation_error():
    # every validation example right: the NLL keeps falling as T -> 0, on held-out halves too, yet the
    # sharpened model would pay a huge NLL for its first error on new data
    labels = np.arange(90) % 3
    probs = np.full((90, 3), 0.05)
    probs[np.arange(90), labels] = 0.9
    cfg = load_config([]).evaluate
    fitted = C.fit(np.log(probs)[None], labels, cfg)
    assert fitted.errors == 0 and fitted.fitted_temperature < 0.1
    assert fitted.val_nll_calibrated < fitted.val_nll  # held out, it would still look like a gain
    assert fitted.temperature == 1.0 and "no error on the calibration split" in fitted.temperature_reason
    probs[0] = [0.05, 0.9, 0.05]  # one error: the same over-confident-looking model may now be sharpened
    one_error = C.fit(np.log(probs)[None], labels, cfg)
    assert one_error.errors == 1 and (one_error.temperature != 1.0) == (one_error.nll_gain[1] > 0)


def test_entropy_threshold_keeps_the_validation_risk_at_the_target():
    rng = np.random.default_rng(2)
    entropy = rng.uniform(0, 2, 1000)
    correct = rng.uniform(0, 1, 1000) > entropy / 4  # errors grow with entropy
    threshold = C.entropy_threshold(entropy, correct, 0.05)
    kept = entropy <= threshold
    assert 0 < kept.mean() < 1
    assert (~correct[kept]).mean() <= 0.05
    assert (~correct[entropy <= np.sort(entropy)[kept.sum()]]).mean() > 0.05  # one more would break it
    assert C.entropy_threshold(entropy, np.ones(1000, bool), 0.05) == math.inf
    assert C.entropy_threshold(entropy, np.zeros(1000, bool), 0.05) == -1.0


def test_decide_abstains_on_non_singleton_sets_and_high_entropy():
    cal = C.Calibration(1.0, 1.0, 0.1, 0.1, 0.1, "lac", {"lac": 0.6, "aps": 0.9}, 0.5, 0.01, 100)
    probs = np.array([[0.98, 0.01, 0.01], [0.55, 0.45 - 1e-9, 1e-9], [0.35, 0.33, 0.32]])
    out = C.decide(np.log(probs)[None], cal)
    assert out["sets"].sum(1).tolist() == [1, 2, 0]
    assert out["abstain"].tolist() == [False, True, True]
    cal.max_entropy = 0.01
    assert C.decide(np.log(probs)[None], cal)["abstain"].tolist() == [True, True, True]


def test_evaluating_the_same_model_twice_gives_the_same_numbers(tiny_cfg, digits_splits):
    from dl_uncertainty.reports.evaluation import evaluate_model
    from dl_uncertainty.training.loop import train_model

    cfg = tiny_cfg("model=mc_dropout_dnn", "train.epochs=1")
    s = digits_splits
    model = train_model(cfg, s["train"], s["val"]).model
    first, second = (evaluate_model(model, cfg, s["test"], s["ood"], s["val"], with_figures=False).metrics
                     for _ in range(2))
    assert first == second
    other = evaluate_model(model, tiny_cfg("model=mc_dropout_dnn", "seed=7"), s["test"], with_figures=False)
    assert other.metrics["nll"] != first["nll"]  # the MC samples do come from the seed


def test_served_uncertainty_is_that_of_the_served_probabilities():
    """Temperature applied to each MC sample: the served entropy is the entropy of the served
    probabilities, and it splits into expected entropy (aleatoric) + mutual information."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (12, 40, 5))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = rng.integers(0, 5, 40)
    cal = C.fit(log_probs, labels, load_config(["evaluate.alpha=0.2"]).evaluate)
    for temperature in (0.5, 1.0, 2.5):
        cal.temperature = temperature
        out = C.decide(log_probs, cal)
        probs = out["probs"]
        assert np.allclose(probs.sum(1), 1)
        served_entropy = -(probs * np.log(probs)).sum(1)
        assert np.abs(out["entropy"] - served_entropy).max() < 1e-6
        scaled = M.apply_temperature(log_probs, temperature)
        assert np.allclose(probs, np.exp(scaled).mean(0))  # the mean of the scaled samples
        assert np.allclose(out["expected_entropy"], -(np.exp(scaled) * scaled).sum(-1).mean(0))
        assert np.allclose(out["mutual_info"], out["entropy"] - out["expected_entropy"])
        assert (out["mutual_info"] >= 0).all()
    assert not np.allclose(C.decide(log_probs, cal)["entropy"], M.predictive_entropy(log_probs))  # T = 2.5 counts


def test_a_temperature_at_its_search_bound_is_not_kept():
    # under-confident MC samples that err only where some samples vote right: the calibration NLL keeps
    # falling as T -> 0 (each sample one-hot, the served probability the vote share), down to the bound
    k, samples = 3, 10
    labels = np.arange(200) % k
    probs = np.full((samples, 200, k), 0.25)
    probs[:, np.arange(200), labels] = 0.5
    wrong = (labels + 1) % k
    for row in range(10):  # 6 of 10 samples favour a wrong class: the MC average errs
        probs[:6, row] = 0.25
        probs[:6, row, wrong[row]] = 0.5
    fitted = C.fit(np.log(probs), labels, load_config([]).evaluate)
    assert fitted.errors == 10 and fitted.fitted_temperature == pytest.approx(C.T_BOUNDS[0], rel=0.01)
    assert fitted.nll_gain[1] > 0  # the held-out gain alone would keep it
    assert fitted.temperature == 1.0 and "search bound" in fitted.temperature_reason


def test_a_temperature_that_raises_the_validation_nll_is_not_kept():
    # the calibration split sees an under-confident model (a sharpening T wins there beyond noise); on the
    # validation split the same model is calibrated already, and that T would make it over-confident
    rng = np.random.default_rng(2)

    def samples(scale: float, seed: int):
        probs, labels = calibrated_data(300, seed=seed)
        logits = np.log(probs)[None] * scale + rng.normal(0, 0.2, (10, *probs.shape))
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True)), labels

    calib, calib_labels = samples(0.4, 3)
    cfg = load_config(["evaluate.calibration=temperature"]).evaluate
    alone = C.fit(calib, calib_labels, cfg)
    assert alone.temperature < 0.7 and alone.temperature_reason.startswith("kept")
    alike = C.fit(calib, calib_labels, cfg, check=lambda: samples(0.4, 4))  # validation alike: still kept
    assert alike.temperature == alone.temperature
    checked = C.fit(calib, calib_labels, cfg, check=lambda: samples(1.0, 4))
    assert checked.temperature == 1.0 and checked.fitted_temperature == alone.fitted_temperature
    assert checked.temperature_reason.startswith(f"not kept: T {alone.fitted_temperature:.3g} raises the validation "
                                                 "split's NLL from ")
