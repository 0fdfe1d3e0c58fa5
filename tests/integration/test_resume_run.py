"""A resumed training's MLflow run holds every epoch's curve, in the run it continued or a new one."""

import mlflow
import pytest
import torch

from dl_uncertainty.train import train_and_log


@pytest.mark.parametrize("store_kept", [True, False])
def test_a_resumed_run_has_val_nll_for_every_epoch_and_its_best_epoch_among_them(
        tiny_cfg, digits_splits, tmp_path, store_kept):
    train, val = digits_splits["train"], digits_splits["val"]
    ck = tmp_path / "ck"
    first_store, second_store = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    first = train_and_log(tiny_cfg("model=mc_dropout_dnn", "train.epochs=2", f"tracking_uri={first_store}"),
                          train, val, digits_splits["calib"], checkpoint_dir=ck)
    assert torch.load(ck / "last.pt", weights_only=True)["mlflow_run_id"] == first.run_id

    store = first_store if store_kept else second_store  # the interrupted run is, or is not, in this store
    resumed = train_and_log(tiny_cfg("model=mc_dropout_dnn", "train.epochs=4", "train.resume=true",
                                     f"tracking_uri={store}"), train, val, digits_splits["calib"], checkpoint_dir=ck)
    assert (resumed.run_id == first.run_id) == store_kept
    client = mlflow.MlflowClient(store)
    steps = sorted(m.step for m in client.get_metric_history(resumed.run_id, "val_nll"))
    assert steps == [1, 2, 3, 4]
    run = client.get_run(resumed.run_id)
    assert int(run.data.metrics["best_epoch"]) in steps
    assert run.data.tags["resumed_from"] == f"{ck / 'last.pt'} epoch 2 run {first.run_id}"
    assert run.info.status == "FINISHED"
    assert torch.load(ck / "last.pt", weights_only=True)["mlflow_run_id"] == resumed.run_id


def test_a_refused_resume_leaves_the_earlier_run_finished_and_untagged(tiny_cfg, digits_splits, tmp_path):
    """Data of another width in the same checkpoint folder: refused before the earlier MLflow run is reopened."""
    from dl_uncertainty.data.splits import Schema, Split
    from dl_uncertainty.errors import UserError

    train, val, calib = digits_splits["train"], digits_splits["val"], digits_splits["calib"]
    ck, store = tmp_path / "ck", f"sqlite:///{tmp_path / 'a.db'}"
    first = train_and_log(tiny_cfg("model=mc_dropout_dnn", "train.epochs=1", f"tracking_uri={store}"),
                          train, val, calib, checkpoint_dir=ck)

    def narrower(split: Split) -> Split:
        return Split(split.x[:, :40], split.y, Schema([40], split.schema.class_names, [], "npz", split.schema.cleaning))

    with pytest.raises(UserError, match=r"written for data with features \[1, 8, 8\].*this data has \[40\]"):
        train_and_log(tiny_cfg("model=mc_dropout_dnn", "train.epochs=2", "train.resume=true", f"tracking_uri={store}"),
                      narrower(train), narrower(val), narrower(calib), checkpoint_dir=ck)
    run = mlflow.MlflowClient(store).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert "resumed_from" not in run.data.tags
    assert torch.load(ck / "last.pt", weights_only=True)["mlflow_run_id"] == first.run_id


def test_an_unreadable_checkpoint_is_one_line_naming_it(tiny_cfg, digits_splits, tmp_path):
    from dl_uncertainty.errors import UserError

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "last.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read checkpoint .*last.pt: damaged.*train.resume=false") as err:
        train_and_log(tiny_cfg("train.resume=true", f"tracking_uri=sqlite:///{tmp_path / 'a.db'}"),
                      digits_splits["train"], digits_splits["val"], digits_splits["calib"], checkpoint_dir=ck)
    assert "\n" not in str(err.value)
