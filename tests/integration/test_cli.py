"""The command lines, in fresh processes: the happy path and one clear line for each bad input."""

import re

import mlflow
import pytest

from tests.conftest import TINY, free_port, run_module


def _one_line_error(proc) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("setup", "args", "needle"),
    [
        (None, ["data=csv", "data.path=missing.csv"], "not found"),
        ("", ["data=csv", "data.path=t.csv"], "empty"),
        ("a,b,label\n1,x,0\n2,y,1\n", ["data=csv", "data.path=t.csv"], "not numeric"),
        ("a,b\n1,2\n", ["data=csv", "data.path=t.csv"], "label column"),
        (None, ["model=transformer"], "model/transformer"),
        (None, ["evaluate.mc_samples=0"], "mc_samples"),
    ],
)
def test_bad_input_gives_one_clear_line_and_a_non_zero_exit(tmp_path, setup, args, needle):
    if setup is not None:
        (tmp_path / "t.csv").write_text(setup)
    proc = run_module("dl_uncertainty.train", *args, cwd=tmp_path, timeout=120)
    assert needle in _one_line_error(proc)
    assert not (tmp_path / "mlflow.db").exists() or needle == "not found"


def test_unreachable_mlflow_server_fails_fast_with_one_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    proc = run_module("dl_uncertainty.train", *TINY, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert "cannot reach the MLflow tracking server" in _one_line_error(proc)


def test_evaluate_without_run_id_says_how(tmp_path):
    proc = run_module("dl_uncertainty.evaluate", cwd=tmp_path)
    assert "run_id=" in _one_line_error(proc)


def test_multirun_trains_both_models_then_evaluate_logs_to_the_same_run(tmp_path):
    proc = run_module("dl_uncertainty.train", "--multirun", "model=bnn,mc_dropout_dnn", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_ids = re.findall(r"run ([0-9a-f]{32})", proc.stdout)
    assert len(run_ids) == 2
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlartifacts").is_dir()

    evaluated = run_module("dl_uncertainty.evaluate", f"run_id={run_ids[0]}", "evaluate.mc_samples=5", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "test_accuracy" in evaluated.stdout
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    metrics = client.get_run(run_ids[0]).data.metrics
    assert 0.5 < metrics["test_accuracy"] <= 1
    assert metrics["avg_test_uncertainty"] > 0
    artifacts = {a.path for a in client.list_artifacts(run_ids[0], "reports")}
    assert "reports/evaluation.html" in artifacts
