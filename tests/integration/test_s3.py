"""Reading data from s3:// against moto's S3 server (a real HTTP endpoint on 127.0.0.1)."""

import boto3
import numpy as np
import pandas as pd
import pytest

from dl_uncertainty.config import load_config
from dl_uncertainty.data import prepare, upload_file
from dl_uncertainty.errors import UserError


@pytest.fixture()
def bucket(s3_env):
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    name = f"datasets-{np.random.default_rng().integers(1 << 30)}"
    s3.create_bucket(Bucket=name)
    return name


def test_csv_from_s3_is_read_and_split(tmp_path, bucket):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    frame["target"] = np.repeat(["x", "y", "z"], 20)
    local = tmp_path / "t.csv"
    frame.to_csv(local, index=False)
    upload_file(str(local), f"s3://{bucket}/tables/t.csv")

    cfg = load_config(["data=csv", f"data.path=s3://{bucket}/tables/t.csv", "data.label_column=target",
                       "data.ood_classes=[z]", "data.outliers=none"])
    splits = prepare(cfg.data, cfg.seed)
    assert splits["train"].schema.class_names == ["x", "y"]
    assert sum(len(s.y) for s in splits.values()) == 60


def test_missing_s3_object_is_a_user_error(bucket):
    cfg = load_config(["data=csv", f"data.path=s3://{bucket}/nope.csv"])
    with pytest.raises(UserError, match="cannot read s3://"):
        prepare(cfg.data, cfg.seed)
