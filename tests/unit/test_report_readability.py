"""Reports a reviewer can read: equal-mass reliability bins with Wilson intervals, metrics grouped
with their direction, and the conformal section's band and empty-set note."""

import numpy as np
import pytest

from dl_uncertainty.reports import calibration_plots as CP
from dl_uncertainty.reports import metric_catalog as MC


def test_wilson_interval_matches_the_textbook_values():
    low, high = CP.wilson(np.array([0, 29, 15]), np.array([29, 29, 30]))
    assert low == pytest.approx([0.0, 0.8830, 0.3315], abs=1e-4)
    assert high == pytest.approx([0.1170, 1.0, 0.6685], abs=1e-4)


def test_equal_mass_bins_hold_the_same_number_of_examples():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5, 0.1), size=290)
    labels = probs.argmax(1)
    b = CP.equal_mass_bins(probs, labels, n_bins=10)
    assert b["count"].sum() == 290 and b["count"].max() - b["count"].min() <= 1
    assert np.all(np.diff(b["confidence"]) >= 0) and np.all(b["low"] <= b["accuracy"])
    fig = CP.reliability_equal_mass({"m": (probs, labels)})
    assert "10 bins of ~29" in fig.axes[0].get_legend().get_texts()[1].get_text()
    CP.risk_coverage_zoomed({"m": (probs, labels)})


def test_metrics_are_grouped_with_their_direction():
    assert (MC.group("nll"), MC.better("nll")) == ("calibration", "↓")
    assert (MC.group("far_auroc_entropy"), MC.better("far_auroc_entropy")) == ("OOD detection", "↑")
    assert (MC.group("fpr95_mutual_info"), MC.better("fpr95_mutual_info")) == ("OOD detection", "↓")
    assert (MC.group("rotation_s3_acc"), MC.better("rotation_s3_acc")) == ("shift", "↑")
    assert (MC.group("coverage_raps"), MC.better("set_size_raps")) == ("conformal", "↓")
    assert MC.better("coverage_band_low") == "" and MC.group("acc_cov90") == "selective prediction"
    groups = MC.grouped_rows({"acc": 1.0, "nll": 0.1, "mystery": 3.0})
    assert list(groups) == ["accuracy", "calibration", "other"]


def test_the_evaluation_report_prints_the_band_beside_the_measured_coverage(tiny_cfg, digits_splits):
    from dl_uncertainty.reports.evaluation import evaluate_model, html
    from dl_uncertainty.training.loop import train_model

    cfg = tiny_cfg("model=mc_dropout_dnn", "train.epochs=2", "evaluate.conformal_method=raps")
    s = digits_splits
    model = train_model(cfg, s["train"], s["val"]).model
    ev = evaluate_model(model, cfg, s["test"], s["ood"], s["val"])
    page = html(ev)
    n = len(s["val"].y)
    assert f"calibrated on the validation split, n = {n} examples" in page
    assert f"[0.900, {0.9 + 1 / (n + 1):.3f}]" in page
    assert "Conformal coverage per true class (RAPS)" in page and "All metrics: OOD detection" in page
    assert ev.metrics["coverage"] == ev.metrics["coverage_raps"]
    assert sum(r["examples"] for r in ev.conformal_classes) == len(s["test"].y)
