"""A training whose weights go NaN stops in one line, with no checkpoint of the NaN weights."""

import mlflow
import pytest

from dl_uncertainty.errors import UserError
from dl_uncertainty.train import train_and_log


def test_a_diverged_training_is_one_line_and_leaves_no_checkpoint(tiny_cfg, digits_splits, tmp_path):
    store = f"sqlite:///{tmp_path / 'a.db'}"
    with pytest.raises(UserError, match=r"^training diverged: the model's outputs became NaN or infinite; lower "
                                        r"train.lr \(now 1e\+12\), or rescale data that holds huge values$"):
        train_and_log(tiny_cfg("train.lr=1e12", f"tracking_uri={store}"),
                      digits_splits["train"], digits_splits["val"], digits_splits["calib"], checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "ck" / "last.pt").exists()
    client = mlflow.MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("dl-uncertainty").experiment_id])
    assert run.info.status == "FAILED"
