"""Evaluate a trained model's uncertainty: metrics, calibration, OOD, shift, figures, report.

Everything reported is recomputable from the saved predictions (``save_predictions``): the
per-sample log-probabilities for test, validation, calibration, OOD and far-OOD inputs, and the
shifted sets.

Which split does what: the calibration split fitted the calibration (its conformal coverage there
is in-sample); the validation split's metrics (``val_*``: ``val_nll``, ``val_ece_ts``,
``val_coverage``, ``val_auroc_entropy`` ...) are what the comparison chooses and gates on; the test
split's metrics (no prefix) are reported only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import nn

from dl_uncertainty.data.rows import to_images, to_rows
from dl_uncertainty.data.splits import Split
from dl_uncertainty.data.stratify import ood_parts
from dl_uncertainty.families.feature_density import abstain_rule, feature_scores
from dl_uncertainty.families.predict import served_log_probs
from dl_uncertainty.reports import calibration_plots, plots
from dl_uncertainty.reports.saliency import grad_cam
from dl_uncertainty.training.loop import set_threads
from dl_uncertainty.uncertainty import calibration as C
from dl_uncertainty.uncertainty import conformal as CF
from dl_uncertainty.uncertainty import metrics as M
from dl_uncertainty.uncertainty.far_ood import FAR_KINDS, far_ood
from dl_uncertainty.uncertainty.metrics import TABLE_METRICS

ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)  # the conformal figure's x-axis
OOD_SCORES = ("entropy", "mutual_info", "density", "energy")  # every OOD table's columns


@dataclass
class Evaluation:
    model_name: str
    metrics: dict[str, float]
    predictions: dict[str, np.ndarray]
    shift: list[dict] = field(default_factory=list)
    conformal: list[dict] = field(default_factory=list)  # coverage and set size per method and alpha
    conformal_classes: list[dict] = field(default_factory=list)  # the served sets' coverage per true class
    conformal_sizes: list[dict] = field(default_factory=list)  # ... per set size
    calibration: dict = field(default_factory=dict)  # the Calibration applied, as a dict
    far_kinds: list[dict] = field(default_factory=list)  # AUROC per generated far-OOD kind and score
    figures: dict[str, Figure] = field(default_factory=dict)


def evaluate_model(
    model: nn.Module, cfg: DictConfig, test: Split, ood: Split | None = None, val: Split | None = None,
    *, calib: Split | None = None, calibration: C.Calibration | None = None, with_figures: bool = True,
) -> Evaluation:
    """MC-predict every split, compute all metrics, and (optionally) draw the figures.

    ``calibration``: the one bundled with the model (what it is served with); without it, one is
    fitted on ``calib`` (else on ``val``, and its ``split`` says so). ``val`` gets the selection
    metrics (``val_*``). Every split's MC samples are seeded from ``cfg.seed``: evaluating the same
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
    rows = {"test": test.x, "far_ood": far}
    has_ood = ood is not None and len(ood.y) > 0
    gate_ood = None  # the OOD rows the champion gate reads; the test report reads the other, disjoint half
    if has_ood:
        gate, report = ood_parts(ood.y, cfg.seed)
        ood_lp = predict(ood.x)
        gate_ood = ood_lp[:, gate] if len(gate) else None
        ood = Split(ood.x[report], ood.y[report], ood.schema)
        lp["ood"], rows["ood"] = ood_lp[:, report], ood.x
    result = M.summarize(lp["test"], test.y, lp.get("ood"), lp["far_ood"])

    if val is not None and len(val.y):
        lp["val"], rows["val"] = predict(val.x), val.x
        result.update(_prefixed("val", M.summarize(lp["val"], val.y, gate_ood)))
    if calib is not None and len(calib.y):
        lp["calib"], rows["calib"] = predict(calib.x), calib.x
    fit_on = "calib" if "calib" in lp else "val"
    if calibration is None and fit_on in lp:
        held = calib if fit_on == "calib" else val
        check = (lambda: (lp["val"], val.y)) if fit_on == "calib" and "val" in lp else None
        calibration = C.fit(lp[fit_on], held.y, e, rows=held.x, seed=cfg.seed, split=fit_on, check=check)
    feats = {name: feature_scores(model, x) for name, x in rows.items()}
    scores = {name: ood_scores(lp[name], feats[name]) for name in rows}
    for prefix, name in (("", "ood"), ("far_", "far_ood")):
        for score in ("density", "energy"):
            if name in scores and score in scores[name]:
                for metric, value in M.ood_metrics(scores["test"][score], scores[name][score]).items():
                    result[f"{prefix}{metric}_{score}"] = value
    served = ({name: C.decide(log_probs, calibration, rows=rows[name],
                              **abstain_rule(model, cfg, feats[name]["density"] if len(feats[name]["density"]) else None))
               for name, log_probs in lp.items()} if calibration else {})
    if served:
        result.update(_calibration_metrics(calibration, served["test"], test.y))
        result.update({f"{name}_abstain_rate": float(served[name]["abstain"].mean())
                       for name in ("ood", "far_ood") if name in served})
        if "val" in served:  # what selection reads: out-of-sample for the calibration, unlike calib's own
            result.update(_prefixed("val", _served_metrics(calibration, served["val"], val.y)))

    shift, shifted = [], {}
    if images is not None:
        for kind in M.CORRUPTIONS:
            for severity in range(1, 6):
                key = f"shift_{kind}_{severity}"
                x_shift = to_rows(M.corrupt(images, kind, severity, seed=cfg.seed), test.schema)
                shifted[key] = predict(x_shift)
                s = M.summarize(shifted[key], test.y)
                found = ood_scores(shifted[key], feature_scores(model, x_shift))  # shifted told from clean
                shift.append({"model": cfg.model.name, "kind": kind, "severity": severity,
                              **{k: s[k] for k in ("acc", "nll", "ece", "entropy")},
                              **{f"auroc_{k}": M.ood_metrics(scores["test"][k], v)["auroc"] for k, v in found.items()}})
        for row in shift:
            result[f"{row['kind']}_s{row['severity']}_acc"] = row["acc"]
            result[f"{row['kind']}_s{row['severity']}_ece"] = row["ece"]

    far_kinds = []
    if images is not None:  # generated far-OOD kinds, each with its own AUROC per score
        for kind in FAR_KINDS:
            x_kind = to_rows(far_ood(kind, images, seed=cfg.seed), test.schema)
            found = ood_scores(predict(x_kind), feature_scores(model, x_kind))
            row = {"kind": kind, **{score: M.ood_metrics(scores["test"][score], v)["auroc"] for score, v in found.items()}}
            far_kinds.append(row)
            result.update({f"far_{kind}_auroc_{score}": row[score] for score in found})

    predictions = _predictions(lp, shifted, test, ood if has_ood else None, val if "val" in lp else None, far,
                               calib if "calib" in lp else None)
    if gate_ood is not None:  # the champion gate's OOD rows, so its val_auroc_* can be recomputed
        predictions["ood_gate_log_probs"] = gate_ood.astype(np.float32)
    for name, found in feats.items():
        prefix = "" if name == "test" else f"{name}_"
        predictions.update({f"{prefix}feature_{k}": v.astype(np.float32) for k, v in found.items() if len(v)})
    for name, out in served.items():
        prefix = "" if name == "test" else f"{name}_"
        predictions[f"{prefix}calibrated_probs"] = out["probs"].astype(np.float32)
        predictions[f"{prefix}prediction_sets"] = out["sets"]
        predictions[f"{prefix}abstain"] = out["abstain"]
    evaluation = Evaluation(cfg.model.name, result, predictions, shift, far_kinds=far_kinds)
    if served:
        evaluation.calibration = calibration.to_dict()
        evaluation.conformal_classes = CF.per_class(served["test"]["sets"], test.y, test.schema.class_names)
        evaluation.conformal_sizes = CF.by_set_size(served["test"]["sets"], test.y)
    held = {"calib": calib, "val": val}.get(calibration.split) if calibration is not None else None
    if held is not None and calibration.split in served:
        evaluation.conformal = _conformal_curve(calibration, served[calibration.split], held.y, served["test"], test.y)
    if with_figures:
        evaluation.figures = _figures(evaluation, test, images, model)
    return evaluation


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items() if k not in ("test_accuracy", "avg_test_uncertainty")}


