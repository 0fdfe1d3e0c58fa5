"""Against a real `mlflow server` process: per-epoch logging, the pyfunc model in a fresh process."""

import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from dl_uncertainty.data.rows import unscaled
from dl_uncertainty.train import train_and_log


@pytest.fixture()
def served(mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    return mlflow_server


@pytest.mark.parametrize("model", ["bnn", "mc_dropout_dnn"])
def test_training_logs_params_curves_and_a_pyfunc_that_loads_in_a_fresh_process(
    served, tiny_cfg, digits_splits, model
):
    cfg = tiny_cfg(f"model={model}", "experiment_name=tracking-test")
    trained = train_and_log(cfg, digits_splits["train"], digits_splits["val"], digits_splits["calib"])

    client = mlflow.MlflowClient(served)
    run = client.get_run(trained.run_id)
    assert run.data.tags["model_type"] == model
    assert run.data.params["model.name"] == model
    assert len(client.get_metric_history(trained.run_id, "val_nll")) == cfg.train.epochs
    assert ("kl" in run.data.metrics) == (model == "bnn")

    ood = digits_splits["ood"]
    raw = pd.DataFrame(unscaled(ood.x[:16], ood.schema), columns=ood.schema.feature_names)  # as a user has them
    script = (
        "import sys, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('runs:/{trained.run_id}/model')\n"
        "print(m.predict(pd.read_json(sys.stdin, orient='split')).to_json(orient='split'))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], input=raw.to_json(orient="split"), text=True,
                         capture_output=True, env={"MLFLOW_TRACKING_URI": served, "PATH": "/usr/bin:/bin"},
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    frame = json.loads(out.stdout.strip().splitlines()[-1])
    columns = frame["columns"]
    rows = np.array([[r[i] for i in range(len(columns)) if columns[i].startswith("prob_")] for r in frame["data"]])
    assert rows.shape == (16, 8)
    assert np.allclose(rows.sum(1), 1, atol=1e-5)
    mi = np.array([r[columns.index("mutual_information")] for r in frame["data"]])
    entropy = np.array([r[columns.index("predictive_entropy")] for r in frame["data"]])
    assert (entropy >= mi - 1e-6).all()
    if model == "bnn":
        assert mi.mean() > 1e-4  # independent weight samples disagree on OOD digits


def test_pyfunc_takes_raw_named_columns_and_rejects_bad_input_in_one_sentence(served, tiny_cfg, digits_splits):
    from mlflow.exceptions import MlflowException

    test = digits_splits["test"]
    trained = train_and_log(tiny_cfg("model=mc_dropout_dnn", "train.epochs=1", "experiment_name=df-test"),
                            digits_splits["train"], digits_splits["val"], digits_splits["calib"])
    model = mlflow.pyfunc.load_model(f"runs:/{trained.run_id}/model")
    raw = pd.DataFrame(unscaled(test.x[:4], test.schema).round(), columns=test.schema.feature_names)
    assert list(model.metadata.get_input_schema().input_names()) == test.schema.feature_names
    out = model.predict(raw)
    assert list(out.columns[-8:]) == ["predicted_class", "predictive_entropy", "expected_entropy",
                                      "mutual_information", "prediction_set", "set_size", "abstain",
                                      "feature_density"]
    # the bundled scaling is applied: the same answer as the network on the split's scaled rows
    direct = model.unwrap_python_model().predict_rows(test.x[:4])
    np.testing.assert_allclose(out.filter(like="prob_").to_numpy(), direct.filter(like="prob_").to_numpy(), atol=1e-6)
    # the feature density fitted after training travels with the logged model
    np.testing.assert_allclose(out["feature_density"], direct["feature_density"], rtol=1e-6)
    bad = raw.copy()
    bad.iloc[1, 3] = np.nan
    with pytest.raises(MlflowException, match="row 1 column 'pixel_3' is nan") as err:
        model.unwrap_python_model().predict(None, bad)
    assert err.value.get_http_status_code() == 400


def test_parallel_tasks_share_an_experiment_that_another_one_created_first(served, tiny_cfg, monkeypatch):
    from dl_uncertainty.tracking.store import setup

    # the race: this task looked for the experiment (not there yet) just before another task created it
    mlflow.MlflowClient(served).create_experiment("raced")
    looked_up = []
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda name: looked_up.append(name))
    setup(tiny_cfg("experiment_name=raced"))

    assert looked_up == ["raced"]
    with mlflow.start_run() as run:
        pass
    assert mlflow.get_experiment(run.info.experiment_id).name == "raced"
