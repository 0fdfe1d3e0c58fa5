"""Reliability and risk-coverage figures that stay readable for small test sets and accurate models.

- Reliability with equal-mass bins (every bin holds about the same number of examples, so none is
  one lonely example) and a 95 % Wilson interval per bin: a bin whose interval crosses the diagonal
  is not evidence of miscalibration. Beside it, the same bins as error rates on log axes, where a
  99 %-accurate model's bins are told apart.
- Risk-coverage against the fraction rejected on a symmetric-log axis (the first few rejections,
  where an accurate model's risk changes, get most of the width), and a panel zoomed on the
  high-coverage end on linear axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from dl_uncertainty.uncertainty import metrics as M

Z95 = 1.959964


def wilson(successes: np.ndarray, n: np.ndarray, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion, elementwise: (low, high)."""
    n = np.asarray(n, dtype=np.float64)
    p = np.asarray(successes, dtype=np.float64) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def equal_mass_bins(probs: Any, labels: Any, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Examples sorted by confidence, split into ``n_bins`` groups of (nearly) equal size: per bin the
    mean confidence, accuracy, count and the accuracy's Wilson interval."""
    p = M.to_numpy(probs, np.float64)
    y = M.to_numpy(labels).astype(int)
    conf, correct = p.max(1), (p.argmax(1) == y)
    order = np.argsort(conf, kind="stable")
    groups = [g for g in np.array_split(order, min(n_bins, len(order))) if len(g)]
    count = np.array([len(g) for g in groups])
    hits = np.array([correct[g].sum() for g in groups])
    low, high = wilson(hits, count)
    return {"confidence": np.array([conf[g].mean() for g in groups]), "accuracy": hits / count,
            "count": count, "low": low, "high": high}


def _colors(n: int) -> list:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def reliability_equal_mass(models: Mapping[str, tuple[Any, Any]], n_bins: int = 10,
                           title: str = "Reliability (equal-mass bins, 95 % Wilson intervals)") -> Figure:
    """Left: accuracy vs confidence, zoomed on where the bins lie. Right: error rate vs 1 - confidence
    on log axes (a bin with no error is drawn at the floor, its interval still shown)."""
    fig = Figure(figsize=(10.4, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    lo, floor, xfloor = 1.0, 1.0, 1.0
    for (name, (probs, labels)), color in zip(models.items(), _colors(len(models)), strict=True):
        b = equal_mass_bins(probs, labels, n_bins)
        gap = float(np.sum(np.abs(b["accuracy"] - b["confidence"]) * b["count"]) / b["count"].sum())
        label = f"{name} ({len(b['count'])} bins of ~{int(np.median(b['count']))}; ECE {gap:.3f})"
        err = np.maximum(0, [b["accuracy"] - b["low"], b["high"] - b["accuracy"]])  # >= 0 despite rounding
        left.errorbar(b["confidence"], b["accuracy"], yerr=err, fmt="o-", color=color, capsize=3, label=label)
        lo = min(lo, float(b["confidence"].min()), float(b["low"].min()))
        floor = min(floor, 0.5 / b["count"].max())  # below one error in the largest bin
        xfloor = min(xfloor, max(float(np.min(1 - b["confidence"])), 1e-12))
        miss, miss_low, miss_high = 1 - b["accuracy"], 1 - b["high"], 1 - b["low"]
        shown = np.maximum(miss, floor)
        right.errorbar(np.maximum(1 - b["confidence"], 1e-12), shown,
                       yerr=np.maximum(0, [shown - np.maximum(miss_low, floor), np.maximum(miss_high, floor) - shown]),
                       fmt="o", color=color, capsize=3, label=name)
    lo = max(0.0, np.floor(lo * 20) / 20 - 0.02)
    left.plot([lo, 1], [lo, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    left.set(xlim=(lo, 1.005), ylim=(lo, 1.01), xlabel="mean confidence in the bin (max p̄)",
             ylabel="accuracy in the bin", title="accuracy vs confidence")
    right.plot([xfloor / 2, 1], [xfloor / 2, 1], ls="--", color="grey", lw=1)
    right.axhline(floor, color="grey", lw=0.8, ls=":")
    right.set(xscale="log", yscale="log", xlim=(xfloor / 2, 1.2), ylim=(floor / 1.5, 1.2),
              xlabel="expected error 1 − confidence", ylabel="observed error rate (0 drawn at the floor)",
              title="the same bins as error rates")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(loc="upper left", fontsize="small")
    fig.suptitle(title)
    return fig


def risk_coverage_zoomed(models: Mapping[str, tuple[Any, Any]], zoom: float | None = None,
                         title: str = "Selective prediction: risk vs coverage") -> Figure:
    """Left: the whole curve against the fraction rejected, symlog. Right: coverage from ``zoom`` (default: a little
    below where the first error is kept) to 1, linear, where an accurate model's risk rises."""
    fig = Figure(figsize=(10.4, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    first_error, smallest = 1.0, 1.0
    for (name, (probs, labels)), color in zip(models.items(), _colors(len(models)), strict=True):
        p, y = M.to_numpy(probs, np.float64), M.to_numpy(labels).astype(int)
        cov, risk = M.risk_coverage_curve(p.max(1), p.argmax(1) == y)
        label = f"{name} (AURC {np.mean(risk):.4f}, risk at full coverage {risk[-1]:.4f})"
        left.plot(1 - cov, risk, color=color, lw=2, label=label)
        right.plot(cov, risk, color=color, lw=2, label=label)
        wrong = np.flatnonzero(risk > 0)
        first_error = min(first_error, float(cov[wrong[0]]) if len(wrong) else 1.0)
        smallest = min(smallest, 1.0 / len(y))
    zoom = zoom if zoom is not None else max(0.0, min(0.9, first_error - 0.05))
    left.set_xscale("symlog", linthresh=smallest)
    left.set(xlim=(0, 1), ylim=(0, None), xlabel="fraction rejected = 1 − coverage (symlog: linear below 1/N)",
             ylabel="risk (error rate on kept examples)", title="whole range, least confident rejected first")
    right.set(xlim=(zoom, 1.0), ylim=(0, None), xlabel="coverage", ylabel="risk",
              title=f"coverage {zoom:.2f} to 1")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(loc="upper left", fontsize="small")
    fig.suptitle(title)
    return fig
