"""After training, on the calibration split: temperature, conformal prediction sets, when to abstain.

The calibration split (``data.calib_fraction``) is neither the validation split, which stops training
and chooses between models, nor the test split, which is only reported. All three act on the served
predictive distribution, are fitted once on it and travel with the model in its bundle, so the served
model and the offline evaluation apply exactly the same numbers.

The temperature divides each MC sample's log-probabilities (``served_samples``); the served
probabilities are the mean of the scaled samples, and the served predictive entropy, expected
entropy and mutual information are those of the same scaled samples, so the entropy a row is
served with is the entropy of the probabilities it is served with.

Conformal sets (LAC, APS, RAPS; see ``conformal``) are split conformal. The thresholds are numbers
in the bundle's JSON, and the randomised scores' per-row uniforms are a keyed hash of the row's
inputs (``conformal.row_uniforms``), so a served row's set is the one evaluation measured. MAPIE
computes the same LAC sets (a test checks), but serving it would mean pickling a fitted
scikit-learn estimator into the model.

The temperature is kept only when its gain is larger than the noise of measuring it: the per-row
NLL difference on held-out rows (each half scored with T fitted on the other), bootstrapped; T is
kept when the 5 % quantile of the mean gain is above 0 (``Calibration.temperature_reason`` says why).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from omegaconf import DictConfig

from dl_uncertainty.uncertainty import conformal as CF
from dl_uncertainty.uncertainty import metrics as M

CONFORMAL_METHODS = CF.METHODS
BOOTSTRAP = 2000  # resamples of the held-out NLL gain
T_BOUNDS = (0.05, 20.0)  # the temperature's search interval


@dataclass
class Calibration:
    temperature: float  # divides each MC sample's log-probabilities; 1.0 when scaling did not help
    fitted_temperature: float
    val_nll: float  # NLL on the split it was fitted on (``split``) before scaling
    val_nll_calibrated: float  # ... with temperatures fitted on the other half (see ``fit``)
    alpha: float
    method: str  # the conformal score the served sets use
    thresholds: dict[str, float]  # conformal quantile per method
    max_entropy: float  # abstain above this predictive entropy (of the served, scaled MC samples)
    target_risk: float
    examples: int  # rows of ``split`` everything was fitted on
    errors: int = -1  # of those, how many the MC-averaged prediction gets wrong (-1: not recorded)
    k_reg: int = 0  # RAPS: ranks up to k_reg are not penalised
    lam: float = 0.0  # RAPS: penalty per rank beyond k_reg
    nonempty: bool = False  # the most likely class is always in the set
    randomized: bool = False  # APS/RAPS scores with a per-row uniform (False: bundles from before it)
    seed: int = 0  # keys the per-row uniforms
    nll_gain: list[float] = field(default_factory=list)  # held-out NLL gain of T: mean, 5 % and 95 % bootstrap
    temperature_reason: str = ""
    split: str = "val"  # the split it was fitted on: "calib" (bundles from before the calibration split: "val")

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

    def uniforms(self, rows: np.ndarray) -> np.ndarray | None:
        """The per-row uniforms of the randomised scores (None: not randomised)."""
        return CF.row_uniforms(rows, self.seed) if self.randomized else None

    def scores(self, probs: np.ndarray, u: np.ndarray | None, method: str) -> np.ndarray:
        return CF.class_scores(probs, method, u, self.k_reg, self.lam)

    def sets(self, probs: np.ndarray, u: np.ndarray | None, method: str | None = None,
             tau: float | None = None) -> np.ndarray:
        """Boolean ``[N, K]`` sets of ``method`` (default: the served one) at its bundled threshold or ``tau``."""
        method = method or self.method
        tau = self.thresholds.get(method, math.inf) if tau is None else tau
        return CF.sets_from_scores(self.scores(probs, u, method), tau, probs, self.nonempty)

    def threshold(self, probs: np.ndarray, labels: np.ndarray, u: np.ndarray | None, method: str,
                  alpha: float) -> float:
        """The conformal threshold of ``method`` at ``alpha`` on calibration rows ``probs``, ``labels``."""
        return CF.threshold(CF.true_class_scores(self.scores(probs, u, method), labels), alpha)


# --------------------------------------------------------------------------- fitting and applying


def served_samples(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """MC samples ``[T, N, K]`` as served: each sample's ``log softmax(log p_t / T)``."""
    return log_probs if temperature == 1.0 else M.apply_temperature(log_probs, temperature)


