from kfp import dsl
from kfp.dsl import Artifact, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def configure(
    models: list,
    overrides: list,
    epochs: int,
    learning_rate: float,
    mc_samples: int,
    seed: int,
    seeds: int,
    folds: int,
    data_source: str,
    experiment_name: str,
    mlflow_tracking_uri: str,
    config: Output[Artifact],
) -> list:
    """Compose and validate one config per model from configs/ and the run's parameters (JSON file).
    A key set both by a typed parameter (epochs, ...) and by ``overrides`` must have one value.

    An artifact, not a string output: kfp.local (2.17.0) hands a ParallelFor task the loop item in
    place of any upstream *parameter* output, while artifacts arrive intact. Returns the branches,
    ``[{"model": ..., "seed": ..., "fold": ...}]`` (every model x ``seeds`` model seeds, or x ``folds``
    folds with K-fold cross-validation; fold -1: none), which only the ParallelFor reads.
    """
    from dl_uncertainty.config.compose import (
        branches,
        data_source_overrides,
        model_configs,
        with_typed,
    )
    from dl_uncertainty.config.parameters import typed_overrides

    typed = [*typed_overrides(locals()), *data_source_overrides(data_source)]
    if mlflow_tracking_uri:
        typed.append(f"tracking_uri={mlflow_tracking_uri}")
    with open(config.path, "w") as fh:
        fh.write(model_configs(list(models), with_typed(typed, list(overrides))))
    config.metadata["models"] = list(models)
    return branches(list(models), seeds, seed, folds)
