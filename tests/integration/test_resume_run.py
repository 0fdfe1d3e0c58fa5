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
