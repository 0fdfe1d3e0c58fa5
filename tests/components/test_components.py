"""Each component's python_func on tiny data, then every component once as a kfp.local task."""

import json

import mlflow
import numpy as np
import pytest
from kfp import dsl, local

from components.compare import compare
from components.configure import configure
from components.evaluate import evaluate
from components.preprocess import preprocess
from components.train import train
from components.train_evaluate import train_evaluate
from dl_uncertainty.config.compose import without_keys
from dl_uncertainty.errors import UserError
from dl_uncertainty.uncertainty import metrics as M
from tests.conftest import LOOSE_GATE, TINY

NAME = "dl-uncertainty-digits-1x8x8"  # the registered model of digits: data source and input shape
PARAMS = dict(epochs=3, learning_rate=0.001, mc_samples=8, seed=3, seeds=1, folds=0, data_source="digits",
              experiment_name="component-test", mlflow_tracking_uri="")


def art(cls, tmp_path, name):
    return cls(name=name, uri=str(tmp_path / name), metadata={})


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """configure -> preprocess -> train (both models) -> evaluate -> compare, as plain functions."""
    tmp = tmp_path_factory.mktemp("chain")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    mp.chdir(tmp)
    out = {"tmp": tmp, "config": art(dsl.Artifact, tmp, "config")}
    configure.python_func(models=["bnn", "mc_dropout_dnn"], overrides=[*TINY, *LOOSE_GATE], config=out["config"],
                          **PARAMS)
    splits = {n: art(dsl.Dataset, tmp, n) for n in ("train", "val", "calib", "test", "ood")}
    out["eda"] = art(dsl.HTML, tmp, "eda")
    preprocess.python_func(config=out["config"], eda_report=out["eda"], **splits)
    out["splits"] = splits
    out["evaluated"] = {}
    for name in ("bnn", "mc_dropout_dnn"):
        model = art(dsl.Model, tmp, f"model-{name}")
        train.python_func(config=out["config"], model_name=name, seed=PARAMS["seed"], fold=-1, train=splits["train"],
                          val=splits["val"], calib=splits["calib"], model=model, val_rows=art(dsl.Dataset, tmp, f"val-{name}"))
        outputs = {k: art(cls, tmp, f"{k}-{name}") for k, cls in (
            ("metrics", dsl.Metrics), ("confusion", dsl.ClassificationMetrics), ("report", dsl.HTML),
            ("predictions", dsl.Dataset))}
        evaluate.python_func(model=model, val=splits["val"], calib=splits["calib"], test=splits["test"],
                             ood=splits["ood"], **outputs)
        out["evaluated"][name] = {"model": model, **outputs}
    out["comparison"], out["compare_report"] = art(dsl.Markdown, tmp, "comparison"), art(dsl.HTML, tmp, "cmp")
    out["winner"] = compare.python_func(
        config=out["config"], metrics=[e["metrics"] for e in out["evaluated"].values()],
        predictions=[e["predictions"] for e in out["evaluated"].values()],
        comparison=out["comparison"], report=out["compare_report"])
    yield out
    mp.undo()


def test_configure_writes_one_validated_config_per_model(chain):
    configs = json.loads(open(chain["config"].path).read())
    assert set(configs) == {"bnn", "mc_dropout_dnn"}
    assert configs["bnn"]["seed"] == 3  # typed parameter
    assert configs["bnn"]["train"]["epochs"] == 3  # typed parameter, and the same value in the overrides
    assert configs["mc_dropout_dnn"]["model"]["dropout"] > 0


def test_configure_rejects_a_bad_override(tmp_path):
    with pytest.raises(UserError, match="model.dropout"):
        configure.python_func(models=["bnn"], overrides=["model.dropout=2"], config=art(dsl.Artifact, tmp_path, "c"),
                              **PARAMS)


def test_a_typed_parameter_and_an_override_of_its_key_must_agree(tmp_path):
    config = art(dsl.Artifact, tmp_path, "c")
    with pytest.raises(UserError) as info:
        configure.python_func(models=["bnn"], overrides=["train.epochs=20"], config=config, **PARAMS)
    assert str(info.value) == ("the overrides parameter sets train.epochs=20 but its typed pipeline parameter sets "
                               "train.epochs=3; set it once, with the typed parameter")
    configure.python_func(models=["bnn"], overrides=["train.lr=1e-3", "train.epochs=3", "model.dropout=0.2"],
                          config=config, **PARAMS)  # the same values (1e-3 is 0.001): no conflict
    assert json.loads(open(config.path).read())["bnn"]["model"]["dropout"] == 0.2


