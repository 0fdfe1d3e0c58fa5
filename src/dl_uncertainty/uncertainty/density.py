"""Feature-space density for out-of-distribution scores: a class-conditional Gaussian of a model's
penultimate features (DDU, Mukhoti et al. 2021; Mahalanobis, Lee et al. 2018), the energy score of
its logits, and the threshold at which to abstain.

Softmax confidence of a ReLU network grows far from the data, so predictive entropy can rank
uniform noise as *more* in-distribution than real images. A Gaussian per class fitted on the
training features ranks inputs by how close their features are to the training ones instead.

Only numpy here: fit on features the caller extracted (``model`` before its last linear layer,
in eval mode). ``state_dict()`` returns plain arrays, so a fitted density can sit in a model bundle.
"""

from __future__ import annotations

import math

import numpy as np

from dl_uncertainty.errors import UserError

COVARIANCES = ("shared", "per_class")
RIDGE_KEY = "evaluate.density_ridge"


def as_features(features, what: str, dtype=np.float64) -> np.ndarray:
    """``features`` as a finite [N, D] array; non-finite values are a user-facing error."""
    x = np.asarray(features, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"{what} must be [N, D] features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise UserError(f"{what} hold {int((~np.isfinite(x)).sum())} non-finite values; "
                        "the model's features overflowed before the density was fitted")
    return x


