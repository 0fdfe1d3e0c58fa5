import numpy as np
import pandas as pd
import pytest

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.splits import load_split, save_split, save_splits
from dl_uncertainty.data.tables import prepare
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


def _write(tmp_path, content: bytes | str, name="t.csv"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _rows(n=40, sep=","):
    lines = [sep.join(["a", "b", "label"])]
    lines += [sep.join([str(i % 7), str(i % 5 + 0.5), str(i % 2)]) for i in range(n)]
    return "\n".join(lines) + "\n"


def test_latin1_csv_says_to_set_the_encoding_and_reads_with_it(tmp_path):
    path = _write(tmp_path, _rows().replace("a,b", "température,b").encode("latin-1"))
    with pytest.raises(UserError, match=r"t\.csv is not utf-8 text.*data\.encoding"):
        prepare(_csv_cfg(path), 0)
    splits = prepare(_csv_cfg(path, "data.encoding=latin-1"), 0)
    assert sum(len(s.y) for s in splits.values()) == 40


def test_binary_file_is_not_a_csv(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.arange(100.0))
    path = _write(tmp_path, (tmp_path / "x.npz").read_bytes())
    with pytest.raises(UserError, match="binary file, not a CSV"):
        prepare(_csv_cfg(path), 0)


def test_unknown_encoding_is_a_config_error():
    with pytest.raises(UserError, match="data.encoding"):
        load_config(["data=csv", "data.path=t.csv", "data.encoding=klingon"])


def _with_inf(tmp_path):
    text = _rows().splitlines()
    text[3] = "inf,1.5,0"
    text[8] = "-inf,2.5,1"
    return _write(tmp_path, "\n".join(text) + "\n")


@pytest.mark.parametrize("outliers", ["iqr", "none"])
def test_infinite_values_are_an_error_by_default_with_count_and_column(tmp_path, outliers):
    with pytest.raises(UserError, match=r"2 infinite values \(column 'a' has 2\).*data\.non_finite"):
        prepare(_csv_cfg(_with_inf(tmp_path), f"data.outliers={outliers}"), 0)


@pytest.mark.parametrize(("choice", "rows"), [("drop", 38), ("as_missing", 40)])
def test_infinite_values_dropped_or_treated_as_missing(tmp_path, choice, rows):
    splits = prepare(_csv_cfg(_with_inf(tmp_path), f"data.non_finite={choice}", "data.outliers=none"), 0)
    assert np.isfinite(_all(splits)).all()
    assert len(_all(splits)) == rows


def test_non_finite_splits_are_never_written_and_nothing_partial_is_left(tmp_path, digits_splits):
    bad = dict(digits_splits)
    x = digits_splits["ood"].x.copy()
    x[0, 0] = np.nan
    bad["ood"] = type(digits_splits["ood"])(x, digits_splits["ood"].y, digits_splits["ood"].schema)
    with pytest.raises(UserError, match=r"ood\.npz.*NaN"):
        save_splits(bad, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_unwritable_split_folder_is_a_user_error(tmp_path, digits_splits):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write the splits to"):
        save_splits(digits_splits, tmp_path / "file" / "out")


def test_duplicated_column_names_are_an_error(tmp_path):
    path = _write(tmp_path, "a,label,label\n" + "".join(f"{i},{i % 2},{i % 2}\n" for i in range(20)))
    with pytest.raises(UserError, match=r"duplicated column names \['label'\]"):
        prepare(_csv_cfg(path), 0)


def test_integer_labels_stay_integers_and_blank_labels_are_reported(tmp_path):
    lines = _rows().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ","
    lines[2] = lines[2].rsplit(",", 1)[0] + ",2"
    path = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"1 rows of .*t\.csv have a blank 'label' \(first on line 2\).*blank_labels=drop"):
        prepare(_csv_cfg(path), 0)
    splits = prepare(_csv_cfg(path, "data.blank_labels=drop", "data.ood_classes=[2]"), 0)
    assert splits["train"].schema.class_names == ["0", "1"]
    assert splits["ood"].schema.ood_class_names == ["2"] and len(splits["ood"].y) == 1
    assert sum(len(s.y) for s in splits.values()) == 39


@pytest.mark.parametrize(("sep", "overrides"), [(";", []), ("\t", []), (";", ["data.separator=semicolon"]),
                                                (";", ["data.separator=';'"]), ("\t", ["data.separator=tab"])])
def test_semicolon_and_tab_files_are_read(tmp_path, sep, overrides):
    splits = prepare(_csv_cfg(_write(tmp_path, _rows(sep=sep)), *overrides), 0)
    assert splits["train"].schema.feature_shape == [2]


def test_missing_label_column_lists_the_columns_found(tmp_path):
    path = _write(tmp_path, _rows(sep=";"))
    with pytest.raises(UserError, match=r"columns found with separator ',': a;b;label\).*data\.separator"):
        prepare(_csv_cfg(path, "data.separator=comma"), 0)


def _npz_with_blank_labels(tmp_path, y):
    x = np.random.default_rng(0).normal(size=(len(y), 3))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return load_config(["data=npz", f"data.path={tmp_path / 'd.npz'}", "data.ood_classes=[2]",
                        "data.test_fraction=0.25", "data.val_fraction=0.25"]).data


@pytest.mark.parametrize("blank", [np.nan, ""])
def test_npz_blank_labels_follow_the_blank_labels_rule_not_a_class_nan(tmp_path, blank):
    y = np.repeat(["0", "1", "2"], 16) if blank == "" else np.repeat([0.0, 1.0, 2.0], 16)
    y[[3, 20]] = blank
    cfg = _npz_with_blank_labels(tmp_path, y)
    with pytest.raises(UserError, match=r"2 labels in .*d\.npz's y are blank .*first at row 3.*blank_labels=drop"):
        prepare(cfg, 0)
    cfg.blank_labels = "drop"
    splits = prepare(cfg, 0)
    assert splits["train"].schema.class_names == ["0", "1"]  # integer names, no 'nan', no '0.0'
    assert splits["ood"].schema.ood_class_names == ["2"] and len(splits["ood"].y) == 16
    assert sum(len(s.y) for s in splits.values()) == 46
    assert splits["train"].schema.cleaning["rows_dropped"]["blank_labels"] == 2


def test_dropped_rows_are_counted_printed_and_reported(tmp_path, capsys):
    from dl_uncertainty.preprocess import _task
    from dl_uncertainty.reports.eda import eda_html

    lines = _rows().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ","  # blank label
    lines[2] = "inf,1.5,0"
    lines[3] = "-inf,2.5,1"
    lines[4] = ",2.5,1"  # missing value
    path = _write(tmp_path, "\n".join(lines) + "\n")
    overrides = ["data.blank_labels=drop", "data.non_finite=drop", "data.missing=drop"]
    splits = prepare(_csv_cfg(path, *overrides), 0)
    assert splits["train"].schema.cleaning["rows_dropped"] == {"blank_labels": 1, "non_finite": 2, "missing": 1}
    assert sum(len(s.y) for s in splits.values()) == 36
    report = eda_html(splits)
    for step, method, count in [("blank labels", "drop", 1), ("infinite values", "drop", 2),
                                ("missing values", "drop", 1)]:
        assert f"<td>{step}</td><td>{method}</td><td>{count} rows dropped</td>" in report

    cfg = load_config(["data=csv", f"data.path={path}", f"data_dir={tmp_path / 'out'}", "evaluate.alpha=0.25",
                       *overrides])
    _task(cfg)
    # stripped: in a whole test run, other tests' background threads may also write to sys.stdout
    out = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert ("dropped 4 rows: 1 with a blank label (data.blank_labels=drop), 2 with an infinite value "
            "(data.non_finite=drop), 1 with a missing value (data.missing=drop)") in out


# ---------------------------------------------------------------- the four splits


def test_digits_has_four_disjoint_stratified_splits_and_preprocess_writes_calib(tmp_path, capsys):
    from dl_uncertainty.data.splits import ROLES
    from dl_uncertainty.preprocess import _task
    from dl_uncertainty.reports.eda import eda_html

    cfg = load_config([f"data_dir={tmp_path}"])
    splits = prepare(cfg.data, cfg.seed)
    sizes = {name: len(split.y) for name, split in splits.items()}
    assert sizes == {"train": 720, "val": 217, "calib": 217, "test": 289, "ood": 354}
    seen = [{row.tobytes() for row in splits[name].x} for name in ("train", "val", "calib", "test")]
    duplicates = sum(len(a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert duplicates <= 2  # digits holds a few identical images; the row indices themselves are disjoint
    for name in ("val", "calib", "test"):  # stratified: every class, in the training split's proportions
        share = np.bincount(splits[name].y) / len(splits[name].y)
        assert np.abs(share - np.bincount(splits["train"].y) / 720).max() < 0.02
    report = eda_html(splits)
    assert '<td>calib</td><td class="num">217</td><td>15.0%</td>' in report and ROLES["calib"] in report and ROLES["test"] in report
    _task(cfg)
    assert len(load_split(tmp_path / "calib.npz").y) == 217
    assert any("calib" in line and " 217 examples" in line for line in capsys.readouterr().out.splitlines())


def test_splits_are_disjoint_by_row(tmp_path):
    """Each row lands in exactly one split: a unique value per row shows where it went."""
    n = 200
    frame = pd.DataFrame({"id": np.arange(n, dtype=float), "label": np.tile(["a", "b", "c", "d"], n // 4)})
    path = tmp_path / "ids.csv"
    frame.to_csv(path, index=False)
    splits = prepare(load_config(["data=csv", f"data.path={path}", "data.ood_classes=[]", "data.scaling=none",
                                  "data.outliers=none"]).data, 0)
    ids = {name: set(s.x[:, 0].round().astype(int)) for name, s in splits.items() if name != "ood"}
    assert sum(len(v) for v in ids.values()) == n and set().union(*ids.values()) == set(range(n))
    assert {k: len(v) for k, v in ids.items()} == {"train": 100, "val": 30, "calib": 30, "test": 40}


def test_fractions_that_leave_no_training_rows_are_refused():
    with pytest.raises(UserError, match=r"data.val_fraction \+ data.test_fraction \+ data.calib_fraction must be < 1"):
        load_config(["data.val_fraction=0.4", "data.test_fraction=0.3", "data.calib_fraction=0.3"])
    with pytest.raises(UserError, match=r"data.calib_fraction must be in \(0, 1\)"):
        load_config(["data.calib_fraction=0"])


def test_a_class_without_calibration_rows_is_refused(tmp_path):
    frame = pd.DataFrame({"a": np.arange(206, dtype=float),
                          "label": ["big"] * 100 + ["other"] * 100 + ["rare"] * 6})
    path = tmp_path / "rare.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"^data.calib_fraction=0.02 leaves class 'rare' with no calibration rows"):
        prepare(_csv_cfg(path, "data.ood_classes=[]", "data.calib_fraction=0.02"), 0)
    with pytest.raises(UserError, match=r"^data.calib_fraction=0.005 leaves class '\w+' with no calibration rows"):
        prepare(_csv_cfg(path, "data.ood_classes=[]", "data.calib_fraction=0.005"), 0)  # 1 row for 3 classes
    digits = load_config(["data.calib_fraction=0.003"])  # class names read from the data, not typed in a CSV
    with pytest.raises(UserError, match=r"^data.calib_fraction=0.003 leaves class '\d' with no calibration rows"):
        prepare(digits.data, digits.seed)


def test_a_calibration_split_too_small_for_alpha_is_refused(tmp_path):
    from dl_uncertainty.preprocess import _task

    cfg = load_config([f"data_dir={tmp_path}", "evaluate.alpha=0.001"])  # needs 999 calibration rows, has 217
    with pytest.raises(UserError, match=r"the calibration split has 217 rows, too few for evaluate.alpha=0.001 "
                                        r".*999 rows.*data.calib_fraction or evaluate.alpha"):
        _task(cfg)
    assert not (tmp_path / "calib.npz").exists()


def test_image_splits_have_a_calibration_split_too():
    from dl_uncertainty.data.image_splits import make_splits

    rng = np.random.default_rng(0)
    labels = np.repeat(["circle", "square", "star"], 40)
    pixels = rng.integers(0, 256, (120, 1, 4, 4), dtype=np.uint8)
    cfg = load_config(["data=image_folder", "data.path=unused", "data.ood_classes=[star]"]).data
    splits = make_splits(pixels, labels, cfg, 0)
    assert {k: len(v.y) for k, v in splits.items()} == {"train": 40, "val": 12, "calib": 12, "test": 16, "ood": 40}
    test = (rng.integers(0, 256, (10, 1, 4, 4), dtype=np.uint8), np.repeat(["circle", "square"], 5))
    fixed = make_splits(pixels[:80], labels[:80], load_config(["data=image_folder", "data.path=unused",
                                                               "data.ood_classes=[]"]).data, 0, test=test)
    # a benchmark's own test set: val and calib are shares of the training images
    assert {k: len(v.y) for k, v in fixed.items()} == {"train": 56, "val": 12, "calib": 12, "test": 10, "ood": 0}
