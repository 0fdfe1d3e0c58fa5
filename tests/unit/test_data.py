import numpy as np
import pandas as pd
import pytest

from dl_uncertainty.config import load_config
from dl_uncertainty.data import load_split, prepare, save_split, save_splits
from dl_uncertainty.errors import UserError


def _csv_cfg(path, *overrides):
    return load_config(["data=csv", f"data.path={path}", "data.test_fraction=0.25",
                        "data.val_fraction=0.25", *overrides]).data


def _table(tmp_path, n=80, seed=0):
    """Two numeric features + label; a few NaNs and one huge outlier in the first rows."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(10, 2, size=n),
                          "label": np.repeat(["cat", "dog", "owl", "emu"], n // 4)})
    frame.loc[0, "a"] = np.nan
    frame.loc[5, "b"] = np.nan
    frame.loc[9, "a"] = 1e6
    path = tmp_path / "table.csv"
    frame.to_csv(path, index=False)
    return path, frame


def _all(splits):
    return np.concatenate([s.x for s in splits.values()])


@pytest.mark.parametrize("missing", ["drop", "mean", "median", "ffill"])
def test_every_missing_value_strategy_leaves_no_nan(tmp_path, missing):
    path, frame = _table(tmp_path)
    splits = prepare(_csv_cfg(path, f"data.missing={missing}", "data.scaling=none", "data.outliers=none"), 0)
    x = _all(splits)
    assert np.isfinite(x).all()
    expected_rows = len(frame) - 2 if missing == "drop" else len(frame)
    assert len(x) == expected_rows


def test_mean_imputation_uses_training_statistics_only(tmp_path):
    path, _ = _table(tmp_path)
    cfg = _csv_cfg(path, "data.missing=mean", "data.scaling=none", "data.outliers=none")
    splits = prepare(cfg, 0)
    fill = splits["train"].schema.cleaning["fill"]
    train_a = splits["train"].x[:, 0]
    # the fill value is the train mean of the non-missing values, and it appears where NaN was
    assert np.isclose(fill[0], np.mean(train_a[train_a != fill[0]]), rtol=1e-5) or fill[0] in train_a
    assert splits["train"].schema.cleaning["missing_filled"] + splits["val"].schema.cleaning["missing_filled"] \
        + splits["test"].schema.cleaning["missing_filled"] == 2


@pytest.mark.parametrize("method", ["iqr", "zscore"])
def test_outliers_are_clipped_to_bounds_fitted_on_train(tmp_path, method):
    path, _ = _table(tmp_path)
    threshold = "1.5" if method == "iqr" else "3"
    splits = prepare(_csv_cfg(path, f"data.outliers={method}", f"data.outlier_threshold={threshold}",
                              "data.scaling=none"), 0)
    x = _all(splits)
    high = np.asarray(splits["train"].schema.cleaning["clip_high"])
    assert x[:, 0].max() < 1e3  # the 1e6 value is gone
    assert (x <= high + 1e-4).all()
    assert sum(s.schema.cleaning["outliers_clipped"] for s in splits.values()) >= 1


def test_standard_scaling_is_fitted_on_train(tmp_path):
    path, _ = _table(tmp_path)
    splits = prepare(_csv_cfg(path, "data.outliers=iqr"), 0)
    assert np.allclose(splits["train"].x.mean(0), 0, atol=1e-5)
    assert np.allclose(splits["train"].x.std(0), 1, atol=1e-4)
    assert not np.allclose(splits["test"].x.mean(0), 0, atol=1e-5)


def test_csv_ood_classes_are_held_out(tmp_path):
    path, _ = _table(tmp_path)
    splits = prepare(_csv_cfg(path, "data.ood_classes=[owl]"), 0)
    assert splits["train"].schema.class_names == ["cat", "dog", "emu"]
    assert splits["ood"].schema.ood_class_names == ["owl"]
    assert len(splits["ood"].y) == 20 and set(splits["ood"].y) == {0}


def test_digits_splits_are_stratified_disjoint_and_hold_out_ood(digits_splits):
    from sklearn.datasets import load_digits

    digits = load_digits()
    total = sum(len(s.y) for s in digits_splits.values())
    assert total == len(digits.target)
    assert len(digits_splits["ood"].y) == int(np.isin(digits.target, [8, 9]).sum())
    # every OOD example is an 8 or a 9: match rows back to the raw images through the scaler
    stats = digits_splits["ood"].schema.cleaning
    raw = digits_splits["ood"].x * np.asarray(stats["scale"]) + np.asarray(stats["center"])
    lookup = {row.tobytes(): label for row, label in zip(digits.data.round().astype(np.int16), digits.target, strict=True)}
    labels = {lookup[r.tobytes()] for r in raw.round().astype(np.int16)}
    assert labels == {8, 9}
    for name in ("train", "val", "test"):
        assert set(digits_splits[name].y) == set(range(8))
        share = np.bincount(digits_splits[name].y) / len(digits_splits[name].y)
        assert share.max() - share.min() < 0.03  # stratified: balanced like the source


def test_split_files_round_trip_and_check_schema(tmp_path, digits_splits):
    paths = save_splits(digits_splits, tmp_path)
    train = load_split(paths["train"])
    assert np.array_equal(train.x, digits_splits["train"].x)
    assert train.schema == digits_splits["train"].schema
    load_split(paths["test"], expect=train.schema)
    other = load_split(paths["test"])
    other.schema.class_names = ["x", "y"]
    save_split(other, tmp_path / "other.npz")
    with pytest.raises(UserError, match="expected"):
        load_split(tmp_path / "other.npz", expect=train.schema)


def test_corrupt_split_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="not a dataset"):
        load_split(bad)
    with pytest.raises(UserError, match="not found"):
        load_split(tmp_path / "missing.npz")


def test_npz_source_with_images(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((120, 6, 6)).astype("float32")
    y = np.repeat(np.arange(4), 30)
    np.savez(tmp_path / "imgs.npz", x=x, y=y)
    cfg = load_config(["data=npz", f"data.path={tmp_path / 'imgs.npz'}", "data.ood_classes=[3]"]).data
    splits = prepare(cfg, 0)
    assert splits["train"].schema.feature_shape == [1, 6, 6]
    assert splits["train"].x.shape[1] == 36


@pytest.mark.parametrize(
    ("content", "overrides", "needle"),
    [
        ("", [], "empty"),
        ("a,b,label\n", [], "no rows"),
        ("a,b,label\n1,x,0\n2,y,1\n", [], "'b' .* not numeric"),
        ("a,b,y\n1,2,0\n", [], "label column 'label'"),
        ("a,label\n1,0\n2,1\n", ["data.ood_classes=[7]"], r"ood_classes \['7'\]"),
    ],
)
def test_bad_csv_is_one_clear_user_error(tmp_path, content, overrides, needle):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=needle):
        prepare(_csv_cfg(path, *overrides), 0)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        prepare(_csv_cfg(tmp_path / "nope.csv"), 0)
