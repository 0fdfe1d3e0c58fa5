"""The evaluation report's page: what each section says, in words and tables a reviewer can check."""

from __future__ import annotations

from dl_uncertainty.reports import metric_catalog
from dl_uncertainty.reports.render import Section, html_report
from dl_uncertainty.uncertainty.calibration import CONFORMAL_METHODS
from dl_uncertainty.uncertainty.metrics import TABLE_METRICS


def headline_rows(m: dict) -> list[dict]:
    """The summary as one metric per row (it fits the page however many metrics there are)."""
    keys = [k for k in (*TABLE_METRICS, "nll_ts", "ece_ts") if k in m]
    return [{"metric": k, "value": m[k], "better": metric_catalog.better(k),
             "group": metric_catalog.group(k)} for k in keys]


SPLIT_NAMES = {"calib": "calibration", "val": "validation"}


def calibration_text(m: dict) -> list[str]:
    if "temperature_fitted" not in m:
        return []
    reason = m.get("temperature_reason") or ("kept" if m["temperature_kept"] else "not kept")
    split = SPLIT_NAMES.get(m.get("calibration_split", "val"), "validation")
    return [f"Temperature scaling of each MC sample (the served prediction is their mean), fitted on the {split} "
            f"split: T = {m['temperature_fitted']:.3f}, {reason}. {split.capitalize()} NLL {m['calibration_val_nll']:.4f} unscaled, "
            f"{m['calibration_val_nll_after']:.4f} when each half is scaled with T fitted on the other half; T is "
            f"kept only when the 5 % quantile of the bootstrapped per-row gain is above 0.",
            f"Test NLL {m['nll']:.4f} -> {m['nll_ts']:.4f}, ECE {m['ece']:.4f} -> {m['ece_ts']:.4f} "
            f"(served prediction{'' if m['temperature_kept'] else ', the same as unscaled'})."]


def conformal_text(m: dict, method: str, nonempty: bool) -> list[str]:
    if "coverage" not in m:
        return []
    n, low, high = int(m["calibration_examples"]), m["coverage_band_low"], m["coverage_band_high"]
    measured = ", ".join(f"{k.upper()} {m[f'coverage_{k}']:.3f}" for k in CONFORMAL_METHODS if f"coverage_{k}" in m)
    split = SPLIT_NAMES.get(m.get("calibration_split", "val"), "validation")
    lines = [f"Split-conformal sets at alpha = {m['alpha']:g}, calibrated on the {split} split, n = {n} examples: the "
             f"guaranteed average coverage is the band [{low:.3f}, {high:.3f}] = [1 - alpha, 1 - alpha + 1/(n+1)] "
             f"(the upper end for unforced sets without ties). Measured test coverage: {measured}. The served "
             f"sets are {method.upper()}{' with the top class always in' if nonempty else ''}. The test split's "
             f"own sampling noise is about +/- {2 * (low * (1 - low) / max(m.get('test_examples', 1), 1)) ** 0.5:.3f} "
             f"(2 sd)."
             + (f" On the validation split (not used to fit the thresholds; what the champion gate reads): "
                f"{m['val_coverage']:.3f}." if "val_coverage" in m else "")]
    empty = m.get("empty_unforced_" + method, m.get("empty", 0.0))
    if empty > 0 or nonempty:
        lines.append(f"{empty:.1%} of test sets would be empty: no class is plausible enough at this alpha, which "
                     f"is the abstain rule in disguise (a confident model's threshold keeps only classes above "
                     f"a probability close to 1; for APS and RAPS, a confident row whose uniform u is large, so "
                     f"those empty sets fall on random rows rather than uncertain ones). "
                     + ("evaluate.conformal_nonempty=true puts the top class in them (served here)." if nonempty
                        else "evaluate.conformal_nonempty=true always puts the top class in; coverage can only rise."))
    lines.append(f"The served model abstains (set size not 1, or predictive entropy above the threshold fitted for "
                 f"the target risk) on {m['abstain_rate']:.1%} of test inputs, whose error rate on the rest is "
                 f"{m['selective_risk']:.4f}"
                 + (f", and on {m['ood_abstain_rate']:.1%} of OOD inputs" if "ood_abstain_rate" in m else "") + ".")
    return lines


