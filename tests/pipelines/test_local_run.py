"""The whole pipeline under kfp.local against a real MLflow server; and a failing task."""

import logging
import re

import mlflow
import pytest
from kfp import dsl

from dl_uncertainty.errors import UserError
from pipelines.local import run_local
from tests.conftest import LOOSE_GATE, REPO, TINY, run_module


def test_whole_pipeline_runs_locally_and_lands_in_mlflow(mlflow_server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    root_logger = logging.getLogger()
    before = root_logger.level, root_logger.handlers[:]
    run_dir = run_local([*TINY, *LOOSE_GATE, "train.epochs=2", "experiment_name=pipeline-test",
                         "pipeline.models=[bnn,mc_dropout_dnn]"], tmp_path / "out")
    assert (root_logger.level, root_logger.handlers) == before  # kfp's per-task logger swaps leave no trace

    captured = capsys.readouterr()
    printed = captured.out
    assert "# Model comparison" in printed and "Winner:" in printed
    assert len((captured.out + captured.err).splitlines()) < 60  # one line per task, not every task's log
    # each branch trains and evaluates in one task: one process start-up per branch, not two
    for task in ("configure", "preprocess", "train-evaluate bnn", "train-evaluate mc_dropout_dnn", "compare"):
        assert re.search(rf"^  done  {task} +\d+\.\d s$", printed, re.M), task
    assert "epoch   1/2" not in printed and "Got executor_input" not in printed
    for name in ("compare", "preprocess", "evaluate-bnn", "evaluate-mc_dropout_dnn"):
        page = (run_dir / "reports" / f"{name}.html").read_text()
        assert "<img" in page and name in printed

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("pipeline-test")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["model_type"] for r in runs) == ["bnn", "mc_dropout_dnn"]
    for run in runs:
        assert {"test_accuracy", "avg_test_uncertainty", "ece", "auroc_entropy"} <= set(run.data.metrics)
        history = client.get_metric_history(run.info.run_id, "val_nll")  # 2 epochs, then the evaluation's
        assert len(history) == 3 and max(history, key=lambda m: m.step).value == run.data.metrics["val_nll"]
        assert {"val_ece_ts", "val_coverage", "val_auroc_entropy"} <= set(run.data.metrics)
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert "figures/reliability.png" in figures and "figures/training_curves.png" in figures
    champion = client.get_model_version_by_alias("dl-uncertainty-digits-1x8x8", "champion")
    best = min(runs, key=lambda r: r.data.metrics["val_nll"])  # chosen on validation, not test
    assert champion.run_id == best.info.run_id


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_failing_task_fails_the_run_naming_the_task_and_nothing_after_it_runs(tmp_path, monkeypatch, capsys,
                                                                                 verbose):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    table = tmp_path / "t.csv"  # readable, but every row misses a value and data.missing=drop: preprocess fails
    table.write_text("a,b,label\n" + "".join(f"{i},,{i % 2}\n" if i % 2 else f",{i},{i % 2}\n" for i in range(40)))
    with pytest.raises(UserError, match="preprocess") as info:
        run_local([*TINY, "data=csv", f"data.path={table}", "data.missing=drop"], tmp_path / "out", verbose=verbose)
    assert "\n" not in str(info.value)
    assert "Cause: every row of" in str(info.value) and "data.missing=drop leaves none" in str(info.value)
    printed = capsys.readouterr().out
    assert "data.missing=drop leaves none" in printed  # and the task's own log
    # verbose: every task's whole log as it comes (the executor input too), no one-line summaries
    assert ("Got executor_input" in printed and "  done  " not in printed) is verbose
    run_dir = next((tmp_path / "out").glob("uncertainty-pipeline-*"))
    assert not list(run_dir.rglob("model.pt")) and not list(run_dir.rglob("predictions"))


