"""The local MLflow store: checked before any work, and the experiment it creates."""

import pytest

from dl_uncertainty.errors import UserError
from dl_uncertainty.tracking.store import setup


def test_a_store_folder_that_is_a_file_fails_before_mlflow_writes_anything(tiny_cfg, tmp_path):
    (tmp_path / "file").write_text("")
    cfg = tiny_cfg(f"tracking_uri=sqlite:///{tmp_path / 'file' / 'mlflow.db'}")
    with pytest.raises(UserError, match=r"cannot write to .*file \(.*\); set MLFLOW_TRACKING_URI .*writable folder"):
        setup(cfg)


def test_an_unwritable_artifact_folder_fails_before_any_work(tiny_cfg, tmp_path):
    (tmp_path / "mlartifacts").write_text("")  # where the runs' artifacts would go
    cfg = tiny_cfg(f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(UserError, match=r"cannot write to .*mlartifacts \(.*\); make it writable"):
        setup(cfg)
    assert not (tmp_path / "mlflow.db").exists()  # nothing created


def test_an_existing_experiment_with_an_unwritable_artifact_folder_fails_at_setup(tiny_cfg, tmp_path):
    import mlflow

    elsewhere = tmp_path / "elsewhere"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("moved", artifact_location=(elsewhere / "art").as_uri())
    elsewhere.write_text("")
    cfg = tiny_cfg(f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name=moved")
    with pytest.raises(UserError, match=r"cannot write to .*elsewhere/art \(.*\).*experiment_name"):
        setup(cfg)


def test_a_fresh_store_tags_the_experiment_as_classic_ml_and_the_printed_url_opens_its_runs(tiny_cfg, tmp_path):
    import mlflow

    from dl_uncertainty.tracking.store import runs_url

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert runs_url("http://ui", uri) == "http://ui/#/experiments?workflowType=machine_learning"  # no store yet
    setup(tiny_cfg(f"tracking_uri={uri}", "experiment_name=fresh"))
    experiment = mlflow.MlflowClient(uri).get_experiment_by_name("fresh")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert runs_url("http://ui", uri, "fresh") == (
        f"http://ui/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning")


def test_an_older_experiment_without_the_kind_tag_gets_it(tiny_cfg, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("older")
    setup(tiny_cfg(f"tracking_uri={uri}", "experiment_name=older"))
    assert mlflow.MlflowClient(uri).get_experiment_by_name("older").tags["mlflow.experimentKind"] == \
        "custom_model_development"