def test_preprocess_writes_splits_and_a_self_contained_eda_report(chain):
    assert chain["splits"]["ood"].metadata["examples"] > 0
    assert chain["splits"]["calib"].metadata["examples"] == 217 == chain["splits"]["val"].metadata["examples"]
    page = open(chain["eda"].path).read()
    assert page.count("data:image/png;base64,") >= 3
    assert "Class balance" in page and "missing values" in page


def test_train_exports_a_bundle_and_the_run_id(chain):
    model = chain["evaluated"]["bnn"]["model"]
    run = mlflow.MlflowClient(f"sqlite:///{chain['tmp'] / 'mlflow.db'}").get_run(model.metadata["mlflow_run_id"])
    assert run.data.tags["model_type"] == "bnn"
    assert (chain["tmp"] / "model-bnn" / "model.pt").is_file()


def test_evaluate_outputs_and_predictions_recompute_every_reported_number(chain):
    ev = chain["evaluated"]["mc_dropout_dnn"]
    reported = json.load(open(ev["metrics"].path))["metrics"]
    assert reported["test_accuracy"] == ev["metrics"].metadata["test_accuracy"]
    matrix = np.array([r["row"] for r in ev["confusion"].metadata["confusionMatrix"]["rows"]])
    assert matrix.sum() == len(np.load(chain["splits"]["test"].path)["y"])
    with np.load(ev["predictions"].path) as p:
        # rows are true classes, columns predicted ones: counted by hand, and not symmetric, so that
        # swapped arguments fail
        expected = np.zeros_like(matrix)
        np.add.at(expected, (p["labels"], p["probs"].argmax(1)), 1)
        assert not np.array_equal(expected, expected.T)
        np.testing.assert_array_equal(matrix, expected)
        assert {"labels", "probs", "ood_probs", "entropy", "mutual_info", "ood_entropy", "ood_mutual_info"} <= set(p)
        assert np.allclose(p["probs"].sum(1), 1, atol=1e-5)
        again = M.summarize(p["log_probs"], p["labels"], p["ood_log_probs"], p["far_ood_log_probs"])
        # temperature: fitted on the calibration split's MC samples, each scaled (kept or not: tests/unit)
        fitted = M.fit_temperature(p["calib_log_probs"], p["calib_labels"])
        temperature = fitted if reported["temperature_kept"] else 1.0
        calibrated = M.mean_log_probs(M.apply_temperature(p["log_probs"], temperature))
        scaled = M.summarize(calibrated, p["labels"])
        np.testing.assert_allclose(p["calibrated_probs"], np.exp(calibrated), atol=1e-6)
        # LAC sets: classes with 1 - p at most the ceil((n+1)(1-alpha))-th smallest calibration score
        calib_probs = np.exp(M.mean_log_probs(M.apply_temperature(p["calib_log_probs"], temperature)))
        scores = np.sort(1 - calib_probs[np.arange(len(p["calib_labels"])), p["calib_labels"]])
        rank = int(np.ceil((len(scores) + 1) * (1 - reported["alpha"])))
        sets = 1 - np.exp(calibrated) <= scores[rank - 1] + 1e-12
        np.testing.assert_array_equal(p["prediction_sets"], sets)
        coverage = sets[np.arange(len(p["labels"])), p["labels"]].mean()
        # the gate reads one half of the OOD rows, the test report the other
        assert p["ood_gate_log_probs"].shape[1] + p["ood_log_probs"].shape[1] == len(np.load(chain["splits"]["ood"].path)["y"])
        val = M.summarize(p["val_log_probs"], p["val_labels"], p["ood_gate_log_probs"])
        val_calibrated = np.exp(M.mean_log_probs(M.apply_temperature(p["val_log_probs"], temperature)))
        val_sets = 1 - val_calibrated <= scores[rank - 1] + 1e-12
        val_coverage = val_sets[np.arange(len(p["val_labels"])), p["val_labels"]].mean()
        n_calib = len(p["calib_labels"])
        shifted = {k: M.summarize(p[f"shift_{k}_log_probs"], p["labels"])
                   for k in ("gaussian_noise_3", "rotation_5")}
    for key, value in again.items():
        assert reported[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert reported["temperature_fitted"] == pytest.approx(fitted, rel=1e-4)
    assert reported["temperature"] == pytest.approx(temperature, rel=1e-4)
    assert reported["nll_ts"] == pytest.approx(scaled["nll"], rel=1e-6)
    assert reported["coverage_lac"] == pytest.approx(coverage) and reported["set_size_lac"] == sets.sum(1).mean()
    assert reported["calibration_examples"] == n_calib == 217
    # what selection reads: the validation split's metrics, its conformal coverage out of sample
    assert reported["val_nll"] == pytest.approx(val["nll"]) and reported["val_ece"] == pytest.approx(val["ece"])
    assert reported["val_auroc_entropy"] == pytest.approx(val["auroc_entropy"])
    assert reported["val_coverage"] == pytest.approx(val_coverage)
    assert reported["gaussian_noise_s3_acc"] == pytest.approx(shifted["gaussian_noise_3"]["acc"])
    assert reported["rotation_s5_ece"] == pytest.approx(shifted["rotation_5"]["ece"])
    page = open(ev["report"].path).read()
    assert page.count("data:image/png;base64,") >= 5 and "https://" not in page
    assert "calibrated on the calibration split, n = 217 examples" in page
    assert f"[{1 - reported['alpha']:.3f}, {1 - reported['alpha'] + 1 / 218:.3f}]" in page


def test_compare_picks_the_lowest_validation_nll_and_registers_the_champion_under_the_data_name(chain):
    results = {n: json.load(open(e["metrics"].path)) for n, e in chain["evaluated"].items()}
    best = min(results, key=lambda n: results[n]["metrics"]["val_nll"])
    assert chain["winner"] == best
    table = open(chain["comparison"].path).read()
    assert f"**Winner: {best}**" in table and "mc_dropout_dnn" in table and "| bnn |" in table
    assert "chosen on validation nll; test numbers reported only" in table
    assert chain["comparison"].metadata["registered_model"] == NAME
    client = mlflow.MlflowClient(f"sqlite:///{chain['tmp'] / 'mlflow.db'}")
    version = client.get_model_version_by_alias(NAME, "champion")
    assert version.run_id == results[best]["run_id"]


def _compare_with(chain, tmp_path, records: dict) -> str:
    tmp_path.mkdir()
    paths = []
    for name, record in records.items():
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(record))
    metrics = [art(dsl.Metrics, tmp_path, p.name) for p in paths]
    return compare.python_func(config=chain["config"], metrics=metrics,
                               predictions=[e["predictions"] for e in chain["evaluated"].values()],
                               comparison=art(dsl.Markdown, tmp_path, "cmp"), report=art(dsl.HTML, tmp_path, "r"))


