"""The preprocess, train, evaluate and compare steps: what the KFP components run (each a few lines around
one call here) and what ``python -m dl_uncertainty.preprocess`` and ``evaluate`` run, so the pipeline and the
CLI share code. The artifacts they are handed are KFP's, read duck-typed (``.path``, ``.log_metric``, ...): no kfp here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

if TYPE_CHECKING:  # compare never needs torch (a second of its start-up)
    from torch import nn


def train_branch(config_json: str, model_name: str, seed: int, fold: int, train: str, val: str, calib: str,
                 model_path: str, val_rows_path: str) -> dict:
    """The pipeline's train step: train ``model_name`` with model seed ``seed`` on the split files (fold >= 0:
    on the other folds of train + val, early-stopping on fold ``fold``), log it to MLflow, write its bundle
    to ``model_path`` and the rows it early-stopped on to ``val_rows_path``. Returns the Model's metadata."""
    from dl_uncertainty.config.compose import pick_config
    from dl_uncertainty.data.folds import fold_splits, rescaled
    from dl_uncertainty.data.splits import load_split, save_split
    from dl_uncertainty.tracking.bundle import save_bundle
    from dl_uncertainty.train import train_and_log

    cfg = pick_config(config_json, model_name, seed, fold if fold >= 0 else None)
    train_split = load_split(train, mmap=True)  # trained in memory or streamed: data.stream
    val_split = load_split(val, expect=train_split.schema)
    calib_split = load_split(calib, expect=train_split.schema)
    if fold >= 0:
        train_split, val_split = fold_splits(train_split, val_split, cfg.pipeline.folds, fold, cfg.seed)
        calib_split = rescaled(calib_split, train_split.schema)  # the fold's scaling, refitted on its train part
    save_split(val_split, val_rows_path)
    trained = train_and_log(cfg, train_split, val_split, calib_split, checkpoint_dir=f"{model_path}.checkpoints")
    save_bundle(trained.model, cfg, train_split.schema, model_path, run_id=trained.run_id,
                calibration=trained.calibration.to_dict())
    return {"model_name": model_name, "seed": seed, "fold": fold, "mlflow_run_id": trained.run_id,
            "best_val_acc": trained.result.best["val_acc"], "best_val_nll": trained.result.best["val_nll"]}


def prepared_splits(cfg: DictConfig) -> dict:
    """``cfg.data`` cleaned and split with ``cfg.seed``, refused before any split is written when the
    calibration split is too small for ``evaluate.alpha`` or a class cannot be in every one of
    ``pipeline.folds`` folds; prints how many rows cleaning dropped. The pipeline's preprocess step and
    ``python -m dl_uncertainty.preprocess`` both run it."""
    from dl_uncertainty.data.folds import check_folds, pooled_labels
    from dl_uncertainty.data.splits import dropped_rows_line
    from dl_uncertainty.data.tables import prepare
    from dl_uncertainty.uncertainty.conformal import check_alpha

    splits = prepare(cfg.data, cfg.seed)
    check_alpha(len(splits["calib"].y), cfg.evaluate.alpha)
    check_folds(pooled_labels(splits["train"], splits["val"]), cfg.pipeline.folds, splits["train"].schema.class_names)
    if dropped := dropped_rows_line(splits["train"].schema):
        print(dropped)
    return splits


def evaluate_and_log(model: nn.Module, cfg: DictConfig, splits: dict, calibration, run_id: str,
                     predictions_path: str | None = None):
    """Evaluate ``model`` on ``splits`` (test, ood, val, calib) and log everything to MLflow run
    ``run_id``, whatever experiment it is in (``predictions_path``: predictions.npz written there too)."""
    import mlflow

    from dl_uncertainty.reports.evaluation import evaluate_model
    from dl_uncertainty.tracking import runs as tracking
    from dl_uncertainty.tracking import store

    evaluation = evaluate_model(model, cfg, splits["test"], splits["ood"], splits["val"], calib=splits.get("calib"),
                                calibration=calibration)
    store.setup(cfg)
    mlflow.set_experiment(experiment_id=mlflow.get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):
        tracking.log_evaluation(evaluation, predictions_path)
    return evaluation


