"""tuning-pipeline: the compiled YAML, and a kfp.local run with two workers sharing one SQLite study."""

import json

import mlflow
import optuna
import pytest
import yaml

from dl_uncertainty.config.compose import load_config
from pipelines.compile import compile_pipeline
from pipelines.tuning import run_tuning_local
from tests.conftest import REPO, run_module
from tests.pipelines.test_compile import loop_names

OVERRIDES = ["model=mc_dropout_dnn", "tune.n_trials=12", "train.lr=tag(log, interval(1e-4, 3e-3))"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = compile_pipeline(OVERRIDES, tmp_path_factory.mktemp("yaml") / "t.yaml", pipeline="tuning")
    docs = list(yaml.safe_load_all(path.read_text()))
    return path.read_text(), docs[0], docs[1]


def _task(spec, prefix):
    return next(v for k, v in spec["deploymentSpec"]["executors"].items() if k.startswith(prefix))


def test_workers_run_in_parallel_in_the_training_image_with_a_gpu(compiled):
    from components.images import CPU_IMAGE, CUDA_IMAGE

    _, spec, _ = compiled
    cfg = load_config()
    loop = next(t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t)
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == list(range(cfg.tune.workers))
    assert loop["iteratorPolicy"]["parallelismLimit"] == cfg.tune.workers
    trials = _task(spec, "exec-tune-trials")["container"]
    assert trials["image"] == CUDA_IMAGE and trials["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert {_task(spec, f"exec-tune-{s}")["container"]["image"] for s in ("setup", "report")} == {CPU_IMAGE}


def test_the_worker_loop_keeps_the_name_its_collected_outputs_are_read_under(compiled):
    _, spec, _ = compiled
    loops = loop_names(spec)
    assert len(loops) == 1 and all(key == name for key, name in loops.items())  # kubeflow/pipelines#13239


def test_every_task_gets_the_study_password_from_a_secret_and_none_is_written(compiled):
    text, spec, platform = compiled
    cfg = load_config()
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for executor in executors.values():
        secrets = {s["secretName"]: s["keyToEnv"] for s in executor["secretAsEnv"]}
        assert secrets[cfg.pipeline.tune_secret] == [{"envVar": "PGPASSWORD", "secretKey": "OPTUNA_DB_PASSWORD"}]
    assert "password" not in text.lower().replace("pgpassword", "").replace("optuna_db_password", "")


def test_parameter_defaults_come_from_the_config(compiled):
    _, spec, _ = compiled
    cfg = load_config(["model=mc_dropout_dnn", "tune.n_trials=12"])
    params = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert params["model"] == "mc_dropout_dnn" and params["n_trials"] == 12
    assert params["study_storage"] == cfg.pipeline.tune_storage  # no password: it comes as PGPASSWORD
    assert params["overrides"] == OVERRIDES[2:]  # the search range travels; n_trials is a typed parameter


def test_compile_cli_writes_the_tuning_yaml_and_rejects_a_bad_range(tmp_path):
    proc = run_module("pipelines", "compile", "--pipeline", "tuning", "--output", str(tmp_path / "t.yaml"), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert next(yaml.safe_load_all((tmp_path / "t.yaml").read_text()))["pipelineInfo"]["name"] == "tuning-pipeline"
    bad = run_module("pipelines", "compile", "--pipeline", "tuning", "--output", str(tmp_path / "b.yaml"),
                     "train.lr=interval(0.1, 0.01)", cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "inverted range" in bad.stderr


def test_two_local_workers_share_one_sqlite_study(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = run_tuning_local(["model=mc_dropout_dnn", "tune.n_trials=5", "tune.workers=2", "train.epochs=2",
                                "train.early_stopping_patience=0", "train.val_mc_samples=3",
                                "experiment_name=tuning-pipeline-test"], tmp_path / "out")
    assert "tuning-pipeline finished" in capsys.readouterr().out

    (name,) = optuna.get_all_study_names(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(5))  # one study, every trial once, no duplicate number
    assert {t.user_attrs["worker"] for t in study.trials} == {0, 1}
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study.trials[0].user_attrs["baseline"] and study.trials[0].user_attrs["worker"] == 0
    by_worker = {w: [t for t in study.trials if t.user_attrs["worker"] == w] for w in (0, 1)}
    overlapping = [(a.number, b.number) for a in by_worker[0] for b in by_worker[1]
                   if a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete]
    assert overlapping, "the two workers ran one after the other: " + str(
        [(t.number, t.user_attrs["worker"], t.datetime_start.time(), t.datetime_complete.time()) for t in study.trials])

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == numbers
    assert "figures/optimization_history.png" in {a.path for a in client.list_artifacts(parent, "figures")}

    tuned = (run_dir / "tune-report" / "tuned").read_text()
    assert tuned.startswith("# @package _global_") and "override /model: mc_dropout_dnn" in tuned
    assert "<img" in (run_dir / "tune-report" / "report").read_text()