def test_test_metrics_never_choose_the_winner(chain, tmp_path):
    records = {n: json.load(open(e["metrics"].path)) for n, e in chain["evaluated"].items()}
    bnn, dnn = records["bnn"]["metrics"], records["mc_dropout_dnn"]["metrics"]
    assert bnn["val_nll"] != dnn["val_nll"]

    def swapped(which):  # the two models' metrics that ``which`` selects, exchanged
        out = {n: {**r, "metrics": dict(r["metrics"])} for n, r in records.items()}
        for key in (k for k in bnn if which(k) and k in dnn):
            out["bnn"]["metrics"][key], out["mc_dropout_dnn"]["metrics"][key] = dnn[key], bnn[key]
        return out

    test_swapped = swapped(lambda k: not k.startswith("val_"))
    assert test_swapped["bnn"]["metrics"]["nll"] == dnn["nll"]
    assert _compare_with(chain, tmp_path / "a", test_swapped) == chain["winner"]
    other = ({"bnn", "mc_dropout_dnn"} - {chain["winner"]}).pop()
    assert _compare_with(chain, tmp_path / "b", swapped(lambda k: k.startswith("val_"))) == other


def test_a_winner_that_fails_the_champion_gate_leaves_the_previous_champion(chain, tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{chain['tmp'] / 'mlflow.db'}")
    before = client.get_model_version_by_alias(NAME, "champion").version
    strict = art(dsl.Artifact, tmp_path, "strict-config")
    configure.python_func(models=["bnn", "mc_dropout_dnn"], overrides=[*TINY, "evaluate.champion_gate.max_ece=0"],
                          config=strict, **PARAMS)
    comparison = art(dsl.Markdown, tmp_path, "comparison")
    winner = compare.python_func(
        config=strict, metrics=[e["metrics"] for e in chain["evaluated"].values()],
        predictions=[e["predictions"] for e in chain["evaluated"].values()],
        comparison=comparison, report=art(dsl.HTML, tmp_path, "report"))
    ece = json.load(open(chain["evaluated"][winner]["metrics"].path))["metrics"]["val_ece_ts"]
    assert f"{winner} fails the champion gate (validation ECE (calibrated) {ece:.4f} > 0)" in open(comparison.path).read()
    assert comparison.metadata["champion"] is False
    assert f"the champion alias stays on version {before}" in comparison.metadata["gate"]
    versions = client.search_model_versions(f"name='{NAME}'")
    assert max(int(v.version) for v in versions) > int(before)  # registered ...
    assert client.get_model_version_by_alias(NAME, "champion").version == before  # ... not promoted


def test_gate_thresholds_set_to_null_are_not_checked():
    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.tracking.compare import gate_failures

    gate = load_config(["evaluate.champion_gate.max_ece=0.01", "evaluate.champion_gate.coverage_slack=null"]).evaluate.champion_gate
    metrics = {"val_ece_ts": 0.02, "val_auroc_entropy": 0.95, "val_coverage": 0.1}
    assert gate_failures(metrics, gate, 0.1) == ["validation ECE (calibrated) 0.0200 > 0.01"]
    assert gate_failures({"val_ece_ts": 0.005, "val_coverage": 0.9}, gate, 0.1) == []  # no OOD split: AUROC not checked
    assert gate_failures({"val_ece_ts": float("nan")}, gate, 0.1) == ["validation ECE (calibrated) nan > 0.01"]


def test_gate_fails_a_missing_metric_and_names_the_one_it_may_skip():
    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.tracking.compare import gate_failures, gate_skipped, gate_verdict

    gate = load_config([]).evaluate.champion_gate
    assert gate_failures({"val_auroc_entropy": 0.9}, gate, 0.1) == [
        "validation ECE (calibrated) was not measured (val_ece_ts missing)",
        "validation conformal coverage was not measured (val_coverage missing)"]
    no_ood = {"val_ece_ts": 0.01, "val_coverage": 0.9}
    assert gate_failures(no_ood, gate, 0.1) == []
    assert gate_skipped(no_ood, gate) == ["OOD AUROC (entropy, validation vs the OOD gate half) not checked (no OOD split)"]
    assert gate_skipped({**no_ood, "val_auroc_entropy": 0.9}, gate) == []
    assert gate_verdict("bnn", [], gate_skipped(no_ood, gate)) == (
        "bnn passes the champion gate (OOD AUROC (entropy, validation vs the OOD gate half) not checked (no OOD split)) and becomes champion.")


def test_gate_coverage_follows_alpha():
    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.tracking.compare import gate_failures

    gate = load_config(["evaluate.alpha=0.2"]).evaluate.champion_gate
    good = {"val_ece_ts": 0.01, "val_auroc_entropy": 0.9}
    assert gate_failures({**good, "val_coverage": 0.79}, gate, 0.2) == []  # 1 - 0.2 - 0.05 = 0.75
    assert gate_failures({**good, "val_coverage": 0.74}, gate, 0.2) == ["validation conformal coverage 0.7400 < 0.75"]
    assert gate_failures({**good, "val_coverage": 0.84}, gate, 0.1) == ["validation conformal coverage 0.8400 < 0.85"]
    with pytest.raises(UserError, match=r"coverage_slack must be in \[0, 1 - alpha = 0.2\)"):
        load_config(["evaluate.alpha=0.8", "evaluate.champion_gate.coverage_slack=0.3"])


def test_gate_verdict_says_when_there_is_no_champion_to_fall_back_on(tmp_path):
    from dl_uncertainty.tracking.compare import current_champion, gate_verdict

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'empty.db'}")
    assert current_champion("dl-uncertainty") is None

    failed = ["test ECE (calibrated) 0.2000 > 0.05"]
    none = gate_verdict("bnn", failed, champion=None)
    assert "no champion is set, so `make serve` has nothing to serve until a model passes" in none
    assert "stays" not in none
    assert "the champion alias stays on version 3" in gate_verdict("bnn", failed, champion="3")