def conformal_rows(m: dict, served: str) -> list[dict]:
    """One row per method: coverage beside its guaranteed band, set size, empty and singleton shares."""
    rows = []
    for k in CONFORMAL_METHODS:
        if f"coverage_{k}" in m:
            rows.append({"method": k.upper() + (" (served)" if k == served else ""),
                         "coverage": m[f"coverage_{k}"], "band low": m["coverage_band_low"],
                         "band high": m["coverage_band_high"], "mean set size": m[f"set_size_{k}"],
                         "empty": m[f"empty_{k}"], "singleton": m[f"singleton_{k}"]})
    return rows


def html_page(ev, title: str | None = None) -> str:
    """The evaluation report page of ``ev`` (a ``reports.evaluation.Evaluation``; not imported: that module imports this one)."""
    m = dict(ev.metrics)
    m["test_examples"] = len(ev.predictions["labels"])
    cal = ev.calibration or {}
    m["temperature_reason"] = cal.get("temperature_reason", "")
    m["calibration_split"] = cal.get("split", "val")
    served, nonempty = cal.get("method", "lac"), bool(cal.get("nonempty", False))
    f = ev.figures.get
    sections = [
        Section("Summary", text=[
            f"Test accuracy {m['acc']:.4f}, NLL {m['nll']:.4f}, ECE {m['ece']:.4f} (15 bins), "
            f"mean predictive entropy {m['avg_test_uncertainty']:.4f}, on {m['test_examples']} test examples.",
            *([f"OOD detection AUROC by entropy {m['auroc_entropy']:.4f}, by mutual information "
               f"{m['auroc_mutual_info']:.4f}"
               + (f", by feature density {m['auroc_density']:.4f}" if "auroc_density" in m else "") + "."]
              if "auroc_entropy" in m else []),
            "↑: higher is better, ↓: lower is better.",
        ], table=headline_rows(m)),
        Section("Calibration", text=calibration_text(m), figures={"Reliability diagram": f("reliability")}),
        Section("Conformal prediction sets and abstention", text=conformal_text(m, served, nonempty),
                table=conformal_rows(m, served) or None),
        Section(f"Conformal coverage per true class ({served.upper()})", table=ev.conformal_classes or None,
                text="Class-conditional coverage: the guarantee is on average over classes, not for each one."
                if ev.conformal_classes else ()),
        Section(f"Conformal coverage by set size ({served.upper()})", table=ev.conformal_sizes or None),
        Section(f"Conformal sets across alpha (thresholds fitted on the {SPLIT_NAMES.get(m['calibration_split'])} "
                "split, measured on test)",
                table=ev.conformal or None, figures={"Coverage and set size": f("conformal")}),
        Section("Selective prediction", figures={"Risk-coverage": f("risk_coverage")}),
        Section("Out-of-distribution detection", figures={"Uncertainty histograms": f("uncertainty_histograms")}),
        Section("Generated far-OOD inputs: AUROC per kind and score", table=ev.far_kinds or None,
                text="Entropy and mutual information of the MC prediction; density: the class-conditional "
                     "Gaussian of the penultimate features fitted on the training split; energy: logsumexp "
                     "of the logits. 1.0: every generated input scores as more out-of-distribution than "
                     "every test input; below 0.5: inverted." if ev.far_kinds else ()),
        Section("Distribution shift", table=ev.shift or None, figures={"Shift": f("shift")}),
        Section("Most uncertain test inputs", figures={"Inputs": f("most_uncertain"), "Grad-CAM": f("saliency")}),
        Section("Confusion matrix", figures={"Confusion": f("confusion_matrix")}),
    ]
    for grp, rows in metric_catalog.grouped_rows(ev.metrics).items():
        sections.append(Section(f"All metrics: {grp}", table=rows))
    for section in sections:
        if isinstance(section.figures, dict):
            section.figures = {k: v for k, v in section.figures.items() if v is not None}
    sections = [s for s in sections if s.figures or s.table or s.text]
    return html_report(title or f"Uncertainty report: {ev.model_name}", sections)