def served_mean(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """Log of the served probabilities ``mean_t softmax(log p_t / T)``, ``[N, K]``."""
    return M.mean_log_probs(served_samples(log_probs, temperature))


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




def held_out_gain(log_probs: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """NLL of MC samples ``[T, N, K]`` with temperatures fitted on the other half (2-fold: what
    scaling does to data it was not fitted on), and the per-row gain over no scaling: [mean, 5 %,
    95 %] of a paired bootstrap."""
    n = len(labels)
    before = -M.mean_log_probs(log_probs)[np.arange(n), labels]
    after = np.empty(n)
    halves = np.array_split(np.random.default_rng(0).permutation(n), 2)
    for fit_rows, score_rows in (halves, halves[::-1]):
        t = M.fit_temperature(log_probs[:, fit_rows], labels[fit_rows], T_BOUNDS)
        scaled = served_mean(log_probs[:, score_rows], t)
        after[score_rows] = -scaled[np.arange(len(score_rows)), labels[score_rows]]
    gain = before - after
    means = gain[np.random.default_rng(1).integers(0, n, (BOOTSTRAP, n))].mean(1)
    return float(after.mean()), [float(gain.mean()), *map(float, np.quantile(means, [0.05, 0.95]))]


def _keep_temperature(scaling: bool, n: int, errors: int, gain: list[float], fitted: float = 1.0) -> str:
    """Why T is kept or not: a sentence starting with "kept" or "not kept"."""
    if not scaling:
        return "not kept: evaluate.calibration=none" if n >= 4 else f"not kept: {n} calibration examples are too few"
    if errors == 0:
        return ("not kept: the model makes no error on the calibration split, so the NLL only falls as T -> 0 and the "
                "first error on new data would cost a huge NLL")
    if not T_BOUNDS[0] * 1.01 < fitted < T_BOUNDS[1] / 1.01:
        # Toward T -> 0 each MC sample turns one-hot and the served probabilities become the samples'
        # vote shares; a minimum at the bound is an artefact of the search interval, not a fitted T.
        return (f"not kept: the fitted T {fitted:.3g} is at its search bound, where the calibration split's NLL "
                "still falls, so the split does not pin T down")
    verdict = "kept" if gain[1] > 0 else "not kept"
    why = "above 0" if gain[1] > 0 else "not above 0: the gain is within its bootstrap noise"
    return (f"{verdict}: held-out NLL gain {gain[0]:.4f}, its bootstrap 5 % quantile {gain[1]:.4f} is {why}")


def _check_on_validation(reason: str, fitted: float, check) -> str:
    """A T the calibration split keeps must not raise the validation split's NLL: a calibration split
    whose few errors all keep some MC votes for their label lets T fall toward the samples' vote
    shares, and the first unanimous error elsewhere then costs a huge NLL."""
    if not reason.startswith("kept") or check is None:
        return reason
    log_probs, labels = check()
    plain, scaled = (M.nll(served_samples(log_probs, t), labels) for t in (1.0, fitted))
    if scaled <= plain:
        return reason
    return f"not kept: T {fitted:.3g} raises the validation split's NLL from {plain:.4f} to {scaled:.4f}"


def fit(val_log_probs: np.ndarray, val_labels: np.ndarray, cfg: DictConfig, rows: np.ndarray | None = None,
        seed: int = 0, split: str = "calib", check=None) -> Calibration:
    """Fit everything on the MC samples ``[T, N, K]`` of ``split`` (the calibration split); ``cfg``
    is ``cfg.evaluate``. The temperature minimises the NLL of the served distribution, the mean of
    the scaled samples; the abstain threshold is on the scaled samples' predictive entropy.

    ``rows``: that split's inputs, whose keyed hash (``seed``) gives APS and RAPS their per-row
    uniforms; without them, the MC-averaged log-probabilities stand in. The temperature is kept only
    if its held-out NLL gain is above its bootstrap noise and the model errs on some calibration
    example: with no error, the NLL only falls as T -> 0 and the sharpened model pays a huge NLL
    for its first error on new data. ``check``: a callable giving the validation split's MC samples
    and labels, read only for a T that would be kept, which must not raise their NLL.
    """
    mean = M.mean_log_probs(val_log_probs)
    before = M.nll(mean, val_labels)
    scaling = cfg.calibration == "temperature" and len(val_labels) >= 4
    fitted = M.fit_temperature(val_log_probs, val_labels, T_BOUNDS) if scaling else 1.0
    after, gain = held_out_gain(val_log_probs, val_labels) if scaling else (before, [0.0, 0.0, 0.0])
    errors = int((mean.argmax(1) != val_labels).sum())
    reason = _check_on_validation(_keep_temperature(scaling, len(val_labels), errors, gain, fitted), fitted, check)
    temperature = fitted if reason.startswith("kept") else 1.0
    samples = served_samples(val_log_probs, temperature)
    probs = np.exp(M.mean_log_probs(samples))
    correct = probs.argmax(1) == val_labels
    cal = Calibration(
        temperature=temperature, fitted_temperature=fitted, val_nll=before, val_nll_calibrated=after,
        alpha=cfg.alpha, method=cfg.conformal_method, thresholds={},
        max_entropy=entropy_threshold(M.predictive_entropy(samples), correct, cfg.target_risk),
        target_risk=cfg.target_risk, examples=len(val_labels), errors=errors,
        k_reg=int(cfg.get("raps_k_reg", 1)), lam=float(cfg.get("raps_lambda", 0.01)),
        nonempty=bool(cfg.get("conformal_nonempty", False)), randomized=True, seed=int(seed),
        nll_gain=gain, temperature_reason=reason, split=split,
    )
    u = cal.uniforms(mean if rows is None else rows)
    cal.thresholds = {m: cal.threshold(probs, val_labels, u, m, cfg.alpha) for m in CONFORMAL_METHODS}
    return cal


def decide(log_probs: np.ndarray, calibration: Calibration, rows: np.ndarray | None = None,
           density: np.ndarray | None = None, density_threshold: float | None = None) -> dict[str, np.ndarray]:
    """From MC samples ``[T, N, K]`` of inputs ``rows``: the served (temperature-scaled) probabilities,
    set and abstain flag, and the uncertainty of that same served distribution: total = entropy of
    the served probabilities, aleatoric = expected entropy of the scaled samples, epistemic = mutual
    information, their difference. ``rows`` key the randomised scores' uniforms; without them, the
    MC-averaged (unscaled) log-probabilities do. With ``density`` (feature log-density per row) and its
    threshold, a row abstains below that threshold instead of above the entropy threshold
    (``evaluate.abstain_on=density``)."""
    samples = served_samples(log_probs, calibration.temperature)
    mean = M.mean_log_probs(samples)
    probs = np.exp(mean)
    entropy = M.predictive_entropy(samples)
    expected = M.expected_entropy(samples)
    u = calibration.uniforms(M.mean_log_probs(log_probs) if rows is None else rows)
    sets = calibration.sets(probs, u)
    unsure = entropy > calibration.max_entropy if density is None else density < density_threshold
    abstain = (sets.sum(1) != 1) | unsure
    return {"probs": probs, "entropy": entropy, "expected_entropy": expected,
            "mutual_info": np.maximum(entropy - expected, 0.0), "sets": sets, "abstain": abstain, "u": u}
