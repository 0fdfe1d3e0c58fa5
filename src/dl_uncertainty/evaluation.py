"""Evaluate a trained model's uncertainty: metrics, calibration, OOD, shift, figures, report.

Everything reported is recomputable from the saved predictions (``save_predictions``): the
per-sample log-probabilities for test, validation, OOD and far-OOD inputs, and the shifted sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import nn

from . import metrics as M
from . import plots
from .data import Split, to_images, to_rows
from .predict import predict_log_probs
from .report import Section, html_report
from .saliency import grad_cam
from .training import set_threads

TABLE_METRICS = ("acc", "nll", "brier", "ece", "aece", "aurc", "auroc_entropy", "auroc_mutual_info",
                 "far_auroc_entropy", "avg_test_uncertainty", "mutual_info")


@dataclass
class Evaluation:
    model_name: str
    metrics: dict[str, float]
    predictions: dict[str, np.ndarray]
    shift: list[dict] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)


def evaluate_model(
    model: nn.Module, cfg: DictConfig, test: Split, ood: Split | None = None, val: Split | None = None,
    *, with_figures: bool = True,
) -> Evaluation:
    """MC-predict every split, compute all metrics, and (optionally) draw the figures."""
    e = cfg.evaluate
    set_threads(cfg.num_threads)

    def predict(x: np.ndarray) -> np.ndarray:
        return predict_log_probs(model, x, e.mc_samples, strategy=e.strategy, batch_size=e.batch_size).numpy()

    lp = {"test": predict(test.x)}
    images = to_images(test.x, test.schema)
    if ood is not None and ood.far_x is not None:  # another dataset, prepared like the test inputs
        far = ood.far_x
    elif images is not None:  # noise images in pixel space, then the same scaling as real inputs
        far = to_rows(M.uniform_noise_like(images, len(images), seed=cfg.seed), test.schema)
    else:
        far = M.uniform_noise_like(test.x, len(test.x), seed=cfg.seed)
    lp["far_ood"] = predict(far)
    has_ood = ood is not None and len(ood.y) > 0
    if has_ood:
        lp["ood"] = predict(ood.x)
    result = M.summarize(lp["test"], test.y, lp.get("ood"), lp["far_ood"])

    if val is not None and len(val.y):
        lp["val"] = predict(val.x)
        temperature = M.fit_temperature(lp["val"], val.y)
        scaled = M.summarize(M.apply_temperature(lp["test"], temperature), test.y)
        result["temperature"] = temperature
        result.update({f"{key}_ts": scaled[key] for key in ("acc", "nll", "brier", "ece", "aece")})

    shift, shifted = [], {}
    if images is not None:
        for kind in M.CORRUPTIONS:
            for severity in range(1, 6):
                key = f"shift_{kind}_{severity}"
                shifted[key] = predict(to_rows(M.corrupt(images, kind, severity, seed=cfg.seed), test.schema))
                s = M.summarize(shifted[key], test.y)
                shift.append({"model": cfg.model.name, "kind": kind, "severity": severity,
                              **{k: s[k] for k in ("acc", "nll", "ece", "entropy")}})
        for row in shift:
            result[f"{row['kind']}_s{row['severity']}_acc"] = row["acc"]
            result[f"{row['kind']}_s{row['severity']}_ece"] = row["ece"]

    predictions = _predictions(lp, shifted, test, ood if has_ood else None, val if "val" in lp else None, far)
    evaluation = Evaluation(cfg.model.name, result, predictions, shift)
    if with_figures:
        evaluation.figures = _figures(evaluation, test, images, model)
    return evaluation


def _predictions(lp: dict, shifted: dict, test: Split, ood: Split | None, val: Split | None,
                 far: np.ndarray) -> dict:
    out: dict[str, np.ndarray] = {"labels": test.y, "far_ood_x": far}
    for name, log_probs in {**lp, **shifted}.items():
        prefix = "" if name == "test" else f"{name}_"
        scores = M.uncertainty_scores(log_probs)
        out[f"{prefix}log_probs"] = log_probs.astype(np.float32)
        out[f"{prefix}probs"] = M.mean_probs(log_probs).astype(np.float32)
        out[f"{prefix}entropy"] = scores["entropy"]
        out[f"{prefix}mutual_info"] = scores["mutual_info"]
    if ood is not None:
        out["ood_labels"] = ood.y
    if val is not None:
        out["val_labels"] = val.y
    return out


def _figures(ev: Evaluation, test: Split, images: np.ndarray | None, model: nn.Module) -> dict[str, Figure]:
    p, y = ev.predictions, ev.predictions["labels"]
    name = ev.model_name
    scores = {k: p.get(f"{k}entropy") for k in ("", "ood_", "far_ood_")}
    sets = [{"entropy": p[f"{k}entropy"], "mutual_info": p[f"{k}mutual_info"]} if scores[k] is not None else None
            for k in ("", "ood_", "far_ood_")]
    figures = {
        "reliability": plots.reliability_diagram({name: (p["probs"], y)}),
        "risk_coverage": plots.risk_coverage_plot({name: (p["probs"], y)}),
        "uncertainty_histograms": plots.uncertainty_histograms(*sets),
        "confusion_matrix": plots.confusion_matrix_plot(y, p["probs"].argmax(1), test.schema.class_names),
    }
    if images is not None:
        gray = images.mean(1)  # colour images shown as their channel mean
        figures["most_uncertain"] = plots.most_uncertain_inputs(
            gray, p["probs"], y, p["entropy"], class_names=test.schema.class_names)
        uncertain = np.argsort(-p["entropy"], kind="stable")[:8]
        predicted = p["probs"][uncertain].argmax(1)
        cams = grad_cam(model, test.x[uncertain], predicted, test.schema.feature_shape)
        if cams is not None:
            names = test.schema.class_names
            titles = [f"true {names[y[i]]}, pred {names[k]}" for i, k in zip(uncertain, predicted, strict=True)]
            figures["saliency"] = plots.saliency_plot(gray[uncertain], cams, titles)
        if ev.shift:
            clean = {"model": name, "kind": "clean", "severity": 0, "acc": ev.metrics["acc"], "ece": ev.metrics["ece"]}
            figures["shift"] = plots.shift_plot([clean, *ev.shift])
    return figures


def save_predictions(ev: Evaluation, path: str | Path) -> None:
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **ev.predictions)


def metrics_table(evaluations: list[Evaluation]) -> list[dict]:
    """One row per model with the headline metrics, in a fixed column order."""
    rows = []
    for ev in evaluations:
        row = {"model": ev.model_name}
        row.update({k: ev.metrics[k] for k in TABLE_METRICS if k in ev.metrics})
        if "nll_ts" in ev.metrics:
            row.update({"nll_ts": ev.metrics["nll_ts"], "ece_ts": ev.metrics["ece_ts"]})
        rows.append(row)
    return rows


def html(ev: Evaluation, title: str | None = None) -> str:
    """The self-contained evaluation report (figures embedded as PNG)."""
    m = ev.metrics
    sections = [
        Section("Summary", text=[
            f"Test accuracy {m['acc']:.4f}, NLL {m['nll']:.4f}, ECE {m['ece']:.4f} (15 bins), "
            f"mean predictive entropy {m['avg_test_uncertainty']:.4f}.",
            *([f"OOD detection AUROC by entropy {m['auroc_entropy']:.4f}, by mutual information "
               f"{m['auroc_mutual_info']:.4f}."] if "auroc_entropy" in m else []),
        ], table=metrics_table([ev])),
        Section("Calibration", figures={"Reliability diagram": ev.figures.get("reliability")}),
        Section("Selective prediction", figures={"Risk-coverage": ev.figures.get("risk_coverage")}),
        Section("Out-of-distribution detection", figures={"Uncertainty histograms":
                                                          ev.figures.get("uncertainty_histograms")}),
        Section("Distribution shift", table=ev.shift or None, figures={"Shift": ev.figures.get("shift")}),
        Section("Most uncertain test inputs", figures={"Inputs": ev.figures.get("most_uncertain"),
                                                       "Grad-CAM": ev.figures.get("saliency")}),
        Section("Confusion matrix", figures={"Confusion": ev.figures.get("confusion_matrix")}),
        Section("All metrics", table=[{"metric": k, "value": v} for k, v in sorted(m.items())]),
    ]
    for section in sections:
        if isinstance(section.figures, dict):
            section.figures = {k: v for k, v in section.figures.items() if v is not None}
    sections = [s for s in sections if s.figures or s.table or s.text]
    return html_report(title or f"Uncertainty report: {ev.model_name}", sections)
