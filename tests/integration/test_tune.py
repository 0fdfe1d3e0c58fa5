"""Sweeps end to end: a real Optuna study in SQLite, trials as nested runs in a real MLflow store,
the best config re-trained in a fresh process, pruning, several objectives, and bad input."""

import re
import shutil

import mlflow
import optuna
import pytest

from dl_uncertainty.config.schema import config_dir
from dl_uncertainty.errors import UserError
from dl_uncertainty.reports.sweep import finish, save_tuned
from dl_uncertainty.training.tuning import begin, compose, work
from dl_uncertainty.tune import tune
from tests.conftest import free_port, run_module

FAST = ["train.epochs=4", "train.early_stopping_patience=0", "train.val_mc_samples=3", "experiment_name=tune-test"]


def _one_line_error(proc) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "needle"), [
    (["train.lr=interval(0.01, 0.01)"], "train.lr=interval(0.01, 0.01): empty range"),
    (["train.lr=interval(0.1, 0.001)"], "train.lr=interval(0.1, 0.001): inverted range"),
    (["train.lrr=interval(0.001, 0.1)"], "'train.lrr' is not a data.*, model.* or train.* config key"),
    (["tune.n_trials=0"], "tune.n_trials must be >= 1, got 0"),
    (["model=mc_dropout_dnn", "~tune.space.mc_dropout_dnn"],
     "tune.space.mc_dropout_dnn is empty: nothing to tune for model mc_dropout_dnn"),
    (["model=mc_dropout_dnn", "~tune.space.mc_dropout_dnn", "train.lr=0.001"], "tune.space.mc_dropout_dnn is empty"),
    (["tune.storage=sqlite:////no/such/folder/optuna.db"], "cannot open the Optuna storage sqlite:////no/such"),
    ([f"tune.storage=postgresql+psycopg2://optuna:secret@127.0.0.1:{free_port()}/optuna"],
     "cannot open the Optuna storage postgresql+psycopg2://optuna:***@127.0.0.1"),
])
def test_bad_input_gives_one_clear_line(tmp_path, args, needle):
    proc = run_module("dl_uncertainty.tune", *args, cwd=tmp_path, timeout=120)
    line = _one_line_error(proc)
    assert needle in line and "secret" not in line
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


@pytest.fixture()
def own_configs(in_tmp, monkeypatch):
    """A copy of configs/ to write configs/tuned/ into (the checkout's stays untouched)."""
    shutil.copytree(config_dir(), in_tmp / "configs")
    monkeypatch.setenv("DLU_CONFIG_DIR", str(in_tmp / "configs"))
    return in_tmp / "configs"


def test_a_sweep_logs_nested_runs_and_its_best_config_retrains_to_the_same_nll(in_tmp, own_configs, capsys):
    cfg = compose(["model=mc_dropout_dnn", *FAST, "tune.n_trials=4"])
    summary = tune(cfg)
    printed = capsys.readouterr().out
    assert re.search(r"trial 3 \[4/4\]  val_nll \d\.\d{4}  best \d\.\d{4} \(trial \d\)", printed)

    study = optuna.load_study(study_name=summary.study_name, storage="sqlite:///optuna.db")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert study.trials[0].user_attrs["baseline"] and study.trials[0].params["train.lr"] == cfg.train.lr
    assert summary.best["val_nll"] == study.best_value <= summary.baseline["val_nll"]

    client = mlflow.MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tune-test")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.sweep = 'parent'")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == [0, 1, 2, 3]
    assert all(len(client.get_metric_history(r.info.run_id, "val_nll")) == 4 for r in children)
    assert parent.data.metrics["best_val_nll"] == pytest.approx(study.best_value)
    artifacts = {a.path for folder in ("figures", "reports", "tuned")
                 for a in client.list_artifacts(parent.info.run_id, folder)}
    assert {"figures/optimization_history.png", "figures/param_importances.png", "reports/sweep.html",
            "tuned/mc_dropout_dnn.yaml"} <= artifacts
    assert set(summary.importances["val_nll"]) == set(study.best_params)
    assert summary.html.count("data:image/png;base64,") == 2

    written = (own_configs / "tuned" / "mc_dropout_dnn.yaml").read_text()
    assert written.startswith("# @package _global_\n") and "override /model: mc_dropout_dnn" in written
    assert "python -m dl_uncertainty.train +tuned=mc_dropout_dnn" in printed
    proc = run_module("dl_uncertainty.train", "+tuned=mc_dropout_dnn", "experiment_name=retrain", cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr
    run_id = re.search(r"run ([0-9a-f]{32})", proc.stdout).group(1)
    assert client.get_run(run_id).data.metrics["best_val_nll"] == study.best_value  # exactly the same training


def test_a_lagging_trial_is_pruned_and_its_run_marked_killed(in_tmp):
    cfg = compose(["model=mc_dropout_dnn", *FAST, "train.epochs=6", "tune.n_trials=2", "tune.startup_trials=1",
                   "tune.warmup_epochs=1", "tune.sampler=random", "train.lr=tag(log, interval(1e-5, 1e-2))"])
    sweep = begin(cfg)
    study = optuna.load_study(study_name=sweep.study_name, storage="sqlite:///optuna.db")
    study.enqueue_trial({"train.lr": 1e-5})  # after the defaults: a learning rate that cannot keep up
    assert work(sweep) == 2
    study = optuna.load_study(study_name=sweep.study_name, storage="sqlite:///optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    pruned = study.trials[1]
    assert pruned.user_attrs["pruned_at_epoch"] == 2 and list(pruned.intermediate_values) == [1, 2]
    run = mlflow.MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}").get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna_state"] == "PRUNED"
    assert finish(sweep).counts == {"complete": 1, "pruned": 1}