def test_train_evaluate_in_one_task_reports_what_train_then_evaluate_report(chain):
    """kfp.local's one task per branch: the same trained weights, metrics, predictions and record."""
    tmp, splits = chain["tmp"], chain["splits"]
    outputs = {k: art(cls, tmp, f"one-{k}") for k, cls in (
        ("model", dsl.Model), ("val_rows", dsl.Dataset), ("metrics", dsl.Metrics),
        ("confusion", dsl.ClassificationMetrics), ("report", dsl.HTML), ("predictions", dsl.Dataset))}
    train_evaluate.python_func(config=chain["config"], model_name="mc_dropout_dnn", seed=PARAMS["seed"], fold=-1,
                               **splits, **outputs)
    two = chain["evaluated"]["mc_dropout_dnn"]
    one_record, two_record = (json.load(open(e["metrics"].path)) for e in (outputs, two))
    assert one_record["run_id"] != two_record["run_id"]  # trained again, in its own MLflow run
    np.testing.assert_equal(one_record["metrics"], two_record["metrics"])
    assert outputs["confusion"].metadata == two["confusion"].metadata
    with np.load(outputs["predictions"].path) as one, np.load(two["predictions"].path) as other:
        assert sorted(one.files) == sorted(other.files)
        for key in one.files:
            np.testing.assert_array_equal(one[key], other[key], err_msg=key)
    assert "<img" in open(outputs["report"].path).read()


