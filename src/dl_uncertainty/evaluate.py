"""Re-evaluate a logged model and add the uncertainty metrics, figures and report to its MLflow run.

    python -m dl_uncertainty.evaluate run_id=<MLflow run id, or its first characters> [evaluate.mc_samples=100]

The calibration (evaluate.calibration, alpha, conformal_method, target_risk, conformal_nonempty, raps_*) and the
feature density (evaluate.abstain_on, density_target_rate, density_ridge) are the ones fitted after training and bundled with the model; setting one of them to another value here is refused.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig

from dl_uncertainty.errors import UserError

# fitted after training on the calibration split and bundled with the model: fixed once trained
BUNDLED = ("calibration", "alpha", "conformal_method", "target_risk", "conformal_nonempty", "raps_k_reg",
           "raps_lambda", "abstain_on", "density_target_rate", "density_ridge", "density")


def _check_bundled(given: DictConfig, trained: DictConfig, run_id: str) -> None:
    """A calibration option set on the command line (not the default) that differs from the one the
    model was calibrated with is refused: evaluation uses the bundled calibration, as serving does."""
    from dl_uncertainty.config.schema import EvaluateConfig

    default = EvaluateConfig()
    trained = {k: trained.get(k, getattr(default, k)) for k in BUNDLED}  # keys newer than the run: defaults
    changed = [f"evaluate.{k}={given[k]}" for k in BUNDLED if given[k] != getattr(default, k) and given[k] != trained[k]]
    if changed:
        bundled = ", ".join(f"{k}={trained[k]}" for k in BUNDLED[:4])
        raise UserError(f"{' '.join(changed)} cannot change a trained model: run {run_id} is evaluated with the "
                        f"calibration bundled at training ({bundled}); to change it, retrain with "
                        f"`python -m dl_uncertainty.train {' '.join(changed)}` (or `make run OVERRIDES=...`)")


def _run_id(given: str) -> str:
    """A run id, also when given as the ``runs:/<id>/model`` URI MLflow shows beside a logged model."""
    given = given.strip()
    if given.startswith("runs:/"):
        return given[len("runs:/"):].strip("/").split("/")[0]
    if ":/" in given:
        raise UserError(f"run_id={given} is a URI, not a run id; give the run's id (32 hex characters, printed by "
                        "dl_uncertainty.train and shown in `make mlflow-ui`) or runs:/<id>/model")
    return given


def _run_of_prefix(prefix: str, uri: str) -> str:
    """The one run whose id starts with ``prefix`` (as git takes a commit's first characters)."""
    import mlflow

    if not re.fullmatch(r"[0-9a-f]{1,31}", prefix):
        raise UserError(f"no MLflow run {prefix} at {uri}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")  # it pages through them
    matches = [run.info.run_id for run in runs if run.info.run_id.startswith(prefix)]
    if not matches:
        raise UserError(f"no MLflow run {prefix} at {uri}")
    if len(matches) > 1:
        raise UserError(f"run_id={prefix} starts {len(matches)} runs' ids ({', '.join(sorted(matches)[:3])}"
                        f"{', ...' if len(matches) > 3 else ''}); give more of the id")
    return matches[0]


def _check_calibration_split(run, run_id: str) -> None:
    """A run trained before the calibration split existed fitted its temperature, conformal and abstain
    thresholds on validation, which now picks and gates models: refused, rather than evaluated on a
    split layout it was not trained with."""
    params = run.data.params
    if "data.calib_fraction" in params:
        return
    if "model.name" not in params and "model_type" not in run.data.tags:
        raise UserError(f"run {run_id} holds no model trained by dl_uncertainty (no model.name param); give the id "
                        "that `python -m dl_uncertainty.train` printed")
    model = params.get("model.name") or run.data.tags.get("model_type") or "<family>"
    raise UserError(f"run {run_id} was trained before the calibration split existed (it has no data.calib_fraction "
                    "param): its calibration and abstain thresholds were fitted on validation; retrain it with "
                    f"`python -m dl_uncertainty.train model={model}` (or `make run`) and evaluate the new run")


def evaluate_run(cfg: DictConfig):
    """Evaluate run ``cfg.run_id``'s model on the data it was trained on, log to that run."""
    import mlflow

    from dl_uncertainty.config.schema import EvaluateConfig
    from dl_uncertainty.data.folds import prepare_run_splits
    from dl_uncertainty.steps import evaluate_and_log
    from dl_uncertainty.tracking import runs as tracking
    from dl_uncertainty.tracking import store
    from dl_uncertainty.train import check_mc_memory

    if not cfg.run_id:
        raise UserError("set run_id=<MLflow run id> (printed by dl_uncertainty.train, or see `make mlflow-ui`)")
    cfg.run_id = _run_id(str(cfg.run_id))
    store.setup(cfg)
    try:
        found = mlflow.get_run(cfg.run_id)
    except mlflow.exceptions.MlflowException:
        cfg.run_id = _run_of_prefix(cfg.run_id, store.tracking_uri(cfg))
        found = mlflow.get_run(cfg.run_id)
    if found.info.lifecycle_stage == "deleted":
        raise UserError(f"MLflow run {cfg.run_id} is deleted; restore it first (`mlflow runs restore --run-id "
                        f"{cfg.run_id}` with MLFLOW_TRACKING_URI={store.tracking_uri(cfg)}) or evaluate another run")
    _check_calibration_split(found, cfg.run_id)
    logged = tracking.load_logged_model(cfg.run_id)
    _check_bundled(cfg.evaluate, logged.cfg.evaluate, cfg.run_id)
    run_cfg = logged.cfg.copy()
    evaluate = cfg.evaluate.copy()  # data and model as trained; evaluation options from the command line ...
    for key in BUNDLED:  # ... except what was fitted after training and is bundled with the model
        evaluate[key] = logged.cfg.evaluate.get(key, getattr(EvaluateConfig(), key))
    run_cfg.evaluate = evaluate
    splits = prepare_run_splits(run_cfg)  # a fold model: validated on its own fold, as in training
    check_mc_memory(run_cfg, list(splits.values()), len(splits["train"].schema.class_names))
    return evaluate_and_log(logged.model, run_cfg, splits, logged.calibration, cfg.run_id)


def _task(cfg: DictConfig) -> None:
    from dl_uncertainty.reports.evaluation import metrics_table
    from dl_uncertainty.reports.render import markdown_table

    evaluation = evaluate_run(cfg)
    print(markdown_table(metrics_table([evaluation])))
    print(f"\nlogged to run {cfg.run_id}: test_accuracy {evaluation.metrics['test_accuracy']:.4f}, "
          f"avg_test_uncertainty {evaluation.metrics['avg_test_uncertainty']:.4f}")


if __name__ == "__main__":
    from dl_uncertainty.cli import run

    run("evaluate", __doc__, _task)
