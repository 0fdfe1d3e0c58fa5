"""MLflow: where runs go, what they log, and the uncertainty-aware pyfunc model."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from torch import nn

from dl_uncertainty.config.compose import flatten
from dl_uncertainty.data.splits import Schema
from dl_uncertainty.errors import UserError
from dl_uncertainty.tracking.bundle import load_bundle, save_bundle
from dl_uncertainty.tracking.store import TUNED_STUDY_TAG, setup

SAMPLE_CACHE_MB = 256  # per loaded model: its seeded MC draws, kept for reuse (see inference.SampleCache)
PYFUNC_REQUIREMENTS = ["torch>=2.3", "torchbnn>=1.2,<1.3", "numpy", "pandas", "omegaconf>=2.3,<2.4",
                       "hydra-core>=1.3.2,<1.4", "scikit-learn", "boto3"]


def git_sha() -> str | None:
    """The checkout's commit, or the one the container image was built from (DLU_GIT_SHA)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DLU_GIT_SHA")


def live_run(run_id: str | None) -> bool:
    """Whether ``run_id`` is a run in the configured store (not deleted) that can be continued."""
    if not run_id:
        return False
    try:
        return mlflow.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


@contextmanager
def start_run(cfg: DictConfig, continue_run_id: str | None = None):
    """A new run tagged with the model type and seed, with the flattened config as params; or, given the
    id of a run still in the store (a resumed training's), that run continued with its params kept."""
    setup(cfg)
    continue_run_id = continue_run_id if live_run(continue_run_id) else None
    with mlflow.start_run(**({"run_id": continue_run_id} if continue_run_id else {"run_name": cfg.model.name})) as run:
        sha = git_sha()
        mlflow.set_tags({"model_type": cfg.model.name, "seed": str(cfg.seed), **({"git_sha": sha} if sha else {})})
        if cfg.tune.tuned_study:  # trained from configs/tuned/<model>.yaml: the sweep it came from
            mlflow.set_tag(TUNED_STUDY_TAG, cfg.tune.tuned_study)
        if not continue_run_id:  # a continued run keeps the params it started with
            mlflow.log_params(flatten(cfg))
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")  # stopped by the user, not a failure
            raise


class UncertaintyModel(mlflow.pyfunc.PythonModel):
    """predict(raw features) -> calibrated class probabilities, predicted class, predictive entropy,
    mutual information, the conformal prediction set, whether to abstain, and the feature log-density
    (``feature_density``: low = far from the training data) when the model has one.

    Inputs are what the user's data holds (named columns, or rows of values in that order): the
    cleaning and scaling fitted on the training split are applied here. MC sampling is seeded per
    row, so a row gets the same answer alone or anywhere in any batch; the draws (a BNN's noise vectors,
    dropout masks) depend only on the seed and the sample, so they are drawn once and kept in
    ``sample_cache`` (at most SAMPLE_CACHE_MB; None draws them on every call, with the same answers).
    """

    _skip_type_hint_validation = True  # predict takes DataFrames and arrays alike; raw_to_rows checks

    def load_context(self, context):
        from dl_uncertainty.uncertainty.calibration import Calibration

        self.model, self.cfg, self.schema, meta = load_bundle(context.artifacts["bundle"])
        self.calibration = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None
        self.sample_cache = new_sample_cache(SAMPLE_CACHE_MB)

    def predict(self, context, model_input, params=None):
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from dl_uncertainty.data.rows import check_row_shape, raw_to_rows

        try:
            if isinstance(model_input, np.ndarray) and model_input.ndim > 2:  # images: their shape, not any
                check_row_shape(model_input.shape[1:], self.schema, "the input", len(model_input))
            x = raw_to_rows(as_frame(model_input), self.schema)
        except UserError as err:
            raise MlflowException(str(err), INVALID_PARAMETER_VALUE) from None
        return self.predict_rows(x)

    def predict_rows(self, x: np.ndarray) -> pd.DataFrame:
        """The same answer for rows that are already cleaned and scaled (as the split files hold them)."""
        from dl_uncertainty.families.feature_density import abstain_rule, log_density
        from dl_uncertainty.families.predict import served_log_probs
        from dl_uncertainty.uncertainty.calibration import Calibration, decide

        log_probs = served_log_probs(self.model, x, self.cfg, cache=getattr(self, "sample_cache", None)).numpy()
        density = log_density(self.model, x)
        out = decide(log_probs, self.calibration or Calibration.identity(), rows=x,
                     **abstain_rule(self.model, self.cfg, density))
        names = np.asarray(self.schema.class_names)
        return pd.DataFrame({
            **{f"prob_{c}": out["probs"][:, k] for k, c in enumerate(names)},
            "predicted_class": names[out["probs"].argmax(1)],
            "predictive_entropy": out["entropy"],  # of the served probabilities (temperature-scaled samples)
            "expected_entropy": out["expected_entropy"],  # aleatoric: mean entropy of the scaled samples
            "mutual_information": out["mutual_info"],  # epistemic: predictive_entropy - expected_entropy
            "prediction_set": [names[row].tolist() for row in out["sets"]],
            "set_size": out["sets"].sum(1),
            "abstain": out["abstain"],
            **({"feature_density": density} if density is not None else {}),
        })


