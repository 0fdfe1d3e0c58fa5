"""`make stack-up`'s script for real: PostgreSQL, moto's S3 and MLflow started with the cluster's
own launcher; a run logged through it lands in PostgreSQL and its artifacts in the S3 bucket.

Needs PostgreSQL's server programs (Debian: postgresql). Without them the tests are skipped, unless
DLU_REQUIRE_STACK=1 (CI sets it), which makes their absence a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import mlflow
import pytest

from tests.conftest import REPO, free_port, run_module

SCRIPT = REPO / "k8s" / "scripts" / "local-stack.sh"


def _have_postgres() -> bool:
    return bool(list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))) or bool(shutil.which("initdb"))


if not _have_postgres():
    if os.environ.get("DLU_REQUIRE_STACK") == "1":
        pytest.fail("PostgreSQL server programs not found: apt-get install postgresql", pytrace=False)
    pytest.skip("PostgreSQL server programs not installed (apt-get install postgresql)", allow_module_level=True)


def _stack(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), command], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    env = {"STACK_DIR": str(tmp_path_factory.mktemp("stack") / "state"), "VENV": str(Path(sys.executable).parents[1]),
           "STACK_MLFLOW_PORT": str(free_port()), "STACK_S3_PORT": str(free_port()),
           "STACK_PG_PORT": str(free_port())}
    up = _stack("up", env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        values = dict(re.findall(r"^export (\w+)=(.*)$", (Path(env["STACK_DIR"]) / "env").read_text(), re.M))
        yield env, values
    finally:
        _stack("down", env)


def test_a_run_lands_in_postgres_and_its_artifacts_in_s3(stack, tmp_path, monkeypatch):
    env, values = stack
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    client = mlflow.MlflowClient(values["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment("stack-test")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "nll", 0.25)
    (tmp_path / "note.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"), "notes")

    s3 = boto3.client("s3", endpoint_url=values["AWS_ENDPOINT_URL"])
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == {"mlpipeline", "mlflow", "datasets"}
    key = f"{experiment_id}/{run.info.run_id}/artifacts/notes/note.txt"
    assert s3.get_object(Bucket="mlflow", Key=key)["Body"].read() == b"hello"

    # The metric is in PostgreSQL, as user "mlflow" with the stack's password.
    password = re.search(r"^PG_PASSWORD=(\w+)$", (Path(env["STACK_DIR"]) / "secrets").read_text(), re.M)[1]
    query = subprocess.run(["psql", "-h", "127.0.0.1", "-p", env["STACK_PG_PORT"], "-U", "mlflow", "-d", "mlflow",
                            "-tAc", f"SELECT value FROM metrics WHERE run_uuid = '{run.info.run_id}'"],
                           env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True)
    assert query.returncode == 0, query.stderr
    assert float(query.stdout.strip()) == 0.25


def test_a_sweep_shares_its_study_through_the_stacks_postgres(stack, tmp_path):
    """Optuna's database comes from k8s/dlu/10-optuna.sh, the script the cluster's PostgreSQL runs."""
    import optuna

    from dl_uncertainty.config.schema import config_dir

    _, values = stack
    assert values["DLU_TUNE_STORAGE"].startswith("postgresql+psycopg2://optuna:")
    shutil.copytree(config_dir(), tmp_path / "configs")  # configs/tuned/ is written there
    out = run_module("dl_uncertainty.tune", "model=mc_dropout_dnn", "tune.n_trials=2", "train.epochs=2",
                     "train.early_stopping_patience=0", "train.val_mc_samples=3", "experiment_name=stack-tune",
                     cwd=tmp_path, env={**values, "DLU_CONFIG_DIR": str(tmp_path / "configs")}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    studies = optuna.get_all_study_summaries(storage=values["DLU_TUNE_STORAGE"])
    assert [s.n_trials for s in studies] == [2]
    assert (tmp_path / "configs" / "tuned" / "mc_dropout_dnn.yaml").is_file()


def test_up_again_is_a_no_op_and_status_says_running(stack):
    env, values = stack
    again = _stack("up", env)
    assert again.returncode == 0 and values["MLFLOW_TRACKING_URI"] in again.stdout
    status = _stack("status", env)
    assert status.returncode == 0
    assert all(f"{name} running" in status.stdout for name in ("mlflow", "s3", "postgres"))
    assert status.stdout.splitlines()[-1] == "stack: up"


def test_make_stack_status_with_the_stack_down_says_so_and_is_no_error(tmp_path):
    """A query, not a check: `make stack-status` exits 0, without make's "*** Error" line."""
    env = {**os.environ, "STACK_DIR": str(tmp_path / "never-started"), "STACK_PG_PORT": str(free_port())}
    env.pop("MAKEFLAGS", None)
    out = subprocess.run(["make", "--no-print-directory", "stack-status"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.splitlines() == ["stack: mlflow not running", "stack: s3 not running", "stack: postgres not running",
                                       "stack: down (`make stack-up` starts it)"]


def test_a_busy_port_is_one_line_naming_the_setting_and_nothing_stays_running(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {"STACK_DIR": str(tmp_path / "state"), "VENV": str(Path(sys.executable).parents[1]),
               "STACK_MLFLOW_PORT": str(busy.getsockname()[1]), "STACK_S3_PORT": str(free_port()),
               "STACK_PG_PORT": str(free_port())}
        out = _stack("up", env)  # PostgreSQL and S3 start before MLflow's port is checked
    assert out.returncode != 0
    assert out.stderr.strip() == (f"stack: error: port {env['STACK_MLFLOW_PORT']} is in use; "
                                  "set STACK_MLFLOW_PORT to a free one")
    assert not (tmp_path / "state").exists()  # the failed up stopped what it had started
    for port in (env["STACK_S3_PORT"], env["STACK_PG_PORT"]):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=2)


def test_down_stops_everything_and_deletes_the_state(tmp_path):
    env = {"STACK_DIR": str(tmp_path / "state"), "VENV": str(Path(sys.executable).parents[1]),
           "STACK_MLFLOW_PORT": str(free_port()), "STACK_S3_PORT": str(free_port()), "STACK_PG_PORT": str(free_port())}
    assert _stack("up", env).returncode == 0
    uri = f"http://127.0.0.1:{env['STACK_MLFLOW_PORT']}"
    stale = (tmp_path / "state" / "env").read_text()
    assert _stack("down", env).returncode == 0
    assert not (tmp_path / "state").exists()
    # a .stack/env left behind (the stack down after a reboot): `make run` sources it and says what to do
    (tmp_path / "stale-env").write_text(stale)
    run = subprocess.run(["bash", "-c", f"source {tmp_path / 'stale-env'} && exec {sys.executable} -m pipelines "
                          "run-local --runner docker"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (REPO, REPO / "src")))})
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"the local stack's MLflow at {uri} is not running" in run.stderr and "`make stack-up`" in run.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(env["STACK_MLFLOW_PORT"])), timeout=2)
    status = _stack("status", env)
    assert status.returncode == 0 and "stack: down" in status.stdout and "mlflow not running" in status.stdout and uri not in status.stdout