def test_two_objectives_give_a_pareto_front_and_no_pruning(in_tmp, own_configs):
    cfg = compose(["model=mc_dropout_dnn", *FAST, "train.epochs=2", "tune.n_trials=3",
                   "tune.objectives=[val_nll,val_ece]"])
    sweep = begin(cfg)
    work(sweep)
    summary = finish(sweep)
    study = optuna.load_study(study_name=sweep.study_name, storage="sqlite:///optuna.db")
    assert len(study.directions) == 2 and all(len(t.values) == 2 for t in study.trials)
    front = {t.number for t in study.best_trials}
    assert summary.best_trial in front
    assert summary.best["val_nll"] == min(t.values[0] for t in study.best_trials)
    assert set(summary.importances) == {"val_nll", "val_ece"}
    assert save_tuned(summary) == own_configs / "tuned" / "mc_dropout_dnn.yaml"


def test_a_named_study_continues_up_to_its_budget_and_keeps_to_its_model(in_tmp):
    first = begin(compose(["model=mc_dropout_dnn", *FAST, "train.epochs=1", "tune.n_trials=2",
                           "tune.study_name=shared"]))
    work(first)
    again = begin(compose(["model=mc_dropout_dnn", *FAST, "train.epochs=1", "tune.n_trials=3",
                           "tune.study_name=shared"]))
    assert (again.trials, again.parent_run_id) == (1, first.parent_run_id)  # the budget counts every trial
    work(again)
    assert len(optuna.load_study(study_name="shared", storage="sqlite:///optuna.db").trials) == 3
    with pytest.raises(UserError, match="study 'shared' exists for other model"):
        begin(compose(["model=bnn", *FAST, "tune.study_name=shared"]))


def test_the_comparison_report_shows_the_sweep_a_tuned_model_came_from(in_tmp, own_configs):
    import torch

    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.data.tables import prepare
    from dl_uncertainty.families.predict import predict_log_probs
    from dl_uncertainty.tracking import store
    from dl_uncertainty.tracking.compare import comparison_html, tuning_section
    from dl_uncertainty.train import train_and_log

    summary = tune(compose(["model=mc_dropout_dnn", *FAST, "train.epochs=2", "tune.n_trials=3",
                            "tune.sampler=random"]))
    tuned_file = (own_configs / "tuned" / "mc_dropout_dnn.yaml").read_text()
    assert f"tuned_study: {summary.study_name}" in tuned_file
    tuned = train_and_log(load_config(["+tuned=mc_dropout_dnn", *FAST, "train.epochs=2"]))
    elsewhere = train_and_log(load_config(["model=bnn", *FAST, "train.epochs=1", "tune.tuned_study=on-the-cluster"]))
    plain = train_and_log(load_config(["model=bnn", *FAST, "train.epochs=1"]))

    store.setup(load_config([]))
    tags = {r.run_id: mlflow.get_run(r.run_id).data.tags for r in (tuned, elsewhere, plain)}
    assert tags[tuned.run_id]["dlu.tuned_study"] == summary.study_name
    assert "dlu.tuned_study" not in tags[plain.run_id]
    section = tuning_section({"tuned": tuned.run_id, "elsewhere": elsewhere.run_id, "plain": plain.run_id})
    assert tuning_section({"plain": plain.run_id}) is None  # no tuned model: no section

    split = prepare(load_config([]).data, 42)["val"]
    preds = {name: {"probs": predict_log_probs(r.model, torch.as_tensor(split.x), 3).exp().mean(0).numpy(),
                    "labels": split.y} for name, r in (("tuned", tuned), ("plain", plain))}
    results = {"tuned": {"nll": 0.1}, "plain": {"nll": 0.2}}
    page = comparison_html(results, ["nll"], "tuned", "nll", "min", preds, tuning=section)
    tuning_part = page.split("<h2>Tuning</h2>", 1)[1]
    assert f"Optuna study {summary.study_name}" in tuning_part
    assert "tuned: Optimisation history" in tuning_part and "tuned: Parameter importance" in tuning_part
    assert tuning_part.count("data:image/png;base64,") == 2
    assert ("study on-the-cluster, whose sweep is not in this MLflow: see outputs/sweeps/on-the-cluster.html"
            in tuning_part)
    assert "plain" not in tuning_part
