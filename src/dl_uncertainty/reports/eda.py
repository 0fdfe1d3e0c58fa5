"""Exploratory report on the prepared splits: class balance, feature distributions, cleaning."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from dl_uncertainty.data.rows import to_images
from dl_uncertainty.data.splits import ROLES, Split
from dl_uncertainty.reports.render import Section, html_report


def class_balance(splits: dict[str, Split]) -> Figure:
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    names = splits["train"].schema.class_names
    shown = [name for name in ("train", "val", "calib", "test") if name in splits]
    width = 0.8 / len(shown)
    for i, split in enumerate(shown):
        counts = np.bincount(splits[split].y, minlength=len(names))
        ax.bar(np.arange(len(names)) + (i - (len(shown) - 1) / 2) * width, counts, width, label=f"{split} ({counts.sum()})")
    ood = splits.get("ood")
    if ood is not None and len(ood.y):
        ax.bar(len(names) + np.arange(len(ood.schema.ood_class_names)), np.bincount(ood.y), 0.8,
               color="grey", label=f"OOD, held out ({len(ood.y)})")
        names = names + [f"{c} (OOD)" for c in ood.schema.ood_class_names]
    ax.set_xticks(np.arange(len(names)), names, rotation=30 if len(names) > 8 else 0)
    ax.set(xlabel="class", ylabel="examples", title="Class balance per split")
    ax.legend(fontsize="small")
    return fig


def feature_distributions(splits: dict[str, Split]) -> Figure:
    """Histogram of all feature values (after cleaning) and per-feature mean +- std on train."""
    train = splits["train"]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    for name, split in splits.items():
        if len(split.y):
            left.hist(split.x.ravel(), bins=50, density=True, histtype="step", label=name)
    left.set(xlabel="feature value (scaled)", ylabel="density", title="Feature value distribution")
    left.legend(fontsize="small")
    mean, std = train.x.mean(0), train.x.std(0)
    idx = np.arange(len(mean))
    right.plot(idx, mean, label="mean")
    right.fill_between(idx, mean - std, mean + std, alpha=0.3, label="± 1 std")
    right.set(xlabel="feature index", ylabel="value (scaled)", title="Per-feature statistics (train)")
    right.legend(fontsize="small")
    return fig


def mean_images(splits: dict[str, Split]) -> Figure | None:
    """Mean raw image per class: what the model sees, in the original pixel scale."""
    train = splits["train"]
    images = to_images(train.x, train.schema)
    if images is None:
        return None
    images = images.mean(1)  # colour images as their channel mean
    names = train.schema.class_names
    fig = Figure(figsize=(1.4 * len(names), 1.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for k, ax in enumerate(axes):
        ax.imshow(images[train.y == k].mean(0), cmap="gray_r")
        ax.set_title(f"class {names[k]}", fontsize="small")
        ax.axis("off")
    fig.suptitle("Mean training image per class")
    return fig


def eda_html(splits: dict[str, Split]) -> str:
    train = splits["train"]
    c = train.schema.cleaning
    dropped = c.get("rows_dropped", {})
    cleaning_rows = [
        {"step": "blank labels", "method": c["blank_labels"],
         "values changed": f"{dropped['blank_labels']} rows dropped"},
        {"step": "infinite values", "method": c["non_finite"],
         "values changed": f"{dropped['non_finite']} rows dropped"},
    ] if dropped else []  # tables only: images have no such step
    cleaning_rows += [
        {"step": "missing values", "method": c.get("missing", "-"),
         "values changed": f"{dropped.get('missing', 0)} rows dropped" if c.get("missing") == "drop"
         else sum(s.schema.cleaning.get("missing_filled", 0) for s in splits.values())},
        {"step": "outliers", "method": c.get("outliers", "-"),
         "values changed": sum(s.schema.cleaning.get("outliers_clipped", 0) for s in splits.values())},
        {"step": "scaling", "method": c.get("scaling", "-"), "values changed": "all (fitted on train)"},
    ]
    total = sum(len(s.y) for n, s in splits.items() if n != "ood")
    sizes = [{"split": n, "examples": len(s.y), "share": f"{len(s.y) / max(total, 1):.1%}" if n != "ood" else "-",
              "features": s.x.shape[1], "used for": ROLES.get(n, "OOD detection (held-out classes)")}
             for n, s in splits.items()]
    figures = {"Class balance": class_balance(splits), "Feature distributions": feature_distributions(splits)}
    images = mean_images(splits)
    if images is not None:
        figures["Mean images"] = images
    sections = [
        Section("Splits", text=[f"Source: {train.schema.source}; feature shape {train.schema.feature_shape}; "
                                f"classes {', '.join(train.schema.class_names)}; held out as OOD: "
                                f"{', '.join(train.schema.ood_class_names) or 'none'}; far-OOD inputs: "
                                f"{train.schema.far_ood}.",
                                "Splits are stratified by class and disjoint; the share is of the in-distribution "
                                "examples (data.val_fraction, data.calib_fraction, data.test_fraction)."], table=sizes),
        Section("Cleaning", table=cleaning_rows),
        Section("Distributions", figures=figures),
    ]
    return html_report("Data report", sections)
