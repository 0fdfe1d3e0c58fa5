"""Where MLflow runs go: the tracking URI, whether its server answers, the experiment, and a server
for a local store.

MLflow is imported only where it is used: a command that only needs to know where runs go starts in a
fraction of a second, and one that only logs never loads torch through the pyfunc model.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from dl_uncertainty.errors import UserError, check_writable

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACT_DIR = "mlartifacts"
# MLflow 3's UI opens an experiment on its GenAI (traces) view unless the experiment says it is classic ML
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
TUNED_STUDY_TAG = "dlu.tuned_study"  # on a training run: the Optuna study its config is the best trial of


def absolute_sqlite(uri: str) -> str:
    """A relative ``sqlite:///file.db`` pinned to this folder: other processes may start elsewhere, and
    MLflow keeps one store per URI string, so a relative one would follow no later change of folder."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def tracking_uri(cfg: DictConfig | None = None) -> str:
    return absolute_sqlite((cfg and cfg.tracking_uri) or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)


def new_local_store(uri: str) -> bool:
    """A sqlite store whose file does not exist yet: MLflow creates its tables on first use."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()


def check_local_store(uri: str) -> None:
    """A sqlite store's folder, its file and the artifact folder beside it must be writable: MLflow
    would otherwise fail only when it first writes there, after the work (a whole training)."""
    if not uri.startswith("sqlite:///"):
        return
    database = Path(uri.removeprefix("sqlite:///"))
    fix = "set MLFLOW_TRACKING_URI (or tracking_uri) to sqlite:///<a writable folder>/mlflow.db"
    check_writable(database.parent, "", fix)
    if database.exists() and not os.access(database, os.W_OK):
        raise UserError(f"cannot write to {database} (read-only); {fix}")
    check_writable(database.parent / ARTIFACT_DIR, "", f"make it writable, or {fix}")


def check_artifact_folder(location: str | None) -> None:
    """An experiment's artifacts in a local folder: it must be writable before any work."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(location or "")
    if parsed.scheme in ("file", "") and parsed.path:
        check_writable(unquote(parsed.path), "", "make it writable, or set experiment_name to a new experiment")


def setup(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and select (or create) the experiment."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    check_reachable(uri)
    check_local_store(uri)
    mlflow.set_tracking_uri(uri)
    # Asynchronous metrics (per-epoch curves) go out in batches every second; unbuffered, the
    # logger polls its queue with a 1 s timeout, and the end of a run waits that out
    os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
    try:
        if mlflow.get_experiment_by_name(cfg.experiment_name) is None:
            location = None
            if uri.startswith("sqlite:///"):  # keep local artifacts beside the local database
                database = Path(uri.removeprefix("sqlite:///")).resolve()
                location = (database.parent / ARTIFACT_DIR).as_uri()
            try:
                mlflow.create_experiment(cfg.experiment_name, artifact_location=location, tags={KIND_TAG: KIND})
            except MlflowException as err:  # parallel tasks: another one created it first
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        experiment = mlflow.set_experiment(cfg.experiment_name)
        if KIND_TAG not in experiment.tags:  # created before this tag was set, or by someone else
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
    except MlflowException as err:
        raise UserError(f"MLflow at {uri}: {err.message.splitlines()[0]}") from None
    check_artifact_folder(experiment.artifact_location)
    return uri


def runs_url(base: str, uri: str = DEFAULT_URI, experiment_name: str = "dl-uncertainty") -> str:
    """The UI's runs view of a local store's experiment (its id read from the sqlite file, no MLflow
    import); ``workflowType=machine_learning`` keeps the UI off its GenAI view."""
    import sqlite3

    query = "?workflowType=machine_learning"
    database = Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("sqlite:///") and database.is_file():
        try:
            with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True) as con:
                row = con.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                                  (experiment_name,)).fetchone()
        except sqlite3.Error:
            row = None
        if row:
            return f"{base}/#/experiments/{row[0]}/runs{query}"
    return f"{base}/#/experiments{query}"


# what MLflow can track to (a bare path is a file store); a driver may follow a "+": postgresql+psycopg2
KNOWN_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def check_sqlite_file(uri: str) -> None:
    """A sqlite store's file must be a sqlite database (or not exist yet, or be empty): MLflow
    would otherwise fail with SQLAlchemy's traceback."""
    import sqlite3

    database = Path(uri.removeprefix("sqlite:///"))
    if database.is_dir():
        raise UserError(f"{database} is a folder, not a sqlite database; set MLFLOW_TRACKING_URI (or tracking_uri) "
                        "to sqlite:///<folder>/mlflow.db")
    if not database.is_file() or database.stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True) as con:
            con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error as err:
        raise UserError(f"{database} is not an MLflow sqlite database ({err}); point MLFLOW_TRACKING_URI "
                        "(or tracking_uri) at another file, or move this one away") from None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a server is not there; and in one
    line when the URI names no store MLflow can use."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme.split("+")[0].lower()
    if len(scheme) > 1 and scheme not in KNOWN_SCHEMES:  # one letter: a Windows drive
        raise UserError(f"tracking URI {uri} has a scheme MLflow cannot track to ({scheme}:); use "
                        "sqlite:///mlflow.db, http(s)://<server>:<port>, postgresql://... or a folder")
    if scheme == "sqlite" and uri.startswith("sqlite:///"):
        check_sqlite_file(uri)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if uri == os.environ.get("DLU_STACK_MLFLOW"):  # set by `make stack-up`'s .stack/env
            raise UserError(
                f"the local stack's MLflow at {uri} is not running ({reason}): start the stack with "
                "`make stack-up`, or run `make stack-down` to go back to the local sqlite:///mlflow.db "
                "(and unset MLFLOW_TRACKING_URI where you sourced .stack/env)"
            ) from None
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
