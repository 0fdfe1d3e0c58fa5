"""MLflow: where runs go, what they log, and the uncertainty-aware pyfunc model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
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

from .bundle import load_bundle, save_bundle
from .config import flatten
from .data import Schema
from .errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACT_DIR = "mlartifacts"
PYFUNC_REQUIREMENTS = ["torch>=2.3", "torchbnn>=1.2,<1.3", "numpy", "pandas", "omegaconf>=2.3,<2.4",
                       "hydra-core>=1.3.2,<1.4", "scikit-learn", "boto3"]


def absolute_sqlite(uri: str) -> str:
    """A relative ``sqlite:///file.db`` pinned to this folder: other processes may start elsewhere, and
    MLflow keeps one store per URI string, so a relative one would follow no later change of folder."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def tracking_uri(cfg: DictConfig | None = None) -> str:
    return absolute_sqlite((cfg and cfg.tracking_uri) or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a server is not there."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}); start it, "
            "or unset MLFLOW_TRACKING_URI to use the local sqlite:///mlflow.db"
        ) from None


@contextmanager
def serve_local_store(uri: str, timeout: float = 90.0):
    """An ``mlflow server`` on a local sqlite store, for clients that cannot open the file (containers).

    Yields ``(http_uri, artifact_dir)``: the server proxies artifacts into the folder beside the
    database, where local experiments keep theirs.
    """
    database = Path(uri.removeprefix("sqlite:///"))
    artifacts = database.parent / ARTIFACT_DIR
    artifacts.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", uri, "--artifacts-destination", str(artifacts)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        http = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(http, server, log, timeout)
            yield http, artifacts
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()


def _wait_healthy(http: str, server: subprocess.Popen, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            last = (log.read().decode(errors="replace").strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"the MLflow server on {http} exited at start-up: {last}")
        try:
            urllib.request.urlopen(f"{http}/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.3)
    raise UserError(f"the MLflow server did not answer at {http} within {timeout:.0f} s")


def setup(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and select (or create) the experiment."""
    uri = tracking_uri(cfg)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(cfg.experiment_name) is None:
            location = None
            if uri.startswith("sqlite:///"):  # keep local artifacts beside the local database
                database = Path(uri.removeprefix("sqlite:///")).resolve()
                location = (database.parent / ARTIFACT_DIR).as_uri()
            mlflow.create_experiment(cfg.experiment_name, artifact_location=location)
        mlflow.set_experiment(cfg.experiment_name)
    except MlflowException as err:
        raise UserError(f"MLflow at {uri}: {err.message.splitlines()[0]}") from None
    return uri


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


@contextmanager
def start_run(cfg: DictConfig):
    """A new run tagged with the model type, with the flattened config as params."""
    setup(cfg)
    with mlflow.start_run(run_name=cfg.model.name) as run:
        sha = git_sha()
        mlflow.set_tags({"model_type": cfg.model.name, **({"git_sha": sha} if sha else {})})
        mlflow.log_params(flatten(cfg))
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")  # stopped by the user, not a failure
            raise


class UncertaintyModel(mlflow.pyfunc.PythonModel):
    """predict(raw features) -> calibrated class probabilities, predicted class, predictive entropy,
    mutual information, the conformal prediction set and whether to abstain.

    Inputs are what the user's data holds (named columns, or rows of values in that order): the
    cleaning and scaling fitted on the training split are applied here. MC sampling is seeded, so
    the same inputs always get the same answer.
    """

    _skip_type_hint_validation = True  # predict takes DataFrames and arrays alike; raw_to_rows checks

    def load_context(self, context):
        from .calibration import Calibration

        self.model, self.cfg, self.schema, meta = load_bundle(context.artifacts["bundle"])
        self.calibration = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None

    def predict(self, context, model_input, params=None):
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from .data import raw_to_rows

        try:
            x = raw_to_rows(as_frame(model_input), self.schema)
        except UserError as err:
            raise MlflowException(str(err), INVALID_PARAMETER_VALUE) from None
        return self.predict_rows(x)

    def predict_rows(self, x: np.ndarray) -> pd.DataFrame:
        """The same answer for rows that are already cleaned and scaled (as the split files hold them)."""
        from .calibration import Calibration, decide
        from .predict import predict_log_probs

        e = self.cfg.evaluate
        log_probs = predict_log_probs(self.model, x, e.mc_samples, strategy=e.strategy,
                                      batch_size=e.batch_size, seed=self.cfg.seed).numpy()
        out = decide(log_probs, self.calibration or Calibration.identity())
        names = np.asarray(self.schema.class_names)
        return pd.DataFrame({
            **{f"prob_{c}": out["probs"][:, k] for k, c in enumerate(names)},
            "predicted_class": names[out["probs"].argmax(1)],
            "predictive_entropy": out["entropy"],
            "mutual_information": out["mutual_info"],
            "prediction_set": [names[row].tolist() for row in out["sets"]],
            "set_size": out["sets"].sum(1),
            "abstain": out["abstain"],
        })


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
    package = Path(__file__).parent
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


def log_evaluation(evaluation) -> None:
    """Metrics, figures, the HTML report and predictions.npz into the active run."""
    from .evaluation import html, save_predictions
    from .report import figure_png

    mlflow.log_metrics(evaluation.metrics)
    with tempfile.TemporaryDirectory() as tmp:  # figures drawn once, for the report and for MLflow
        for name, figure in evaluation.figures.items():
            (Path(tmp) / f"{name}.png").write_bytes(figure_png(figure))
        mlflow.log_artifacts(tmp, "figures")
    mlflow.log_text(html(evaluation), "reports/evaluation.html")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.npz"
        save_predictions(evaluation, path)
        mlflow.log_artifact(str(path), "predictions")


def load_logged_model(run_id: str) -> UncertaintyModel:
    """The run's pyfunc wrapper, with ``.model``, ``.cfg`` and ``.schema`` rebuilt from its bundle."""
    try:
        return mlflow.pyfunc.load_model(f"runs:/{run_id}/model").unwrap_python_model()
    except MlflowException as err:
        raise UserError(f"no logged model for run {run_id}: {err.message.splitlines()[0]}") from None
