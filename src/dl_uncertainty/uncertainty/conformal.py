"""Split-conformal prediction sets: LAC, APS and RAPS scores, thresholds, and what a report shows.

Split conformal (Vovk et al.; Angelopoulos & Bates, "A gentle introduction to conformal
prediction"): with n calibration scores, the set of classes whose score is at most the
ceil((n+1)(1-alpha))-th smallest contains the true class with probability >= 1 - alpha on
exchangeable data, and at most 1 - alpha + 1/(n+1) when the scores have no ties.

Scores of class y for probabilities p (higher = less plausible), with o(y) the 1-based rank of y
when the classes are sorted by decreasing p, and u in (0, 1] one uniform per row:

- LAC (Sadinle et al. 2019): 1 - p_y (summed from the other classes' p, so that it does not round to 0).
- APS (Romano, Sesia & Candès 2020): the mass of the classes ranked above y, plus u * p_y.
- RAPS (Angelopoulos et al. 2021): APS + lambda * max(0, o(y) - k_reg): deep ranks pay a penalty,
  so sets stay small when the tail of p is long and flat.

With u = 1, APS and RAPS are the non-randomised scores (every class's own mass counted in full),
which cover more than asked; randomised, their coverage sits in the band above.

The row's uniform: u is a hash of the row's input features (as float32 bytes) keyed by the seed,
not a draw from a random stream. A stream would give a row a different u in another batch or at
another position; the hash gives the same u to the same row in evaluation and in serving, alone or
in any batch. It is sound: the score is then a fixed function of (x, y), so exchangeable
(x, y) give exchangeable scores and the 1 - alpha guarantee holds as for LAC; the hash's values
are spread like uniforms, so ties (and over-coverage) are as rare as with random draws, except
for duplicated inputs, which share a u and can only raise coverage.

``nonempty``: always put the most likely class in the set. An empty set says that no class is
plausible at this alpha, i.e. it is the abstain rule in disguise; forcing the top class in can only
add coverage (the lower bound still holds; the upper one no longer does). On an accurate model the
randomised scores empty the set of a confident row whose u is large: such empty sets (and the
abstentions they cause) fall on random rows, not uncertain ones, which ``nonempty`` avoids.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from dl_uncertainty.errors import UserError

METHODS = ("lac", "aps", "raps")


def row_uniforms(rows: np.ndarray, seed: int) -> np.ndarray:
    """``[N]`` numbers in (0, 1), one per row: blake2b of the row's float32 bytes, keyed by ``seed``."""
    rows = np.ascontiguousarray(np.asarray(rows, dtype=np.float32).reshape(len(rows), -1))
    key = str(int(seed)).encode()
    ints = [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, key=key).digest(), "little")
            for row in rows]
    return (np.array(ints, dtype=np.float64) + 0.5) / 2.0**64


def class_scores(probs: np.ndarray, method: str, u: np.ndarray | None = None, k_reg: int = 0,
                 lam: float = 0.0) -> np.ndarray:
    """``[N, K]`` non-conformity of every class, as if it were the label; ``u``: ``[N]`` (None = 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    if method == "lac":
        return _rest_mass(probs)
    if method not in METHODS:
        raise UserError(f"evaluate.conformal_method={method!r} is not one of {', '.join(METHODS)}")
    u = np.ones(len(probs)) if u is None else np.asarray(u, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=1)
    above = np.cumsum(sorted_p, axis=1) - sorted_p  # mass of the classes ranked strictly above
    sorted_scores = above + u[:, None] * sorted_p
    if method == "raps":
        rank = np.arange(1, probs.shape[1] + 1)
        sorted_scores = sorted_scores + lam * np.maximum(0, rank - k_reg)
    scores = np.empty_like(probs)
    np.put_along_axis(scores, order, sorted_scores, axis=1)
    return scores


def _rest_mass(probs: np.ndarray) -> np.ndarray:
    """``[N, K]``: 1 - p_k as the sum of the other classes' probabilities. Computed as 1 - p_k, a
    confident row's top class scores exactly 0 once p_k rounds to 1 (a sharp temperature does that
    to most rows of an accurate model): the calibration scores tie at 0 and the sets over-cover.
    Summing the small probabilities keeps them apart; only the top class can have p > 1/2, so the
    other classes' 1 - p_k lose nothing to rounding."""
    scores = probs.sum(1, keepdims=True) - probs
    top = probs.argmax(1)
    others = np.sort(probs, axis=1)[:, :-1].sum(1)  # every class but the largest
    scores[np.arange(len(probs)), top] = others
    return scores


