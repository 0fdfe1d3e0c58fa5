"""``tuning-pipeline``: tune_setup -> ParallelFor(workers: tune_trials) -> tune_report.

Every worker runs trials of one Optuna study in shared RDB storage (PostgreSQL in the cluster,
SQLite under kfp.local); setup creates the study first, since concurrent schema creation races.
"""

import sys
from pathlib import Path

from kfp import dsl, kubernetes
from omegaconf import DictConfig

from components.tune_report import tune_report
from components.tune_setup import tune_setup
from components.tune_trials import tune_trials
from dl_uncertainty.config.compose import without_keys
from pipelines.pipeline import task_settings

TUNING_PIPELINE_NAME = "tuning-pipeline"
TYPED_KEYS = ["model", "tune.n_trials", "train.epochs", "seed", "tune.storage", "tune.workers", "experiment_name"]


def build_tuning_pipeline(cfg: DictConfig, *, cluster: bool = True, gpu: bool | None = None,
                          mlflow_tracking_uri: str | None = None, study_storage: str | None = None,
                          default_overrides: list[str] | None = None):
    """The pipeline function, defaults from ``cfg``; ``cfg.tune.workers`` parallel workers.

    On a cluster the study lives in ``pipeline.tune_storage`` (PostgreSQL; the password comes from
    the ``pipeline.tune_secret`` Secret as PGPASSWORD); locally in ``study_storage``.
    """
    p, workers = cfg.pipeline, int(cfg.tune.workers)
    gpu = p.gpu if gpu is None else gpu
    tracking = mlflow_tracking_uri or p.mlflow_tracking_uri

    other_overrides = without_keys(list(default_overrides or []), TYPED_KEYS)  # the typed parameters carry those

    def configure_task(task, kind: str = "step"):
        task_settings(task, p, kind, cluster=cluster, gpu=gpu, tracking_uri=tracking)
        if cluster:
            kubernetes.use_secret_as_env(task, secret_name=p.tune_secret,
                                         secret_key_to_env={"OPTUNA_DB_PASSWORD": "PGPASSWORD"})
        return task

    @dsl.pipeline(name=TUNING_PIPELINE_NAME,
                  description="Optuna sweep of one model family: parallel workers share one study; "
                              "the best config as a Hydra file.")
    def tuning_pipeline(
        model: str = str(cfg.model.name),
        n_trials: int = int(cfg.tune.n_trials),
        epochs: int = int(cfg.train.epochs),
        seed: int = int(cfg.seed),
        data_source: str = str(cfg.data.path or cfg.data.source),
        study_storage: str = study_storage or (str(p.tune_storage) if cluster else str(cfg.tune.storage)),
        study_name: str = "",
        mlflow_tracking_uri: str = "",
        experiment_name: str = str(cfg.experiment_name),
        overrides: list = other_overrides,
    ):
        setup = configure_task(tune_setup(
            model=model, overrides=overrides, n_trials=n_trials, epochs=epochs, seed=seed,
            data_source=data_source, study_storage=study_storage, study_name=study_name, workers=workers,
            experiment_name=experiment_name, mlflow_tracking_uri=mlflow_tracking_uri)).set_display_name("setup")
        # unnamed, like the training pipeline's loop: a name breaks dsl.Collected on the backend (#13239)
        with dsl.ParallelFor(list(range(workers)), parallelism=workers) as worker:
            trials = configure_task(tune_trials(study=setup.outputs["study"], worker=worker),
                                    kind="train").set_display_name("trials")
        configure_task(tune_report(study=setup.outputs["study"], trials=dsl.Collected(trials.outputs["trials"]))
                       ).set_display_name("report")

    return tuning_pipeline


def run_tuning_local(overrides: list[str], pipeline_root: str | Path = "local_outputs", verbose: bool = False) -> Path:
    """Run ``tuning-pipeline`` with kfp.local (SQLite study, local MLflow); return the run's folder."""
    from dl_uncertainty.tracking.store import absolute_sqlite
    from dl_uncertainty.training.tuning import compose
    from pipelines.local import execute

    cfg = compose(overrides)  # a bad override or search range fails before any task starts
    rest = [o for o in overrides if not o.startswith("model=")]  # the model is a pipeline parameter
    storage = absolute_sqlite(cfg.tune.storage)
    run_dir, _, seconds, _ = execute(
        cfg, TUNING_PIPELINE_NAME, pipeline_root, verbose, "subprocess",
        lambda uri, _image: build_tuning_pipeline(cfg, cluster=False, mlflow_tracking_uri=uri,
                                                  study_storage=storage, default_overrides=rest),
        labels=[f"worker {i}" for i in range(int(cfg.tune.workers))])
    sys.stdout.write(f"\n{TUNING_PIPELINE_NAME} finished in {seconds:.0f} s; outputs in {run_dir}\n"
                     f"  best config {run_dir / 'tune-report' / 'tuned'} (save as configs/tuned/{cfg.model.name}.yaml"
                     f" to re-train it with +tuned={cfg.model.name})\n  report {run_dir / 'tune-report' / 'report'}\n")
    return run_dir
