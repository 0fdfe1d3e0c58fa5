"""Image folders and image lists on S3, against moto's S3 server (a real HTTP endpoint on 127.0.0.1)."""

import boto3
import numpy as np
import pytest

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.shapes import make_shapes
from dl_uncertainty.data.tables import prepare
from dl_uncertainty.errors import UserError


@pytest.fixture()
def shapes_bucket(s3_env, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    name = f"images-{np.random.default_rng().integers(1 << 30)}"
    s3.create_bucket(Bucket=name)
    folder = make_shapes(tmp_path / "shapes", per_class=8, size=12)
    for file in sorted(folder.rglob("*.png")):
        s3.upload_file(str(file), name, f"shapes/{file.relative_to(folder)}")
    rows = [f"{f.relative_to(folder)},{f.parent.name}" for f in sorted(folder.rglob("*.png"))]
    s3.put_object(Bucket=name, Key="shapes/list.csv", Body=("path,label\n" + "\n".join(rows)).encode())
    return name


def test_image_folder_and_csv_list_on_s3_give_the_same_splits(shapes_bucket):
    splits = {}
    for path in (f"s3://{shapes_bucket}/shapes", f"s3://{shapes_bucket}/shapes/list.csv"):
        cfg = load_config(["data=image_folder", f"data.path={path}", "data.image_size=null"])
        splits[path] = prepare(cfg.data, cfg.seed)
    folder, listed = splits.values()
    assert folder["train"].schema.class_names == ["circle", "square", "triangle"]
    assert folder["train"].schema.feature_shape == [3, 12, 12]
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(folder[name].x, listed[name].x)


def test_an_empty_s3_prefix_is_a_user_error(shapes_bucket):
    cfg = load_config(["data=image_folder", f"data.path=s3://{shapes_bucket}/nothing-here"])
    with pytest.raises(UserError, match="has no images in class sub-folders"):
        prepare(cfg.data, cfg.seed)