class ClassGaussianDensity:
    """A mixture of one Gaussian per class over features: weights = class frequencies, means per
    class, covariance shared by all classes (LDA-like, the default: robust with few rows) or one
    per class (DDU's GDA).

    ``ridge`` is added to every covariance's diagonal as a fraction of the mean feature variance
    (scale-free: 1e-3 means 0.1 % of the average variance), so a covariance estimated from fewer
    rows than features is still invertible. With ``ridge=0`` such a fit is refused with a message
    naming ``evaluate.density_ridge``, never turned into NaN scores.
    """

    def __init__(self, covariance: str = "shared", ridge: float = 1e-3):
        if covariance not in COVARIANCES:
            raise UserError(f"density covariance must be one of {COVARIANCES}, got {covariance!r}")
        if not ridge >= 0:
            raise UserError(f"{RIDGE_KEY} must be >= 0, got {ridge}")
        self.covariance, self.ridge = covariance, float(ridge)
        self.means: np.ndarray | None = None  # [K, D]
        self.log_weights: np.ndarray | None = None  # [K]
        self.chol: np.ndarray | None = None  # [K or 1, D, D] lower Cholesky factors
        self.log_dets: np.ndarray | None = None  # [K or 1]

    # ------------------------------------------------------------------ fitting

    def fit(self, features, labels, num_classes: int | None = None) -> ClassGaussianDensity:
        x = as_features(features, "training features")
        y = np.asarray(labels).reshape(-1).astype(np.int64)
        if len(y) != len(x):
            raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
        k = int(num_classes if num_classes is not None else y.max() + 1)
        counts = np.bincount(y, minlength=k)
        if (counts == 0).any():
            missing = ", ".join(str(c) for c in np.flatnonzero(counts == 0))
            raise UserError(f"cannot fit the feature density: no training rows of class {missing}")
        n, d = x.shape
        means = np.stack([x[y == c].mean(axis=0) for c in range(k)])
        centred = x - means[y]
        scale = max(float(centred.var(axis=0).mean()), 1e-12)  # the ridge's unit
        if self.covariance == "shared":
            covs = (centred.T @ centred / n)[None]
            rows_short = n - k < d
            short_text = f"{n} training rows in {k} classes for {d} features"
        else:
            covs = np.stack([centred[y == c].T @ centred[y == c] / counts[c] for c in range(k)])
            short = np.flatnonzero(counts <= d)
            rows_short = len(short) > 0
            short_text = (f"class {short[0]} has {counts[short[0]]} training rows for {d} features"
                          if rows_short else "")
        if rows_short and self.ridge == 0:
            raise UserError(f"cannot fit the feature density: {short_text}, so its covariance is singular; "
                            f"set {RIDGE_KEY} > 0 (e.g. 1e-3) or use a shared covariance")
        covs = covs + self.ridge * scale * np.eye(d)[None]
        chol, log_dets = [], []
        for c, cov in enumerate(covs):
            try:
                lower = np.linalg.cholesky(cov)
            except np.linalg.LinAlgError:
                which = "the shared covariance" if self.covariance == "shared" else f"class {c}'s covariance"
                raise UserError(f"cannot fit the feature density: {which} is singular (features that never "
                                f"vary); set {RIDGE_KEY} > 0 (now {self.ridge})") from None
            chol.append(lower)
            log_dets.append(2.0 * np.log(np.diag(lower)).sum())
        self.means, self.log_weights = means, np.log(counts / n)
        self.chol, self.log_dets = np.stack(chol), np.asarray(log_dets)
        return self

    # ------------------------------------------------------------------ scoring

    def _check_fitted(self) -> None:
        if self.means is None:
            raise RuntimeError("fit the density before scoring")

    def _mahalanobis_all(self, features) -> np.ndarray:
        """Squared Mahalanobis distance of every row to every class mean, [N, K]."""
        self._check_fitted()
        x = as_features(features, "features")
        if x.shape[1] != self.means.shape[1]:
            raise ValueError(f"features have {x.shape[1]} columns, the density was fitted on {self.means.shape[1]}")
        if getattr(self, "_whiten_of", None) is not self.chol:  # L^-1 once per fit: a served row costs a matmul
            self._whiten, self._whiten_of = np.linalg.inv(self.chol), self.chol
        out = np.empty((len(x), len(self.means)))
        if len(self._whiten) == 1:  # shared covariance: whiten the rows once, not once per class
            z, centres = x @ self._whiten[0].T, self.means @ self._whiten[0].T
            for c, centre in enumerate(centres):
                out[:, c] = np.square(z - centre).sum(axis=1)
            return out
        for c, mean in enumerate(self.means):
            z = (x - mean) @ self._whiten[c].T
            out[:, c] = (z * z).sum(axis=1)
        return out

    def class_log_densities(self, features) -> np.ndarray:
        """log N(f; mu_k, Sigma_k) for every row and class, [N, K]."""
        maha = self._mahalanobis_all(features)
        d = self.means.shape[1]
        return -0.5 * (d * math.log(2 * math.pi) + self.log_dets[None, :] + maha)

    def log_density(self, features) -> np.ndarray:
        """log sum_k pi_k N(f; mu_k, Sigma_k) per row, [N]: higher = more in-distribution."""
        a = self.class_log_densities(features) + self.log_weights[None, :]
        top = a.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(a - top).sum(axis=1, keepdims=True)))[:, 0]

    def min_mahalanobis(self, features) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean per row, [N]: higher = more OOD."""
        return self._mahalanobis_all(features).min(axis=1)

    # ------------------------------------------------------------------ storing

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted()
        return {"covariance": np.array(self.covariance), "ridge": np.array(self.ridge),
                "means": self.means, "log_weights": self.log_weights, "chol": self.chol,
                "log_dets": self.log_dets}

    @classmethod
    def from_state(cls, state: dict) -> ClassGaussianDensity:
        density = cls(str(np.asarray(state["covariance"])), float(np.asarray(state["ridge"])))
        for key in ("means", "log_weights", "chol", "log_dets"):
            setattr(density, key, np.asarray(state[key], dtype=np.float64))
        return density


def energy_score(logits, temperature: float = 1.0) -> np.ndarray:
    """``T * logsumexp(logits / T)`` per row (Liu et al. 2020): higher = more in-distribution.

    ``logits`` [N, K], or [S, N, K] MC samples / ensemble members, whose scores are averaged.
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=-1, keepdims=True)
    score = temperature * (top[..., 0] + np.log(np.exp(z - top).sum(axis=-1)))
    return score.mean(axis=0) if score.ndim == 2 else score


def fit_threshold(in_scores, target_rate: float = 0.95) -> float:
    """The score below which to abstain so that ``target_rate`` of in-distribution inputs are kept
    (scores: higher = more in-distribution, as ``log_density`` and ``energy_score``)."""
    if not 0 < target_rate <= 1:
        raise UserError(f"the in-distribution rate to keep must be in (0, 1], got {target_rate}")
    s = np.asarray(in_scores, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        raise UserError("cannot fit the abstain threshold: no finite in-distribution scores")
    return float(np.quantile(s, 1 - target_rate, method="lower"))
