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

from dl_uncertainty.data.rows import to_images, to_rows
from dl_uncertainty.data.splits import Split
from dl_uncertainty.families.predict import served_log_probs
from dl_uncertainty.reports import plots
from dl_uncertainty.reports.render import Section, html_report
from dl_uncertainty.reports.saliency import grad_cam
from dl_uncertainty.training.loop import set_threads
from dl_uncertainty.uncertainty import calibration as C
from dl_uncertainty.uncertainty import metrics as M
from dl_uncertainty.uncertainty.metrics import TABLE_METRICS

ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)  # the conformal figure's x-axis


@dataclass
class Evaluation:
    model_name: str
    metrics: dict[str, float]
    predictions: dict[str, np.ndarray]
    shift: list[dict] = field(default_factory=list)
    conformal: list[dict] = field(default_factory=list)  # coverage and set size per method and alpha
    figures: dict[str, Figure] = field(default_factory=dict)


def evaluate_model(
    model: nn.Module, cfg: DictConfig, test: Split, ood: Split | None = None, val: Split | None = None,
    *, calibration: C.Calibration | None = None, with_figures: bool = True,
) -> Evaluation:
    """MC-predict every split, compute all metrics, and (optionally) draw the figures.

    ``calibration``: the one bundled with the model (what it is served with); without it, one is
    fitted on ``val``. Every split's MC samples are seeded from ``cfg.seed``: evaluating the same
    model twice gives the same numbers.
    """
    e = cfg.evaluate
    set_threads(cfg.num_threads)

    def predict(x: np.ndarray) -> np.ndarray:
        return served_log_probs(model, x, cfg).numpy()

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
        calibration = calibration or C.fit(lp["val"], val.y, e)
    served = {name: C.decide(log_probs, calibration) for name, log_probs in lp.items()} if calibration else {}
    if served:
        result.update(_calibration_metrics(calibration, served["test"], test.y))
        result.update({f"{name}_abstain_rate": float(served[name]["abstain"].mean())
                       for name in ("ood", "far_ood") if name in served})

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
    for name, out in served.items():
        prefix = "" if name == "test" else f"{name}_"
        predictions[f"{prefix}calibrated_probs"] = out["probs"].astype(np.float32)
        predictions[f"{prefix}prediction_sets"] = out["sets"]
        predictions[f"{prefix}abstain"] = out["abstain"]
    evaluation = Evaluation(cfg.model.name, result, predictions, shift)
    if calibration is not None and "val" in lp:
        evaluation.conformal = _conformal_curve(served["val"]["probs"], val.y, served["test"]["probs"], test.y)
    if with_figures:
        evaluation.figures = _figures(evaluation, test, images, model)
    return evaluation


def _calibration_metrics(cal: C.Calibration, out: dict, y: np.ndarray) -> dict:
    """Test metrics of the served (calibrated) prediction ``out``, its conformal sets and abstentions."""
    scaled = M.summarize(np.log(np.maximum(out["probs"], 1e-300))[None], y)
    result = {f"{key}_ts": scaled[key] for key in ("acc", "nll", "brier", "ece", "aece")}
    result.update({"temperature": cal.temperature, "temperature_fitted": cal.fitted_temperature,
                   "temperature_kept": float(cal.temperature != 1.0), "calibration_val_nll": cal.val_nll,
                   "calibration_val_nll_after": cal.val_nll_calibrated, "calibration_val_errors": cal.errors,
                   "alpha": cal.alpha})
    for method in C.CONFORMAL_METHODS:
        sets = C.prediction_sets(out["probs"], cal.thresholds[method], method)
        for key, value in C.set_metrics(sets, y).items():
            result[f"{key}_{method}"] = value
    result["coverage"], result["set_size"] = result[f"coverage_{cal.method}"], result[f"set_size_{cal.method}"]
    kept = ~out["abstain"]
    result["abstain_rate"] = float(out["abstain"].mean())
    result["selective_risk"] = float((out["probs"][kept].argmax(1) != y[kept]).mean()) if kept.any() else 0.0
    return result


def _conformal_curve(val_probs: np.ndarray, val_y: np.ndarray, test_probs: np.ndarray, y: np.ndarray) -> list[dict]:
    """Test coverage and mean set size of both methods, each threshold fitted on val, per alpha."""
    rows = []
    for method in C.CONFORMAL_METHODS:
        for alpha in ALPHAS:
            sets = C.prediction_sets(test_probs, C.conformal_threshold(val_probs, val_y, alpha, method), method)
            rows.append({"method": method, "alpha": alpha, **C.set_metrics(sets, y)})
    return rows


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
    if ev.conformal:
        figures["conformal"] = plots.conformal_plot(ev.conformal, ev.metrics["alpha"])
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


def _calibration_text(m: dict) -> list[str]:
    if "temperature_fitted" not in m:
        return []
    held_out = (f"validation NLL {m['calibration_val_nll']:.4f} -> {m['calibration_val_nll_after']:.4f} "
                f"with temperatures fitted on the other half")
    if m["temperature_kept"]:
        verdict = f"kept: {held_out}"
    elif m.get("calibration_val_errors") == 0:
        verdict = ("not kept: the model makes no error on the validation split, so the NLL only falls as "
                   "T -> 0 and the first error on new data would cost a huge NLL")
    else:
        verdict = f"not kept: it would not lower the {held_out}"
    return [f"Temperature scaling of the MC-averaged prediction, fitted on the validation split: "
            f"T = {m['temperature_fitted']:.3f}, {verdict}. Test NLL {m['nll']:.4f} -> {m['nll_ts']:.4f}, "
            f"ECE {m['ece']:.4f} -> {m['ece_ts']:.4f}."]


def _conformal_text(m: dict) -> list[str]:
    if "coverage" not in m:
        return []
    return [f"Split-conformal sets at alpha = {m['alpha']:g}, calibrated on the validation split: test coverage "
            f"LAC {m['coverage_lac']:.3f} (mean size {m['set_size_lac']:.2f}), APS {m['coverage_aps']:.3f} "
            f"(mean size {m['set_size_aps']:.2f}); the target is {1 - m['alpha']:.2f}.",
            f"The served model abstains (set size not 1, or predictive entropy above the threshold fitted for "
            f"the target risk) on {m['abstain_rate']:.1%} of test inputs, whose error rate on the rest is "
            f"{m['selective_risk']:.4f}"
            + (f", and on {m['ood_abstain_rate']:.1%} of OOD inputs" if "ood_abstain_rate" in m else "") + "."]


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
        Section("Calibration", text=_calibration_text(m), figures={"Reliability diagram": ev.figures.get("reliability")}),
        Section("Conformal prediction sets and abstention", text=_conformal_text(m), table=ev.conformal or None,
                figures={"Coverage and set size": ev.figures.get("conformal")}),
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
