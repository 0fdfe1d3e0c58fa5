"""Which held-out rows fit what: the density's abstain threshold on the calibration split, the OOD
rows split between the champion gate and the test report, and runs from before the calibration split."""

import mlflow
import numpy as np
import pytest

from dl_uncertainty.data.stratify import ood_parts
from dl_uncertainty.families.feature_density import density_of, log_density, threshold_on
from dl_uncertainty.reports.evaluation import evaluate_model
from dl_uncertainty.training import loop
from dl_uncertainty.uncertainty import metrics as M
from dl_uncertainty.uncertainty.density import fit_threshold
from tests.conftest import run_module


def test_ood_rows_split_into_disjoint_class_stratified_halves():
    labels = np.array([0] * 9 + [1] * 20 + [2])
    gate, report = ood_parts(labels, seed=3)
    assert not set(gate) & set(report) and sorted([*gate, *report]) == list(range(len(labels)))
    assert [int((labels[gate] == c).sum()) for c in (0, 1, 2)] == [4, 10, 0]  # a lone row goes to the report
    again = ood_parts(labels, seed=3)
    np.testing.assert_array_equal(gate, again[0])
    assert not np.array_equal(gate, ood_parts(labels, seed=4)[0])


def test_gate_and_report_read_disjoint_ood_rows(tiny_cfg, digits_splits):
    s = digits_splits
    cfg = tiny_cfg("model=mc_dropout_dnn", "train.epochs=1")
    model = loop.train_model(cfg, s["train"], s["val"], quiet=True).model
    ev = evaluate_model(model, cfg, s["test"], s["ood"], s["val"], calib=s["calib"], with_figures=False)
    gate, report = ood_parts(s["ood"].y, cfg.seed)
    assert len(gate) + len(report) == len(s["ood"].y) and abs(len(gate) - len(report)) <= 2
    np.testing.assert_array_equal(ev.predictions["ood_labels"], s["ood"].y[report])
    entropy = {name: M.uncertainty_scores(ev.predictions[f"{name}log_probs"])["entropy"] for name in ("", "val_")}
    full = ev.predictions["ood_entropy"]
    assert ev.metrics["auroc_entropy"] == M.ood_metrics(entropy[""], full)["auroc"]
    from dl_uncertainty.families.predict import served_log_probs

    gate_entropy = M.uncertainty_scores(served_log_probs(model, s["ood"].x[gate], cfg).numpy())["entropy"]
    assert abs(ev.metrics["val_auroc_entropy"] - M.ood_metrics(entropy["val_"], gate_entropy)["auroc"]) < 1e-9


def test_the_density_threshold_is_fitted_on_the_calibration_split(tiny_cfg, digits_splits):
    s = digits_splits
    cfg = tiny_cfg("model=mc_dropout_dnn", "train.epochs=1")
    model = loop.train_model(cfg, s["train"], s["val"], quiet=True).model
    fitted = threshold_on(model, s["calib"].x, cfg)
    assert fitted is density_of(model)
    calib = log_density(model, s["calib"].x)
    assert fitted.threshold == fit_threshold(calib, 0.95) != fit_threshold(log_density(model, s["val"].x), 0.95)
    assert np.mean(calib >= fitted.threshold) >= 0.95


def test_evaluating_a_run_from_before_the_calibration_split_says_what_is_missing(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("before-calib"))
    for key, value in {"model.name": "bnn", "data.val_fraction": 0.15, "data.test_fraction": 0.2}.items():
        client.log_param(run.info.run_id, key, value)  # what such a run logged: its config, without data.calib_fraction
    proc = run_module("dl_uncertainty.evaluate", f"run_id={run.info.run_id}", cwd=tmp_path, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert lines == [f"error: run {run.info.run_id} was trained before the calibration split existed (it has no "
                     "data.calib_fraction param): its calibration and abstain thresholds were fitted on validation; "
                     "retrain it with `python -m dl_uncertainty.train model=bnn` (or `make run`) and evaluate the new run"]


def test_evaluate_logs_to_a_run_in_any_experiment(tiny_cfg, digits_splits, tmp_path, monkeypatch):
    from dl_uncertainty.evaluate import evaluate_run
    from dl_uncertainty.train import train_and_log

    monkeypatch.chdir(tmp_path)  # the store's artifacts beside its database
    store = [f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    trained = train_and_log(tiny_cfg("model=mc_dropout_dnn", "train.epochs=1", "experiment_name=elsewhere", *store,
                                     f"train.checkpoint_dir={tmp_path / 'ckpt'}"),
                            digits_splits["train"], digits_splits["val"], digits_splits["calib"])
    evaluation = evaluate_run(tiny_cfg(f"run_id={trained.run_id}", *store))  # the default experiment is active
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(trained.run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(evaluation.metrics["test_accuracy"])
