"""Reading data from s3:// against moto's S3 server (a real HTTP endpoint on 127.0.0.1)."""

import boto3
import numpy as np
import pandas as pd
import pytest

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.s3 import upload_file
from dl_uncertainty.data.tables import prepare
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


def test_upload_command_puts_the_file_where_a_run_reads_it(tmp_path, bucket, capsys):
    from dl_uncertainty.config.compose import data_source_overrides
    from dl_uncertainty.data.__main__ import main

    local = tmp_path / "t.csv"
    pd.DataFrame({"a": np.arange(40.0), "label": np.tile(["p", "q"], 20)}).to_csv(local, index=False)
    uri = f"s3://{bucket}/uploads/t.csv"
    assert main(["upload", str(local), uri]) == 0
    assert f"data_source={uri}" in capsys.readouterr().out
    cfg = load_config([*data_source_overrides(uri), "data.outliers=none"])
    assert sum(len(s.y) for s in prepare(cfg.data, cfg.seed).values()) == 40


def test_upload_command_rejects_bad_input_in_one_line(tmp_path, bucket, capsys):
    from dl_uncertainty.data.__main__ import main

    assert main(["upload", str(tmp_path / "missing.csv"), f"s3://{bucket}/x.csv"]) == 2
    assert main(["upload", str(tmp_path), f"s3://{bucket}/x.csv"]) == 2
    (tmp_path / "t.csv").write_text("a,label\n1,x\n")
    assert main(["upload", str(tmp_path / "t.csv"), "s3://no-such-bucket-here/x.csv"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(errors) == 3 and all(ln.startswith("error: ") for ln in errors)
