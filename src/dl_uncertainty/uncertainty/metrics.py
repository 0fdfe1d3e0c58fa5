"""Uncertainty-quality metrics for Monte-Carlo predictions.

Conventions
-----------
``log_probs``: float array ``[T, N, K]`` -- per-MC-sample log-softmax outputs (``T`` samples,
``N`` examples, ``K`` classes). A ``[N, K]`` array is read as ``T = 1``. Torch tensors are
accepted anywhere an array is. ``labels``: int array ``[N]``.

MC samples are averaged in *probability* space: ``p_bar = mean_t exp(log_probs[t])``, computed in
log space as ``logsumexp_t(log_probs) - log T``. Log-probabilities below ``MIN_LOG_PROB`` (the log
of the smallest normal float64, about -708.4) -- including ``-inf`` -- are clamped to it, so
probabilities that underflow to 0 give finite NLL and entropies.

Uncertainty scores are "higher = more uncertain". Metric names follow torch-uncertainty
(``acc``, ``nll``, ``brier``, ``ece``, ``aece``, ``mce``, ``aurc``, ``auroc``, ``aupr``, ``fpr95``)
plus the seed project's ``test_accuracy`` and ``avg_test_uncertainty``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dl_uncertainty.errors import UserError

MIN_LOG_PROB = float(np.log(np.finfo(np.float64).tiny))  # ~ -708.4
N_BINS = 15
SCORES = ("max_prob", "entropy", "mutual_info")
#: what the comparison tables show, in this order
TABLE_METRICS = ("acc", "nll", "brier", "ece", "aece", "aurc", "auroc_entropy", "auroc_mutual_info",
                 "far_auroc_entropy", "avg_test_uncertainty", "mutual_info", "coverage", "set_size")


# --------------------------------------------------------------------------- input handling


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """numpy view of an array-like or (detached, CPU) torch tensor."""
    if hasattr(x, "detach"):  # a tensor; torch itself is not imported here: the comparison never needs it
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def as_log_probs(log_probs: Any) -> np.ndarray:
    """Validate and return ``log_probs`` as float64 ``[T, N, K]``, clamped at ``MIN_LOG_PROB``."""
    lp = to_numpy(log_probs, np.float64)
    if lp.ndim == 2:
        lp = lp[None]
    if lp.ndim != 3:
        raise ValueError(f"log_probs must have shape [T, N, K] or [N, K], got {lp.shape}.")
    if np.isnan(lp).any() or np.isposinf(lp).any():
        raise ValueError("log_probs contains NaN or +inf.")
    return np.maximum(lp, MIN_LOG_PROB)


def _labels(labels: Any, n: int) -> np.ndarray:
    y = to_numpy(labels).astype(np.int64).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"labels has {y.shape[0]} entries but predictions have {n}.")
    return y


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


# --------------------------------------------------------------------------- predictive distribution


def mean_log_probs(log_probs: Any) -> np.ndarray:
    """Log of the MC-averaged probabilities, ``[N, K]``: ``logsumexp_t log p_t - log T``."""
    lp = as_log_probs(log_probs)
    return np.maximum(_logsumexp(lp, 0) - math.log(lp.shape[0]), MIN_LOG_PROB)


def mean_probs(log_probs: Any) -> np.ndarray:
    """MC-averaged predictive probabilities ``p_bar``, ``[N, K]``."""
    return np.exp(mean_log_probs(log_probs))


def nll(log_probs: Any, labels: Any) -> float:
    """Mean negative log-likelihood of the MC-averaged prediction (finite for underflowed probs)."""
    lpm = mean_log_probs(log_probs)
    y = _labels(labels, lpm.shape[0])
    return float(-np.mean(lpm[np.arange(len(y)), y]))


def accuracy(log_probs: Any, labels: Any) -> float:
    """Top-1 accuracy of ``argmax p_bar``."""
    p = mean_probs(log_probs)
    y = _labels(labels, p.shape[0])
    return float(np.mean(p.argmax(axis=1) == y))


def brier(log_probs: Any, labels: Any) -> float:
    """Brier score: squared error to the one-hot label, summed over classes, mean over examples."""
    p = mean_probs(log_probs)
    y = _labels(labels, p.shape[0])
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


# --------------------------------------------------------------------------- calibration


def _top_label(log_probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Confidence ``max p_bar`` and correctness (0/1 float) per example."""
    p = mean_probs(log_probs)
    y = _labels(labels, p.shape[0])
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def _bin_gaps(
    conf: np.ndarray, correct: np.ndarray, bins: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """|accuracy - confidence| and weight (fraction of examples) for each non-empty bin."""
    bins = [b for b in bins if len(b)]
    gaps = np.array([abs(correct[b].mean() - conf[b].mean()) for b in bins])
    weights = np.array([len(b) for b in bins], dtype=np.float64) / len(conf)
    return gaps, weights


def _equal_width_bins(conf: np.ndarray, n_bins: int) -> list[np.ndarray]:
    # bin i holds [i/n, (i+1)/n); confidence 1.0 goes to the last bin
    idx = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    return [np.flatnonzero(idx == i) for i in range(n_bins)]


def ece(log_probs: Any, labels: Any, n_bins: int = N_BINS) -> float:
    """Expected (top-label) calibration error, ``n_bins`` equal-width confidence bins, L1 norm."""
    conf, correct = _top_label(log_probs, labels)
    gaps, w = _bin_gaps(conf, correct, _equal_width_bins(conf, n_bins))
    return float(np.sum(gaps * w))


def mce(log_probs: Any, labels: Any, n_bins: int = N_BINS) -> float:
    """Maximum calibration error: largest |accuracy - confidence| over non-empty equal-width bins."""
    conf, correct = _top_label(log_probs, labels)
    gaps, _ = _bin_gaps(conf, correct, _equal_width_bins(conf, n_bins))
    return float(gaps.max())


def aece(log_probs: Any, labels: Any, n_bins: int = N_BINS) -> float:
    """Adaptive ECE: ``n_bins`` equal-mass bins (examples sorted by confidence, split evenly)."""
    conf, correct = _top_label(log_probs, labels)
    order = np.argsort(conf, kind="stable")
    bins = np.array_split(order, min(n_bins, len(conf)))
    gaps, w = _bin_gaps(conf, correct, bins)
    return float(np.sum(gaps * w))


def reliability_bins(probs: Any, labels: Any, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin: ``edges`` [n_bins+1], ``accuracy``, ``confidence`` (NaN if empty), ``count``.

    ``probs`` are predictive probabilities ``[N, K]`` (not log).
    """
    p = to_numpy(probs, np.float64)
    y = _labels(labels, p.shape[0])
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    bins = _equal_width_bins(conf, n_bins)
    count = np.array([len(b) for b in bins])
    acc = np.array([correct[b].mean() if len(b) else np.nan for b in bins])
    cmean = np.array([conf[b].mean() if len(b) else np.nan for b in bins])
    return {
        "edges": np.linspace(0, 1, n_bins + 1),
        "accuracy": acc,
        "confidence": cmean,
        "count": count,
    }


# --------------------------------------------------------------------------- uncertainty decomposition


def _entropy(log_p: np.ndarray) -> np.ndarray:
    """Entropy (nats) along the last axis of clamped log-probabilities."""
    return -np.sum(np.exp(log_p) * log_p, axis=-1)


def predictive_entropy(log_probs: Any) -> np.ndarray:
    """Total uncertainty ``H[p_bar]`` per example, ``[N]``."""
    return _entropy(mean_log_probs(log_probs))


def expected_entropy(log_probs: Any) -> np.ndarray:
    """Aleatoric uncertainty ``E_t[H[p_t]]`` per example, ``[N]``."""
    return _entropy(as_log_probs(log_probs)).mean(axis=0)


def mutual_information(log_probs: Any) -> np.ndarray:
    """Epistemic uncertainty ``H[p_bar] - E_t[H[p_t]]`` (BALD) per example, clamped at 0, ``[N]``."""
    return np.maximum(predictive_entropy(log_probs) - expected_entropy(log_probs), 0.0)


def uncertainty_scores(log_probs: Any) -> dict[str, np.ndarray]:
    """Per-example scores (higher = more uncertain), each ``[N]``.

    ``max_prob`` = 1 - max p_bar, ``entropy`` = H[p_bar] (total), ``expected_entropy`` =
    E_t[H[p_t]] (aleatoric), ``mutual_info`` = their difference (epistemic).
    """
    lp = as_log_probs(log_probs)
    lpm = mean_log_probs(lp)
    total = _entropy(lpm)
    aleatoric = _entropy(lp).mean(axis=0)
    return {
        "max_prob": 1.0 - np.exp(lpm).max(axis=1),
        "entropy": total,
        "expected_entropy": aleatoric,
        "mutual_info": np.maximum(total - aleatoric, 0.0),
    }


# --------------------------------------------------------------------------- selective prediction


def risk_coverage_curve(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk vs coverage: keep the ``k`` most confident examples, ``k = 1..N``.

    Returns ``coverage = k/N`` and ``risk`` = error rate among the kept examples (ties in
    confidence are broken by input order).
    """
    conf = to_numpy(confidence, np.float64).reshape(-1)
    ok = to_numpy(correct, np.float64).reshape(-1)
    order = np.argsort(-conf, kind="stable")
    k = np.arange(1, len(conf) + 1)
    return k / len(conf), np.cumsum(1.0 - ok[order]) / k


def aurc(confidence: Any, correct: Any) -> float:
    """Area under the risk-coverage curve: mean selective risk over coverages ``k/N``."""
    return float(np.mean(risk_coverage_curve(confidence, correct)[1]))


def accuracy_at_coverage(confidence: Any, correct: Any, coverage: float) -> float:
    """Accuracy on the ``ceil(coverage * N)`` most confident examples."""
    cov, risk = risk_coverage_curve(confidence, correct)
    k = max(1, math.ceil(coverage * len(cov) - 1e-9))
    return float(1.0 - risk[k - 1])


# --------------------------------------------------------------------------- OOD detection


def ood_metrics(id_scores: Any, ood_scores: Any) -> dict[str, float]:
    """AUROC, AUPR (OOD = positive) and FPR at 95% TPR; scores are higher for more uncertain."""
    # imported here: its 0.6 s would slow every task that loads this module but never ranks OOD inputs
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    s_in = to_numpy(id_scores, np.float64).reshape(-1)
    s_out = to_numpy(ood_scores, np.float64).reshape(-1)
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr": float(average_precision_score(y, s)),
        "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
    }


# --------------------------------------------------------------------------- summary


def summarize(
    log_probs: Any,
    labels: Any,
    ood_log_probs: Any = None,
    far_ood_log_probs: Any = None,
) -> dict[str, float]:
    """All scalar metrics as a flat dict of Python floats (torch-uncertainty names + seed names)."""
    lp = as_log_probs(log_probs)
    y = _labels(labels, lp.shape[1])
    conf, correct = _top_label(lp, y)
    scores = uncertainty_scores(lp)
    out = {
        "acc": accuracy(lp, y),
        "nll": nll(lp, y),
        "brier": brier(lp, y),
        "ece": ece(lp, y),
        "aece": aece(lp, y),
        "mce": mce(lp, y),
        "aurc": aurc(conf, correct),
        "acc_cov90": accuracy_at_coverage(conf, correct, 0.90),
        "acc_cov95": accuracy_at_coverage(conf, correct, 0.95),
        "entropy": float(scores["entropy"].mean()),
        "mutual_info": float(scores["mutual_info"].mean()),
    }
    for prefix, other in (("", ood_log_probs), ("far_", far_ood_log_probs)):
        if other is None:
            continue
        other_scores = uncertainty_scores(other)
        for name in SCORES:
            for metric, value in ood_metrics(scores[name], other_scores[name]).items():
                out[f"{prefix}{metric}_{name}"] = value
    out["test_accuracy"] = out["acc"]
    out["avg_test_uncertainty"] = out["entropy"]
    return out


# --------------------------------------------------------------------------- temperature scaling


def apply_temperature(log_probs: Any, temperature: float) -> np.ndarray:
    """Divide every per-sample log-prob by ``temperature`` and re-normalize (log-softmax)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    scaled = to_numpy(log_probs, np.float64) / temperature
    return scaled - np.expand_dims(_logsumexp(scaled, axis=-1), -1)


def fit_temperature(
    log_probs: Any, labels: Any, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Temperature minimizing the validation NLL of the MC-averaged, temperature-scaled prediction.

    Bounded 1-D search (scipy) over log-temperature. Accepts logits or log-probs ``[T, N, K]``
    (they differ by a per-row constant, which the re-normalization removes).
    """
    # imported here: the compare step reads this module and fits nothing
    from scipy.optimize import minimize_scalar

    lp = as_log_probs(log_probs)
    y = _labels(labels, lp.shape[1])
    res = minimize_scalar(
        lambda log_t: nll(apply_temperature(lp, math.exp(log_t)), y),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(math.exp(res.x))


# --------------------------------------------------------------------------- distribution shift

#: severity -> (Gaussian noise std as a fraction of the data's value range, rotation in degrees).
#: Noise levels follow ImageNet-C's ``gaussian_noise`` (std 0.08..0.38 on [0, 1] images).
SEVERITY = {
    1: (0.08, 15.0),
    2: (0.12, 30.0),
    3: (0.18, 45.0),
    4: (0.26, 60.0),
    5: (0.38, 90.0),
}
CORRUPTIONS = ("gaussian_noise", "rotation")


def corrupt(x: Any, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupted copy of images ``[N, C, H, W]`` or ``[N, H, W]`` (same shape and dtype).

    ============  ==================================  ==========================
    severity      ``gaussian_noise`` std / range       ``rotation`` angle (deg)
    ============  ==================================  ==========================
    1             0.08                                 15
    2             0.12                                 30
    3             0.18                                 45
    4             0.26                                 60
    5             0.38                                 90
    ============  ==================================  ==========================

    "range" is ``x.max() - x.min()``; noisy values are clipped back to ``[x.min(), x.max()]``.
    Rotations turn each image by the angle in a random direction (from ``seed``), bilinear, with
    the background filled by ``x.min()``.
    """
    if kind not in CORRUPTIONS:
        raise UserError(f"Unknown corruption {kind!r}; expected one of {CORRUPTIONS}.")
    if severity not in SEVERITY:
        raise UserError(f"Corruption severity must be an integer 1..5, got {severity!r}.")
    arr = to_numpy(x)
    if arr.ndim not in (3, 4):
        raise ValueError(f"images must have shape [N, C, H, W] or [N, H, W], got {arr.shape}.")
    xf = arr.astype(np.float64)
    lo, hi = float(xf.min()), float(xf.max())
    rng = np.random.default_rng(seed)
    noise_frac, angle = SEVERITY[severity]
    if kind == "gaussian_noise":
        out = np.clip(xf + rng.normal(0.0, noise_frac * (hi - lo), size=xf.shape), lo, hi)
    else:
        import torch
        import torch.nn.functional as F

        imgs = torch.from_numpy(xf if xf.ndim == 4 else xf[:, None]) - lo
        theta = np.deg2rad(angle) * rng.choice([-1.0, 1.0], size=len(imgs))
        cos, sin = torch.from_numpy(np.cos(theta)), torch.from_numpy(np.sin(theta))
        zero = torch.zeros_like(cos)
        mat = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(mat, list(imgs.shape), align_corners=False)
        rot = F.grid_sample(imgs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = (rot + lo).numpy().reshape(xf.shape)
    return out.astype(arr.dtype) if np.issubdtype(arr.dtype, np.floating) else out


def uniform_noise_like(x: Any, n: int, seed: int = 0) -> np.ndarray:
    """``n`` synthetic far-OOD inputs, i.i.d. uniform over ``[x.min(), x.max()]``, shape ``[n, *x.shape[1:]]``."""
    arr = to_numpy(x)
    rng = np.random.default_rng(seed)
    out = rng.uniform(float(arr.min()), float(arr.max()), size=(n, *arr.shape[1:]))
    return out.astype(arr.dtype) if np.issubdtype(arr.dtype, np.floating) else out