def ood_scores(log_probs: np.ndarray, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per row, higher = more out-of-distribution: entropy and MI of the MC prediction, and the
    negated feature log-density and energy (``feats``; density only when the model has one)."""
    out = dict(M.uncertainty_scores(log_probs))
    out = {k: out[k] for k in ("entropy", "mutual_info")}
    out.update({k: -feats[k] for k in ("density", "energy") if len(feats.get(k, ())) == log_probs.shape[1]})
    return out


def _calibration_metrics(cal: C.Calibration, out: dict, y: np.ndarray) -> dict:
    """Test metrics of the served (calibrated) prediction ``out``, its conformal sets and abstentions,
    and the calibration's own numbers (on the split it was fitted on)."""
    result = _served_metrics(cal, out, y)
    gain = cal.nll_gain or [float("nan")] * 3
    result.update({"temperature": cal.temperature, "temperature_fitted": cal.fitted_temperature,
                   "temperature_kept": float(cal.temperature != 1.0), "calibration_val_nll": cal.val_nll,
                   "calibration_val_nll_after": cal.val_nll_calibrated, "calibration_val_errors": cal.errors,
                   "temperature_gain": gain[0], "temperature_gain_q05": gain[1], "temperature_gain_q95": gain[2],
                   "alpha": cal.alpha, "calibration_examples": cal.examples,
                   "coverage_band_low": CF.coverage_band(cal.alpha, cal.examples)[0],
                   "coverage_band_high": CF.coverage_band(cal.alpha, cal.examples)[1]})
    return result


def _served_metrics(cal: C.Calibration, out: dict, y: np.ndarray) -> dict:
    """Metrics of the served (calibrated) prediction ``out`` on labels ``y``: its accuracy, NLL and
    ECE (``*_ts``), its conformal sets' coverage and size per method, abstentions."""
    scaled = M.summarize(np.log(np.maximum(out["probs"], 1e-300))[None], y)
    result = {f"{key}_ts": scaled[key] for key in ("acc", "nll", "brier", "ece", "aece")}
    for method in C.CONFORMAL_METHODS:
        scores, tau = cal.scores(out["probs"], out["u"], method), cal.thresholds.get(method, math.inf)
        for key, value in CF.set_metrics(CF.sets_from_scores(scores, tau, out["probs"], cal.nonempty), y).items():
            result[f"{key}_{method}"] = value
        if cal.nonempty:  # what forcing the top class in prevented
            result[f"empty_unforced_{method}"] = float((CF.sets_from_scores(scores, tau, out["probs"]).sum(1) == 0).mean())
    for key in ("coverage", "set_size", "empty"):
        result[key] = result[f"{key}_{cal.method}"]
    kept = ~out["abstain"]
    result["abstain_rate"] = float(out["abstain"].mean())
    result["selective_risk"] = float((out["probs"][kept].argmax(1) != y[kept]).mean()) if kept.any() else 0.0
    return result


def _conformal_curve(cal: C.Calibration, val: dict, val_y: np.ndarray, test: dict, y: np.ndarray) -> list[dict]:
    """Test coverage and set size of every method, each threshold fitted on the calibration split
    (``val``, ``val_y``), per alpha (those that the split is large enough for)."""
    rows, n = [], len(val_y)
    for method in C.CONFORMAL_METHODS:
        for alpha in (a for a in ALPHAS if CF.quantile_rank(n, a) <= n):
            tau = cal.threshold(val["probs"], val_y, val["u"], method, alpha)
            low, high = CF.coverage_band(alpha, n)
            rows.append({"method": method, "alpha": alpha, **CF.set_metrics(cal.sets(test["probs"], test["u"], method, tau), y),
                         "band_low": low, "band_high": high})
    return rows


def _predictions(lp: dict, shifted: dict, test: Split, ood: Split | None, val: Split | None,
                 far: np.ndarray, calib: Split | None = None) -> dict:
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
    if calib is not None:
        out["calib_labels"] = calib.y
    return out


def _figures(ev: Evaluation, test: Split, images: np.ndarray | None, model: nn.Module) -> dict[str, Figure]:
    p, y = ev.predictions, ev.predictions["labels"]
    name = ev.model_name
    scores = {k: p.get(f"{k}entropy") for k in ("", "ood_", "far_ood_")}
    sets = [{"entropy": p[f"{k}entropy"], "mutual_info": p[f"{k}mutual_info"]} if scores[k] is not None else None
            for k in ("", "ood_", "far_ood_")]
    figures = {
        "reliability": calibration_plots.reliability_equal_mass({name: (p["probs"], y)}),
        "risk_coverage": calibration_plots.risk_coverage_zoomed({name: (p["probs"], y)}),
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


def html(ev: Evaluation, title: str | None = None) -> str:
    """The self-contained evaluation report (figures embedded as PNG)."""
    from dl_uncertainty.reports.evaluation_report import html_page

    return html_page(ev, title)