def quantile_rank(n: int, alpha: float) -> int:
    """The rank ceil((n+1)(1-alpha)) of the calibration score that is the threshold."""
    return math.ceil((n + 1) * (1 - alpha) - 1e-9)  # 1e-9: (n+1)(1-alpha) a whole number in exact arithmetic


def check_alpha(n: int, alpha: float) -> None:
    """Refuse n < 1/alpha - 1 calibration rows: the conformal quantile would be infinite (every set
    the full label set)."""
    if quantile_rank(n, alpha) > n:
        need = next(m for m in range(max(n + 1, int(1 / alpha) - 2), 10**9) if quantile_rank(m, alpha) <= m)
        raise UserError(f"the calibration split has {n} rows, too few for evaluate.alpha={alpha:g} (the conformal "
                        f"quantile needs n >= 1/alpha - 1, i.e. {need} rows): raise data.calib_fraction or evaluate.alpha")


def threshold(scores: np.ndarray, alpha: float) -> float:
    """The ceil((n+1)(1-alpha))-th smallest of the true classes' calibration ``scores``."""
    check_alpha(len(scores), alpha)
    return float(np.sort(scores)[quantile_rank(len(scores), alpha) - 1])


def true_class_scores(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return scores[np.arange(len(labels)), labels]


def sets_from_scores(scores: np.ndarray, tau: float, probs: np.ndarray, nonempty: bool = False) -> np.ndarray:
    """Boolean ``[N, K]``: class k is in row n's set (a relative 1e-12: float noise in the cumulative
    sums; relative, so that LAC's tiny scores of confident rows are not all taken as ties)."""
    sets = scores <= tau + 1e-12 * abs(tau)
    if nonempty:
        sets[np.arange(len(sets)), np.asarray(probs).argmax(1)] = True
    return sets


def coverage_band(alpha: float, n: int) -> tuple[float, float]:
    """[1 - alpha, 1 - alpha + 1/(n+1)]: the average coverage split conformal guarantees with n
    calibration examples (the upper end for scores without ties and sets that are not forced)."""
    return 1 - alpha, min(1.0, 1 - alpha + 1 / (n + 1))


def set_metrics(sets: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    size = sets.sum(1)
    return {"coverage": float(sets[np.arange(len(labels)), labels].mean()), "set_size": float(size.mean()),
            "empty": float((size == 0).mean()), "singleton": float((size == 1).mean())}


def per_class(sets: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None) -> list[dict]:
    """Class-conditional coverage: for each true class, how often its set holds it, and the set size."""
    rows = []
    for k in range(sets.shape[1]):
        mine = labels == k
        if mine.any():
            rows.append({"class": class_names[k] if class_names else str(k), "examples": int(mine.sum()),
                         "coverage": float(sets[mine, k].mean()), "set_size": float(sets[mine].sum(1).mean())})
    return rows


def by_set_size(sets: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Coverage of the rows whose set has each size (size-stratified coverage, Angelopoulos et al. 2021)."""
    size, hit = sets.sum(1), sets[np.arange(len(labels)), labels]
    return [{"set_size": int(s), "examples": int((size == s).sum()), "share": float((size == s).mean()),
             "coverage": float(hit[size == s].mean())} for s in np.unique(size)]