def evaluate_bundle(bundle: str, val: str, calib: str, test: str, ood: str, predictions_path: str | None = None):
    """The pipeline's evaluate step: the model bundle and split files in, the logged evaluation out,
    with its confusion matrix and the record the compare step reads; the predictions also go to
    ``predictions_path``."""
    from sklearn.metrics import confusion_matrix

    from dl_uncertainty.data.folds import rescaled
    from dl_uncertainty.data.splits import load_split
    from dl_uncertainty.tracking.bundle import load_bundle
    from dl_uncertainty.tracking.compare import registered_name
    from dl_uncertainty.uncertainty.calibration import Calibration

    net, cfg, schema, meta = load_bundle(bundle)
    splits = {"val": load_split(val, expect=schema, mmap=True), "calib": load_split(calib, expect=schema, mmap=True),
              "test": load_split(test, expect=schema, mmap=True), "ood": load_split(ood, mmap=True)}
    splits = {name: rescaled(split, schema) for name, split in splits.items()}  # a fold model's own scaling
    calibration = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None
    evaluation = evaluate_and_log(net, cfg, splits, calibration, meta["run_id"], predictions_path)
    matrix = confusion_matrix(evaluation.predictions["labels"], evaluation.predictions["probs"].argmax(1),
                              labels=list(range(len(schema.class_names))))
    record = {"model": cfg.model.name, "seed": cfg.seed, "run_id": meta["run_id"], "metrics": evaluation.metrics,
              **({"fold": cfg.pipeline.fold} if cfg.pipeline.fold >= 0 else {}),
              "registered_model_name": registered_name(cfg.data, schema.feature_shape, cfg.evaluate.registered_model_name)}
    return evaluation, list(schema.class_names), matrix.tolist(), record


def write_evaluation(evaluated: tuple, metrics, confusion, report) -> None:
    """The evaluate step's outputs from what ``evaluate_bundle`` returned: every metric and the confusion
    matrix to KFP, the HTML report, and the record the compare step reads (in the metrics artifact's file)."""
    from dl_uncertainty.reports.evaluation import html

    result, class_names, matrix, record = evaluated
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
    confusion.log_confusion_matrix(class_names, matrix)
    with open(report.path, "w") as fh:
        fh.write(html(result))
    with open(metrics.path, "w") as fh:  # the file travels with the artifact to the compare step
        json.dump(record, fh)


@dataclass
class Comparison:
    winner: str
    markdown: str
    html: str
    verdict: str
    registered_version: str
    champion: bool
    registered_name: str = ""


def compare_models(config_json: str, records: list[str], predictions: list[str]) -> Comparison:
    """The pipeline's compare step: table the evaluated models (mean ± std over each family's seeds),
    pick the winner on the mean of a validation metric, say whether its lead is beyond seed noise,
    gate the winner's median-seed run on validation metrics and register it under its data's name."""
    from dl_uncertainty.config.compose import pick_config
    from dl_uncertainty.tracking import compare as C
    from dl_uncertainty.tracking import folds as F
    from dl_uncertainty.tracking import seeds as S
    from dl_uncertainty.tracking import store
    from dl_uncertainty.uncertainty.metrics import TABLE_METRICS

    cfg = pick_config(config_json)
    entries = [json.loads(open(path).read()) for path in records]
    for entry, path in zip(entries, predictions, strict=True):
        entry["predictions"] = path
    spreads = S.aggregate(entries)
    results = S.means(spreads)
    metric, mode = C.selection_metric(cfg.evaluate.winner_metric), cfg.evaluate.winner_mode
    winner = C.pick_winner(results, metric, mode)
    chosen = {name: S.median_seed(runs, metric, mode) for name, runs in S.by_family(entries).items()}
    preds = {}
    for name, entry in chosen.items():
        with np.load(entry["predictions"]) as npz:
            preds[name] = {"probs": npz["probs"], "labels": npz["labels"]}
    registered = chosen[winner]
    gate, alpha = cfg.evaluate.champion_gate, registered["metrics"].get("alpha", cfg.evaluate.alpha)
    failures = C.gate_failures(registered["metrics"], gate, alpha)
    store.setup(cfg)
    name = registered.get("registered_model_name") or C.registered_name(cfg.data, [], cfg.evaluate.registered_model_name)
    verdict = C.gate_verdict(winner, failures, C.gate_skipped(registered["metrics"], gate), C.current_champion(name))
    over = S.axis(entries)  # seed, or fold under cross-validation
    noise = S.noise_verdict(winner, metric, S.leads(entries, winner, metric, mode), over=over)
    columns = [c for c in TABLE_METRICS if any(c in m for m in results.values())]
    note = f"{C.selection_note(metric)}. {noise}"
    markdown = S.spread_markdown(spreads, columns, winner, metric, mode, registered, note, verdict, axis=over)
    folds = F.cross_validation(entries) if F.has_folds(entries) else None
    if folds:
        markdown += "\n" + F.cv_markdown(folds)
    tuning = C.tuning_section({family: entry["run_id"] for family, entry in chosen.items()})
    html = C.comparison_html(results, columns, winner, metric, mode, preds, f"{noise} {verdict}", tuning,
                             seeds=S.spread_rows(spreads, columns, over),
                             cross_validation=F.cv_section(folds) if folds else None)
    version = C.register_champion(registered["run_id"], name, promote=not failures)
    return Comparison(winner, markdown, html, verdict, version, not failures, name)
