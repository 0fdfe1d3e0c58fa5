"""Figures for uncertainty evaluation. Every function returns a ``matplotlib.figure.Figure``.

Figures are built as bare ``Figure`` objects (rendered by Agg; no display and no pyplot state), so
nothing needs closing; ``report.figure_to_data_uri`` embeds one in HTML.
Probabilities are predictive (MC-averaged) probabilities ``[N, K]`` -- see ``metrics.mean_probs``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from dl_uncertainty.uncertainty import metrics as M

SIZE = (6.4, 4.4)
SCORE_LABELS = {
    "entropy": "predictive entropy H[p̄] (nats)",
    "mutual_info": "mutual information (nats)",
    "expected_entropy": "expected entropy E[H[p_t]] (nats)",
    "max_prob": "1 − max p̄",
}
SCORE_TITLES = {
    "entropy": "total uncertainty",
    "mutual_info": "epistemic uncertainty",
    "expected_entropy": "aleatoric uncertainty",
    "max_prob": "1 − confidence",
}


def _colors(n: int) -> list:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _top_label(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = M.to_numpy(probs, np.float64)
    y = M.to_numpy(labels).astype(int)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(float)


def reliability_diagram(
    models: Mapping[str, tuple[Any, Any]],
    n_bins: int = M.N_BINS,
    title: str = "Reliability diagram",
    min_count: int = 10,
) -> Figure:
    """Accuracy vs confidence per equal-width bin (the ECE's bins), models overlaid; below, how many
    examples each bin holds (log scale, numbers on the bars).

    ``models``: name -> (probs [N, K], labels [N]). The legend shows each model's ECE. A bin with
    fewer than ``min_count`` examples is a hollow marker off the line: its accuracy is mostly noise.
    """
    fig = Figure(figsize=(6.4, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    width = 1.0 / n_bins
    bar = width / (len(models) + 1)
    for m, ((name, (probs, labels)), color) in enumerate(zip(models.items(), _colors(len(models)), strict=True)):
        b = M.reliability_bins(probs, labels, n_bins)
        centers = b["edges"][:-1] + width / 2
        full, sparse = b["count"] >= min_count, (b["count"] > 0) & (b["count"] < min_count)
        err = float(
            np.nansum(np.abs(b["accuracy"] - b["confidence"]) * b["count"]) / b["count"].sum()
        )
        top.plot(centers[full], b["accuracy"][full], marker="o", color=color, label=f"{name} (ECE {err:.3f})")
        top.plot(centers[sparse], b["accuracy"][sparse], ls="", marker="o", mfc="none", color=color)
        x = b["edges"][:-1] + bar * (m + 1)
        shown = b["count"] > 0
        bars = bottom.bar(x[shown], b["count"][shown], width=bar, color=color, alpha=0.7, label=name)
        bottom.bar_label(bars, fontsize=6, padding=1, rotation=90 if len(models) > 1 else 0)
    top.plot([], [], ls="", marker="o", mfc="none", color="grey", label=f"bin with < {min_count} examples")
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy", title=title)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize="small")
    bottom.set_yscale("log")
    bottom.set_ylim(0.8, None)
    bottom.margins(y=0.5)
    bottom.set(xlabel="confidence (max p̄)", ylabel="examples per bin")
    bottom.grid(alpha=0.3, axis="y")
    return fig


def risk_coverage_plot(
    models: Mapping[str, tuple[Any, Any]], title: str = "Selective prediction: risk vs coverage"
) -> Figure:
    """Selective risk vs coverage (reject the least confident first), models overlaid, AURC in legend."""
    fig = Figure(figsize=SIZE, layout="constrained")
    ax = fig.subplots()
    for (name, (probs, labels)), color in zip(models.items(), _colors(len(models)), strict=True):
        conf, correct = _top_label(probs, labels)
        cov, risk = M.risk_coverage_curve(conf, correct)
        ax.plot(cov, risk, color=color, lw=2, label=f"{name} (AURC {np.mean(risk):.4f})")
    ax.set(
        xlim=(0, 1),
        ylim=(0, None),
        xlabel="coverage (fraction of examples kept)",
        ylabel="risk (error rate on kept examples)",
        title=title,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return fig


def uncertainty_histograms(
    in_dist: Mapping[str, Any],
    ood: Mapping[str, Any] | None = None,
    far_ood: Mapping[str, Any] | None = None,
    scores: Sequence[str] = ("entropy", "mutual_info"),
    title: str = "Uncertainty: in-distribution vs OOD",
) -> Figure:
    """Density histograms of each score for in-distribution vs OOD (vs far-OOD) inputs.

    Each mapping is ``metrics.uncertainty_scores(...)`` output (score name -> [N] array).
    """
    sets = [("in-distribution", in_dist), ("OOD", ood), ("far-OOD", far_ood)]
    sets = [(n, s) for n, s in sets if s is not None]
    fig = Figure(figsize=(4.2 * len(scores), 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(scores)))
    for ax, score in zip(axes, scores, strict=True):
        values = [np.asarray(s[score], dtype=float) for _, s in sets]
        hi = max(float(v.max()) for v in values)
        edges = np.linspace(0.0, hi if hi > 0 else 1.0, 31)
        for (name, _), v, color in zip(sets, values, _colors(len(sets)), strict=True):
            ax.hist(
                v,
                bins=edges,
                density=True,
                alpha=0.45,
                color=color,
                label=f"{name} (mean {v.mean():.3f})",
            )
        ax.set(
            xlabel=SCORE_LABELS.get(score, score),
            ylabel="density",
            title=SCORE_TITLES.get(score, score),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def shift_plot(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] = ("acc", "ece"),
    title: str = "Performance under distribution shift",
) -> Figure:
    """Metric vs shift severity: one column per corruption kind, one row per metric, models overlaid.

    ``rows``: dicts with ``model``, ``kind``, ``severity`` (0 = clean) and the metric keys. Rows with
    ``severity == 0`` and ``kind`` ``"clean"``/``None`` are drawn at severity 0 in every column.
    """
    kinds = sorted({r["kind"] for r in rows if r.get("kind") not in (None, "clean")})
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = dict(zip(models, _colors(len(models)), strict=True))
    fig = Figure(figsize=(max(4.2 * len(kinds), 6.4), 3.2 * len(metrics)), layout="constrained")
    axes = np.array(fig.subplots(len(metrics), len(kinds), squeeze=False, sharex=True))
    for j, kind in enumerate(kinds):
        for i, metric in enumerate(metrics):
            ax = axes[i, j]
            for model in models:
                pts = sorted(
                    (r["severity"], r[metric])
                    for r in rows
                    if r["model"] == model
                    and (
                        r.get("kind") == kind
                        or (r.get("kind") in (None, "clean") and r["severity"] == 0)
                    )
                )
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, marker="o", color=colors[model], label=model)
            ax.set(ylabel=metric, xlabel="severity (0 = clean)" if i == len(metrics) - 1 else "")
            if i == 0:
                ax.set_title(kind.replace("_", " "))
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    fig.suptitle(title)
    return fig


def most_uncertain_inputs(
    images: Any,
    probs: Any,
    labels: Any,
    scores: Any,
    k: int = 8,
    class_names: Sequence[str] | None = None,
    score_name: str = "H",
    title: str = "Most uncertain test inputs",
) -> Figure:
    """The ``k`` highest-scoring inputs (images [N, H, W]) with their predictive distribution below each."""
    imgs = M.to_numpy(images, np.float64)
    p = M.to_numpy(probs, np.float64)
    y = M.to_numpy(labels).astype(int)
    s = M.to_numpy(scores, np.float64)
    idx = np.argsort(-s, kind="stable")[:k]
    n_cls = p.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_cls)]
    cols = min(len(idx), 6)
    rows = -(-len(idx) // cols)
    fig = Figure(figsize=(1.7 * cols + 0.4, 3.3 * rows), layout="constrained")
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[1.3, 1] * rows)
    for n, i in enumerate(idx):
        r, c = divmod(n, cols)
        ax_img = fig.add_subplot(grid[2 * r, c])
        ax_img.imshow(imgs[i], cmap="gray_r")
        ax_img.set_title(
            f"true {names[y[i]]}, pred {names[p[i].argmax()]}\n{score_name}={s[i]:.2f}", fontsize=8
        )
        ax_img.axis("off")
        ax_bar = fig.add_subplot(grid[2 * r + 1, c])
        colors = ["tab:green" if j == y[i] else "tab:blue" for j in range(n_cls)]
        ax_bar.bar(range(n_cls), p[i], color=colors)
        ax_bar.set_ylim(0, 1)
        ax_bar.set_xticks(range(n_cls), names, fontsize=7)
        ax_bar.tick_params(axis="y", labelsize=7)
        ax_bar.set_xlabel("class", fontsize=7)
        ax_bar.set_ylabel("p̄" if c == 0 else "", fontsize=8)
    fig.suptitle(f"{title} (green bar = true class)")
    return fig


def saliency_plot(
    images: Any,
    cams: Any,
    titles: Sequence[str],
    title: str = "Grad-CAM: evidence for the predicted class",
) -> Figure:
    """Each image (gray) beside the same image with its Grad-CAM map overlaid (0 = none, 1 = peak)."""
    imgs, maps = M.to_numpy(images, np.float64), M.to_numpy(cams, np.float64)
    cols = min(len(imgs), 6)
    rows = -(-len(imgs) // cols)
    fig = Figure(figsize=(1.7 * cols + 0.8, 3.4 * rows), layout="constrained")
    axes = np.array(fig.subplots(2 * rows, cols, squeeze=False))
    for ax in axes.ravel():
        ax.axis("off")
    heat = None
    for n in range(len(imgs)):
        r, c = divmod(n, cols)
        axes[2 * r, c].imshow(imgs[n], cmap="gray_r")
        axes[2 * r, c].set_title(titles[n], fontsize=8)
        axes[2 * r + 1, c].imshow(imgs[n], cmap="gray_r")
        heat = axes[2 * r + 1, c].imshow(maps[n], cmap="jet", alpha=0.5, vmin=0, vmax=1)
    if heat is not None:
        fig.colorbar(heat, ax=axes.ravel().tolist(), shrink=0.6, label="Grad-CAM (relative)")
    fig.suptitle(title)
    return fig


def confusion_matrix_plot(
    labels: Any,
    preds: Any,
    class_names: Sequence[str] | None = None,
    normalize: bool = False,
    title: str = "Confusion matrix",
) -> Figure:
    """Heat-map of counts (or row-normalized rates) with the value written in each cell."""
    from sklearn.metrics import confusion_matrix  # 0.6 s that training and comparing never need

    y, yhat = M.to_numpy(labels).astype(int), M.to_numpy(preds).astype(int)
    n_cls = len(class_names) if class_names is not None else int(max(y.max(), yhat.max())) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_cls)]
    cm = confusion_matrix(y, yhat, labels=list(range(n_cls))).astype(float)
    if normalize:
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(
        figsize=(max(4.8, 0.55 * n_cls + 2.5), max(4.0, 0.5 * n_cls + 1.8)), layout="constrained"
    )
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues", vmin=0)
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label("fraction of true class" if normalize else "count")
    fmt = "{:.2f}" if normalize else "{:.0f}"
    threshold = cm.max() / 2 if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j,
            i,
            fmt.format(v),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if v > threshold else "black",
        )
    ax.set_xticks(range(n_cls), names)
    ax.set_yticks(range(n_cls), names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    return fig


def _metric_family(name: str) -> str:
    return re.sub(r"^(train|val|valid|validation|test)[_/]", "", name)


def training_curves(
    history: Mapping[str, Sequence[float]], title: str = "Training curves"
) -> Figure:
    """Per-epoch curves; ``train_x`` / ``val_x`` share one panel per metric family ``x``."""
    families = list(dict.fromkeys(_metric_family(n) for n in history))
    cols = min(len(families), 3)
    rows = -(-len(families) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    axes = np.array(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, fam in zip(axes, families, strict=False):
        for name, values in history.items():
            if _metric_family(name) == fam:
                ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, label=name)
        ax.set(xlabel="epoch", ylabel=fam, title=fam)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(families) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def optimization_history(
    trials: Sequence[Mapping[str, Any]],
    objectives: Mapping[str, str],
    title: str = "Optimisation history",
) -> Figure:
    """Each objective per trial, with the best so far; pruned trials at their last reported value.

    ``trials``: ``{"number", "state": complete|pruned|..., "values": {objective: value}}`` dicts;
    ``objectives``: name -> ``minimize`` | ``maximize``.
    """
    fig = Figure(figsize=(6.4, 3.4 * len(objectives)), layout="constrained")
    axes = np.array(fig.subplots(len(objectives), 1, squeeze=False)).ravel()
    for ax, (name, direction) in zip(axes, objectives.items(), strict=True):
        done = [(t["number"], t["values"][name]) for t in trials if t["state"] == "complete"]
        cut = [(t["number"], t["values"][name]) for t in trials
               if t["state"] == "pruned" and name in t["values"]]
        if done:
            x, y = np.array(done).T
            best = np.minimum.accumulate(y) if direction == "minimize" else np.maximum.accumulate(y)
            ax.plot(x, y, "o", color="tab:blue", label="complete trial")
            ax.step(x, best, where="post", color="tab:red", label="best so far")
        if cut:
            ax.plot(*np.array(cut).T, "x", color="grey", label="pruned (last epoch)")
        ax.set(xlabel="trial", ylabel=f"{name} ({direction})", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def param_importances(importances: Mapping[str, Mapping[str, float]], title: str = "Parameter importance") -> Figure:
    """Horizontal bars of each parameter's share of the objective's variance, one panel per objective."""
    fig = Figure(figsize=(6.4, 0.5 + 0.45 * max(len(v) for v in importances.values()) * len(importances)),
                 layout="constrained")
    axes = np.array(fig.subplots(len(importances), 1, squeeze=False)).ravel()
    for ax, (name, values) in zip(axes, importances.items(), strict=True):
        params = sorted(values, key=values.get)
        ax.barh(params, [values[p] for p in params], color="tab:blue")
        ax.set(xlabel="importance (fANOVA, sums to 1)", title=name, xlim=(0, 1))
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    return fig


def conformal_plot(rows: Sequence[Mapping[str, Any]], alpha: float | None = None,
                   title: str = "Conformal prediction sets") -> Figure:
    """Empirical coverage vs the target 1 − alpha (left) and mean set size (right), per method.

    ``rows``: dicts with ``method``, ``alpha``, ``coverage``, ``set_size`` (one model).
    ``alpha`` marks the configured level.
    """
    fig = Figure(figsize=(9.6, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    methods = sorted({r["method"] for r in rows})
    for method, color in zip(methods, _colors(len(methods)), strict=True):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["alpha"])
        alphas = np.array([r["alpha"] for r in mine])
        left.plot(1 - alphas, [r["coverage"] for r in mine], "o-", color=color, label=method.upper())
        right.plot(alphas, [r["set_size"] for r in mine], "o-", color=color, label=method.upper())
    lo = min(1 - r["alpha"] for r in rows)
    left.plot([lo, 1], [lo, 1], ls="--", color="grey", lw=1, label="coverage = 1 − alpha")
    left.set(xlabel="target coverage 1 − alpha", ylabel="test coverage", title="coverage")
    right.set(xlabel="alpha", ylabel="mean set size (classes)", title="set size", ylim=(0, None))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if alpha is not None:
        left.axvline(1 - alpha, color="black", lw=0.8, ls=":")
        right.axvline(alpha, color="black", lw=0.8, ls=":")
    fig.suptitle(title)
    return fig