def test_train_on_a_corrupt_dataset_artifact_fails_clearly(chain, tmp_path):
    bad = art(dsl.Dataset, tmp_path, "train")
    (tmp_path / "train").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="is not a dataset"):
        train.python_func(config=chain["config"], model_name="bnn", seed=3, fold=-1, train=bad, val=chain["splits"]["val"],
                          calib=chain["splits"]["calib"], model=art(dsl.Model, tmp_path, "m"),
                          val_rows=art(dsl.Dataset, tmp_path, "v"))


def test_the_components_run_as_kfp_local_tasks(tmp_path, monkeypatch):
    """kfp.local takes no input artifacts for a lone task, so chain them in a minimal pipeline
    (compare, which needs dsl.Collected, runs in tests/pipelines/test_local_run.py)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.tracking.store import setup

    setup(load_config([*TINY, "experiment_name=component-test"]))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=True)

    @dsl.pipeline
    def one_model() -> dsl.Metrics:
        config = configure(models=["mc_dropout_dnn"], overrides=without_keys(TINY, ["train.epochs"]),
                           **{**PARAMS, "epochs": 1})
        data = preprocess(config=config.outputs["config"])
        model = train(config=config.outputs["config"], model_name="mc_dropout_dnn", seed=3, fold=-1, train=data.outputs["train"],
                      val=data.outputs["val"], calib=data.outputs["calib"])
        return evaluate(model=model.outputs["model"], val=data.outputs["val"], calib=data.outputs["calib"],
                        test=data.outputs["test"],
                        ood=data.outputs["ood"]).outputs["metrics"]

    metrics = one_model().output
    assert json.load(open(metrics.path))["model"] == "mc_dropout_dnn"
    assert 0 < metrics.metadata["test_accuracy"] <= 1


def test_the_registered_name_is_the_datas_so_a_shapes_model_never_joins_the_digits_model():
    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.tracking.compare import registered_name

    digits = load_config([]).data
    shapes = load_config(["data=image_folder", "data.path=data/shapes/"]).data
    assert registered_name(digits, [1, 8, 8]) == NAME
    assert registered_name(shapes, [3, 32, 32]) == "dl-uncertainty-image_folder-shapes-3x32x32"
    assert registered_name(load_config(["data=csv", "data.path=s3://b/my table.csv"]).data, [5]) == \
        "dl-uncertainty-csv-my-table-5"
    assert registered_name(shapes, [3, 32, 32], "mine") == "mine"  # evaluate.registered_model_name wins