@pytest.mark.parametrize(("table", "overrides", "cause"), [
    (None, [], "data file not found: t.csv"),
    ("a,label\n" + "1,0\ninf,1\n" * 20, [], "t.csv has 20 infinite values (column 'a' has 20); fix the data or "
                                               "set data.non_finite=drop or data.non_finite=as_missing"),
    ("a,label\n" + "1,0\n2,1\n" * 20, ["data.ood_classes=[7]"], "data.ood_classes ['7'] are not labels in the data"),
    ("a,label\n" + "1,0\n2,1\n" * 20, ["data.ood_classes=[1]"], "data.ood_classes=['1'] leaves 1 class to train on, "
     "and a classifier needs at least two classes besides data.ood_classes, found: 0 (20 rows), 1 (20 rows); "
     "hold out fewer classes"),
    ("a,label\n" + "1,0\n" * 20, [], "the data needs at least two classes, found: 0 (20 rows); check "
     "data.label_column (or the class sub-folders), or add rows of another class"),
    ("a,label\n" + "".join(f"{i},{i}\n" for i in range(20)), [], "every label occurs once (20 rows, 20 classes), so "
     "no split can hold rows of the same class; check that data.label_column is the label, or add rows"),
    ("a,label\n" + "".join(f"{i},{i % 5}\n" for i in range(10)), [], "data.test_fraction=0.2 gives the test split 2 "
     "of 10 rows, fewer than the 5 classes it must hold one row of; raise data.test_fraction or add rows"),
])
def test_bad_data_fails_before_any_task_starts(tmp_path, table, overrides, cause):
    if table:
        (tmp_path / "t.csv").write_text(table)
    proc = run_module("pipelines", "run-local", *TINY, "data=csv", "data.path=t.csv", *overrides,
                      "--pipeline-root", "out", cwd=tmp_path, env={"PYTHONPATH": f"{REPO / 'src'}:{REPO}"},
                      timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [f"error: {cause}"]
    assert proc.stdout == ""  # no task started
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_unwritable_pipeline_root_fails_before_any_task_starts(tmp_path):
    (tmp_path / "file").write_text("")
    proc = run_module("pipelines", "run-local", *TINY, "--pipeline-root", "file/out", cwd=tmp_path,
                      env={"PYTHONPATH": f"{REPO / 'src'}:{REPO}",
                           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                      timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        f"error: cannot write to {tmp_path / 'file' / 'out'} (Not a directory); set --pipeline-root to a writable folder"]
    assert not (tmp_path / "mlflow.db").exists()


def test_quiet_log_keeps_the_task_logs_minus_the_executor_input_json_for_a_failure():
    import io

    from pipelines.local import _Tee

    out = io.StringIO()
    tee = _Tee(out)
    for chunk in ["    [KFP] Got executor_input:\n", "    {\n", '        "a": {\n', "        }\n", "    }\n",
                  "    epoch 1 ", "done\n", "    Traceback (most recent call last):\n", '      File "x.py", line 1\n',
                  "        f()\n", "        ^^^\n", "    ValueError: bad thing\n"]:
        tee.write(chunk)
    tee.flush()
    assert out.getvalue() == ""
    tee.show_log_end()  # no JSON, no traceback frames: the log lines and the error
    assert out.getvalue().splitlines()[1:] == ["    epoch 1 done", "    ValueError: bad thing"]
    assert tee.cause() == "Cause: bad thing. "
    verbose = io.StringIO()
    loud = _Tee(verbose, verbose=True)
    loud.write("Got executor_input:\n{\n}\n")
    assert verbose.getvalue() == "Got executor_input:\n{\n}\n"


def test_task_times_come_from_each_tasks_own_start_and_finish_lines():
    import io

    from pipelines.local import _Tee

    out = io.StringIO()
    tee = _Tee(out, labels=["bnn", "mc_dropout_dnn"])
    for path in ("/r/run/configure", "/r/run/for-loop-1-iteration-1/train", "/r/run/for-loop-1-iteration-0/train"):
        tee.write(f'    "outputFile": "{path}/executor_output.json"\n')
    tee.write("Wrote executor output file to /r/run/for-loop-1-iteration-0/train/executor_output.json.\n")
    tee.write("Wrote executor output file to /r/run/configure/executor_output.json.\n")
    times = tee.task_times()
    assert list(times) == ["configure", "train"]  # iteration 1 never finished: no time for it
    assert [label for label, _ in times["train"]] == ["bnn"] and times["configure"][0][0] == ""
    assert all(seconds >= 0 for entries in times.values() for _, seconds in entries)
    assert [line.split()[:3] for line in out.getvalue().splitlines()] == [["done", "train", "bnn"],
                                                                          ["done", "configure", "0.0"]]


def test_docker_runner_without_an_engine_is_one_line(tmp_path):
    from tests.conftest import REPO, run_module

    out = run_module("pipelines", "run-local", "--runner", "docker", *TINY, cwd=tmp_path,
                     env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert f"no container engine answers at unix://{tmp_path}/no-engine.sock" in out.stderr
    assert "podman system service" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("from_stack", [False, True])
def test_docker_runner_with_the_stack_down_is_one_line(tmp_path, from_stack):
    from tests.conftest import REPO, free_port, run_module

    uri = f"http://127.0.0.1:{free_port()}"
    stack = {"DLU_STACK_MLFLOW": uri} if from_stack else {}  # what `make stack-up`'s .stack/env adds
    out = run_module("pipelines", "run-local", "--runner", "docker", *TINY, cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": f"{REPO}:{REPO / 'src'}", **stack})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    if from_stack:  # unsetting MLFLOW_TRACKING_URI would not help: make sources .stack/env again
        assert f"the local stack's MLflow at {uri} is not running" in out.stderr
        assert "`make stack-up`" in out.stderr and "`make stack-down`" in out.stderr
    else:
        assert f"cannot reach the MLflow tracking server at {uri}" in out.stderr
        assert "make stack-up" not in out.stderr


def test_container_logs_are_printed_in_whole_lines():
    from pipelines.containers import whole_lines

    log, printed, seen = b"", 0, []
    for chunk in (b"epoch 1 do", b"ne\nValueError: ba", b"d thing\nno newline"):
        log += chunk
        text, printed = whole_lines(log, printed)
        seen.append(text)
    assert seen == ["", "epoch 1 done\n", "ValueError: bad thing\n"]
    assert whole_lines(log, printed, final=True) == ("no newline", len(log))


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def _stamp(item: int, span: dsl.Output[dsl.Artifact]):
    import time

    start = time.time()
    time.sleep(4)
    with open(span.path, "w") as fh:
        fh.write(f"{start} {time.time()}")


def test_every_branch_of_a_parallel_for_runs_at_once(tmp_path):
    """kfp.local alone runs two iterations at a time; a third model's branch would wait for a slot."""
    from kfp import local

    from pipelines.local import _branches_at_once

    @dsl.pipeline(name="fan-out")
    def fan_out():
        with dsl.ParallelFor([0, 1, 2]) as item:
            _stamp(item=item).set_caching_options(False)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    root_logger = logging.getLogger()
    before = root_logger.level, root_logger.handlers[:]
    with _branches_at_once(3):
        fan_out()
    assert (root_logger.level, root_logger.handlers) == before  # kfp swaps them per task, unlocked
    spans = [tuple(map(float, path.read_text().split())) for path in tmp_path.rglob("span")]
    assert len(spans) == 3
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # all three ran at the same time


def test_ctrl_c_during_run_local_is_one_line_exit_130_and_stops_the_tasks(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from pipelines.__main__ import _descendants

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"PYTHONPATH": f"{REPO / 'src'}:{REPO}", "PYTHONUNBUFFERED": "1"}
    # a shell's background job ignores SIGINT, and Python then installs no Ctrl-C handler: restore it
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "run-local", *TINY, "train.epochs=100000",
                             "--pipeline-root", "out"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    printed = []
    while not any("done  preprocess" in ln for ln in printed) and proc.poll() is None:
        printed.append(proc.stdout.readline())
    tasks = []
    while not tasks and proc.poll() is None:  # the training tasks have started
        tasks = _descendants(proc.pid)
    proc.send_signal(signal.SIGINT)  # to the launcher only, not to its tasks
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = [ln for ln in stderr.splitlines() if ln.strip() and " INFO mlflow." not in ln]  # a new mlflow.db
    assert lines == ["error: interrupted"], stderr
    assert tasks and not [pid for pid in tasks if os.path.exists(f"/proc/{pid}")
                          and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
