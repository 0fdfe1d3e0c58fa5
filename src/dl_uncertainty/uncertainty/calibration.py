"""After training, on the validation split: temperature, conformal prediction sets, when to abstain.

All three act on the MC-averaged prediction (the model's predictive distribution), are fitted once
on held-out data and travel with the model in its bundle, so the served model and the offline
evaluation apply exactly the same numbers.

Conformal sets are split conformal (Vovk et al.; Angelopoulos & Bates, "A gentle introduction to
conformal prediction"): with n calibration scores, the set of classes whose score is at most the
ceil((n+1)(1-alpha))-th smallest contains the true class with probability >= 1 - alpha on
exchangeable data (and at most 1 - alpha + 1/(n+1) for continuous scores). LAC scores a class by
1 - p; APS by the probability mass of every class at least as likely as it (non-randomized, so it
covers a little more than asked). MAPIE computes the same LAC sets (a test checks), but serving it
would mean pickling a fitted scikit-learn estimator into the model; here the thresholds are numbers
in the bundle's JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from omegaconf import DictConfig

from dl_uncertainty.uncertainty import metrics as M

CONFORMAL_METHODS = ("lac", "aps")


@dataclass
class Calibration:
    temperature: float  # applied to the MC-averaged log-probabilities; 1.0 when scaling did not help
    fitted_temperature: float
    val_nll: float  # validation NLL before scaling
    val_nll_calibrated: float  # ... with ``temperature``, on held-out halves (see ``fit``)
    alpha: float
    method: str  # the conformal score the served sets use
    thresholds: dict[str, float]  # conformal quantile per method
    max_entropy: float  # abstain above this predictive entropy (of the MC samples, before scaling)
    target_risk: float
    examples: int  # validation examples everything was fitted on
    errors: int = -1  # of those, how many the MC-averaged prediction gets wrong (-1: not recorded)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Calibration:
        return cls(**values)

    @classmethod
    def identity(cls) -> Calibration:
        """For a model logged without calibration: no set is guaranteed, so every set is full
        and the model always abstains."""
        return cls(1.0, 1.0, math.nan, math.nan, 0.0, "lac", {m: math.inf for m in CONFORMAL_METHODS},
                   math.inf, math.nan, 0)


# --------------------------------------------------------------------------- conformal prediction


def class_scores(probs: np.ndarray, method: str) -> np.ndarray:
    """``[N, K]`` non-conformity of every class, as if it were the label (higher = less plausible)."""
    probs = np.asarray(probs, dtype=np.float64)
    if method == "lac":
        return 1.0 - probs
    if method == "aps":
        order = np.argsort(-probs, axis=1, kind="stable")
        cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
        scores = np.empty_like(probs)
        np.put_along_axis(scores, order, cumulative, axis=1)
        return scores
    raise ValueError(f"unknown conformal method {method!r}; one of {CONFORMAL_METHODS}")


def conformal_threshold(probs: np.ndarray, labels: np.ndarray, alpha: float, method: str) -> float:
    """The ceil((n+1)(1-alpha))-th smallest of the true classes' scores (inf if that exceeds n)."""
    scores = np.sort(class_scores(probs, method)[np.arange(len(labels)), labels])
    rank = math.ceil((len(scores) + 1) * (1 - alpha))
    if rank > len(scores):  # too few examples for this alpha: only the full set is guaranteed
        return math.inf
    return float(scores[rank - 1])


def prediction_sets(probs: np.ndarray, threshold: float, method: str) -> np.ndarray:
    """Boolean ``[N, K]``: class k is in example n's set."""
    return class_scores(probs, method) <= threshold + 1e-12  # float noise in APS's cumulative sums


def set_metrics(sets: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"coverage": float(sets[np.arange(len(labels)), labels].mean()),
            "set_size": float(sets.sum(1).mean())}


# --------------------------------------------------------------------------- fitting and applying


def calibrated_log_probs(mean_log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """``log softmax(log p_bar / T)``: temperature scaling of the predictive distribution itself."""
    return M.apply_temperature(mean_log_probs, temperature)


def entropy_threshold(entropy: np.ndarray, correct: np.ndarray, target_risk: float) -> float:
    """The highest predictive entropy at which the examples kept still err at most ``target_risk``."""
    order = np.argsort(entropy, kind="stable")
    risk = np.cumsum(~correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(risk <= target_risk)
    if len(ok) == 0:
        return -1.0  # even the most confident examples err too often: always abstain
    if ok[-1] == len(order) - 1:
        return math.inf
    return float(entropy[order][ok[-1]])




def _held_out_nll(mean_log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Validation NLL with temperatures fitted on the other half (2-fold): what scaling does to
    data it was not fitted on. In-sample, a fitted temperature always looks like an improvement."""
    halves = np.array_split(np.random.default_rng(0).permutation(len(labels)), 2)
    total = 0.0
    for fit_on_, score_on in (halves, halves[::-1]):
        t = M.fit_temperature(mean_log_probs[fit_on_], labels[fit_on_])
        total += len(score_on) * M.nll(calibrated_log_probs(mean_log_probs[score_on], t), labels[score_on])
    return total / len(labels)


def fit(val_log_probs: np.ndarray, val_labels: np.ndarray, cfg: DictConfig) -> Calibration:
    """Fit everything on the validation split's MC samples ``[T, N, K]``; ``cfg`` is ``cfg.evaluate``.

    The temperature is kept only if it lowers the held-out validation NLL (2-fold cross-fitting) and
    the model errs on some validation example: with no error, the NLL only falls as T -> 0, and the
    sharpened model pays a huge NLL for its first error on new data.
    """
    mean = M.mean_log_probs(val_log_probs)
    before = M.nll(mean, val_labels)
    scaling = cfg.calibration == "temperature" and len(val_labels) >= 4
    fitted = M.fit_temperature(mean, val_labels) if scaling else 1.0
    after = _held_out_nll(mean, val_labels) if scaling else before
    errors = int((mean.argmax(1) != val_labels).sum())
    temperature = fitted if after < before and errors > 0 else 1.0
    probs = np.exp(calibrated_log_probs(mean, temperature))
    correct = probs.argmax(1) == val_labels
    return Calibration(
        temperature=temperature, fitted_temperature=fitted, val_nll=before, val_nll_calibrated=after,
        alpha=cfg.alpha, method=cfg.conformal_method,
        thresholds={m: conformal_threshold(probs, val_labels, cfg.alpha, m) for m in CONFORMAL_METHODS},
        max_entropy=entropy_threshold(M.predictive_entropy(val_log_probs), correct, cfg.target_risk),
        target_risk=cfg.target_risk, examples=len(val_labels), errors=errors,
    )


def decide(log_probs: np.ndarray, calibration: Calibration) -> dict[str, np.ndarray]:
    """From MC samples ``[T, N, K]``: calibrated probabilities, the served set and abstain, with the
    MC samples' own uncertainty (total = entropy, epistemic = mutual information; 0 <= MI <= H)."""
    probs = np.exp(calibrated_log_probs(M.mean_log_probs(log_probs), calibration.temperature))
    entropy = M.predictive_entropy(log_probs)
    sets = prediction_sets(probs, calibration.thresholds[calibration.method], calibration.method)
    abstain = (sets.sum(1) != 1) | (entropy > calibration.max_entropy)
    return {"probs": probs, "entropy": entropy, "mutual_info": M.mutual_information(log_probs),
            "sets": sets, "abstain": abstain}
