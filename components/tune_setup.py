from kfp import dsl
from kfp.dsl import Artifact, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def tune_setup(
    model: str,
    overrides: list,
    n_trials: int,
    epochs: int,
    seed: int,
    data_source: str,
    study_storage: str,
    study_name: str,
    workers: int,
    experiment_name: str,
    mlflow_tracking_uri: str,
    study: Output[Artifact],
):
    """Compose the sweep's config, create the Optuna study and the parent MLflow run, once, before the
    workers start (they only open the study). An artifact, not a string output: kfp.local (2.17.0)
    hands a ParallelFor task the loop item in place of any upstream *parameter* output."""
    from dl_uncertainty.config.compose import data_source_overrides, with_typed
    from dl_uncertainty.training.tuning import begin, compose

    typed = [f"model={model}", f"tune.n_trials={n_trials}", f"train.epochs={epochs}", f"seed={seed}",
             f"tune.storage={study_storage}", f"tune.workers={workers}", f"experiment_name={experiment_name}",
             *data_source_overrides(data_source)]
    if study_name:
        typed.append(f"tune.study_name={study_name}")
    if mlflow_tracking_uri:
        typed.append(f"tracking_uri={mlflow_tracking_uri}")
    sweep = begin(compose(with_typed(typed, list(overrides))))
    with open(study.path, "w") as fh:
        fh.write(sweep.to_json())
    study.metadata.update({"study_name": sweep.study_name, "parent_run_id": sweep.parent_run_id,
                           "trials": sweep.trials})