def new_sample_cache(megabytes: float):
    """A SampleCache of at most ``megabytes`` MiB, or None for 0 (draw on every call)."""
    from dl_uncertainty.uncertainty.draws import SampleCache

    return SampleCache(int(megabytes * 2**20)) if megabytes > 0 else None


def as_frame(model_input) -> pd.DataFrame:
    """A DataFrame as given, or one row per example from arrays and lists (images are flattened)."""
    if isinstance(model_input, pd.DataFrame):
        return model_input
    values = np.asarray(model_input, dtype=object)
    if values.ndim == 0 or len(values) == 0:
        raise UserError("the input holds no rows")
    return pd.DataFrame(values.reshape(len(values), -1))


def log_model(model: nn.Module, cfg: DictConfig, schema: Schema, example: pd.DataFrame,
              calibration=None) -> str:
    """Log the model as a self-contained pyfunc: weights, config, calibration and this package's
    code, no pickle. ``example``: a few raw input rows, which name the signature's columns."""
    package = Path(__file__).parents[1]  # the whole dl_uncertainty package travels with the model
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"calibration": calibration.to_dict()} if calibration else {}
        bundle = save_bundle(model, cfg, schema, Path(tmp) / "bundle", **extra)
        wrapper = UncertaintyModel()
        wrapper.load_context(SimpleNamespace(artifacts={"bundle": str(bundle)}))
        example = example.iloc[:5]
        with warnings.catch_warnings():  # "integer columns cannot hold missing values": set_size, an output
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            signature = mlflow.models.infer_signature(example, wrapper.predict(None, example))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(package / "pyfunc_model.py"),
            artifacts={"bundle": str(bundle)},
            code_paths=[str(package)],
            signature=signature,
            input_example=example,
            pip_requirements=PYFUNC_REQUIREMENTS,
        )
    return info.model_uri


def log_evaluation(evaluation, predictions_path: str | Path | None = None) -> None:
    """Metrics, figures, the HTML report and predictions.npz into the active run (``predictions_path``:
    also a copy there, so that the compressed file is written once)."""
    from dl_uncertainty.reports.evaluation import html, save_predictions
    from dl_uncertainty.reports.render import figure_png

    run_id = mlflow.active_run().info.run_id
    logged = mlflow.get_run(run_id).data.metrics
    # val_nll and val_acc also name the training curves: the evaluation's value goes one step after their
    # last epoch, so that the run's latest value is the evaluation's and the curve keeps its points
    again = {k: v for k, v in evaluation.metrics.items() if k in logged}
    mlflow.log_metrics({k: v for k, v in evaluation.metrics.items() if k not in again})
    client = mlflow.MlflowClient()
    for key, value in again.items():
        step = max((m.step for m in client.get_metric_history(run_id, key)), default=-1) + 1
        mlflow.log_metric(key, value, step=step)
    with tempfile.TemporaryDirectory() as tmp:  # figures drawn once, for the report and for MLflow
        for name, figure in evaluation.figures.items():
            (Path(tmp) / f"{name}.png").write_bytes(figure_png(figure))
        mlflow.log_artifacts(tmp, "figures")
    mlflow.log_text(html(evaluation), "reports/evaluation.html")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.npz"
        save_predictions(evaluation, path)
        mlflow.log_artifact(str(path), "predictions")
        if predictions_path is not None:
            shutil.copyfile(path, predictions_path)


def load_logged_model(run_id: str) -> UncertaintyModel:
    """The run's pyfunc wrapper, with ``.model``, ``.cfg`` and ``.schema`` rebuilt from its bundle."""
    try:
        return mlflow.pyfunc.load_model(f"runs:/{run_id}/model").unwrap_python_model()
    except MlflowException as err:
        raise UserError(f"no logged model for run {run_id}: {err.message.splitlines()[0]}") from None
