"""The command lines, in fresh processes: the happy path and one clear line for each bad input."""

import os
import re
import signal
import subprocess
import sys

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


def _csv(n=40, features=2) -> str:
    header = ",".join([*(f"f{j}" for j in range(features)), "label"])
    return header + "\n" + "".join(",".join([*(str((i * (j + 3)) % 7) for j in range(features)), str(i % 2)]) + "\n"
                                   for i in range(n))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("température,label\n".encode("latin-1") + b"1,0\n" * 20, "t.csv is not utf-8 text"),
        (b"PK\x03\x04\x00\x00\xff\xfe" * 50, "binary file, not a CSV"),
        (_csv().replace("\n3,", "\ninf,", 1).encode(), "1 infinite values (column 'f0' has 1)"),
        (b"a,label,label\n" + b"1,0,0\n2,1,1\n" * 10, "duplicated column names ['label']"),
        (_csv().replace(",1\n", ",\n", 3).encode(), "3 rows of t.csv have a blank 'label'"),
    ],
)
def test_bad_csv_gives_one_line_and_writes_no_split(tmp_path, content, needle):
    (tmp_path / "t.csv").write_bytes(content)
    proc = run_module("dl_uncertainty.preprocess", "data=csv", "data.path=t.csv", "data_dir=out", cwd=tmp_path, timeout=120)
    assert needle in _one_line_error(proc)
    assert not any((tmp_path / "out").glob("*"))


def test_unwritable_output_and_checkpoint_folders_fail_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    proc = run_module("dl_uncertainty.preprocess", "data_dir=file/out", cwd=tmp_path, timeout=120)
    assert "cannot write to file/out" in _one_line_error(proc) and "data_dir" in proc.stderr
    proc = run_module("dl_uncertainty.train", *TINY, "train.checkpoint_dir=file/ck", cwd=tmp_path, timeout=120)
    assert "set train.checkpoint_dir" in _one_line_error(proc)
    assert not (tmp_path / "mlflow.db").exists()


def test_unwritable_mlflow_artifact_folder_fails_before_training(tmp_path):
    (tmp_path / "mlartifacts").write_text("")  # a file where the runs' artifacts would go
    proc = run_module("dl_uncertainty.train", *TINY, cwd=tmp_path, timeout=120)
    assert "cannot write to" in _one_line_error(proc) and "mlartifacts" in proc.stderr
    assert "epoch" not in proc.stdout


def test_ctrl_c_ends_the_run_killed_and_resuming_on_other_data_is_one_line(tmp_path):
    import torch

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONUNBUFFERED": "1"}
    args = [*TINY, "train.epochs=500", "train.checkpoint_dir=ck"]  # the default checkpoint_every_s (10 s)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "last.pt").write_bytes(b"an earlier run's checkpoint")  # never this run's
    # a shell's background job ignores SIGINT, and Python then installs no Ctrl-C handler: restore it
    proc = subprocess.Popen([sys.executable, "-m", "dl_uncertainty.train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    printed = []
    while not any("epoch   3/500" in ln for ln in printed) and proc.poll() is None:  # epochs 1-2 done, < 10 s
        printed.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    stderr = "\n".join(ln for ln in stderr.splitlines() if " INFO mlflow." not in ln)  # a new mlflow.db says so
    line = _one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert proc.returncode == 130
    epoch = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["epoch"]
    assert epoch >= 2
    assert (f"interrupted; epoch {epoch}'s checkpoint is at {os.path.join('ck', 'last.pt')}; "
            "resume with train.resume=true") in line
    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["0", "1"])
    assert [r.info.status for r in runs] == ["KILLED"]

    (tmp_path / "t.csv").write_text(_csv(features=3))
    other = run_module("dl_uncertainty.train", *args, "train.resume=true", "data=csv", "data.path=t.csv", "data.calib_fraction=0.3",
                       cwd=tmp_path, timeout=120)
    refused = _one_line_error(other)
    assert "was written for data with features" in refused and "this data has [3]" in refused
    assert [r.info.status for r in mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        ["0", "1"])] == ["KILLED"]  # the refused resume left the interrupted run as it was
