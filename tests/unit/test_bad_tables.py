"""Tables and NPZ files a new user could bring: each is read, or refused in one line naming the file,
the key and the fix; too rare classes are a warning naming their rows per split."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.tables import check_raw, prepare
from dl_uncertainty.errors import UserError
from tests.conftest import REPO


def csv_cfg(path, *overrides):
    return load_config(["data=csv", f"data.path={path}", *overrides]).data


def npz_cfg(path, *overrides):
    return load_config(["data=npz", f"data.path={path}", *overrides]).data


def table(tmp_path, text: str, name: str = "t.csv"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


def test_a_class_too_rare_for_every_split_stays_in_train_with_one_warning_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = "".join(f"{v:.3f},{w:.3f},0\n" for v, w in rng.normal(size=(1000, 2))) + "5,5,1\n6,6,1\n"
    splits = prepare(csv_cfg(table(tmp_path, "a,b,label\n" + rows)), seed=0)
    assert [int((splits[p].y == 1).sum()) for p in ("train", "val", "test")] == [2, 0, 0]
    warning = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert warning == ["warning: too few rows to put every class in every split ('1' 2 train, 0 validation, 0 test), "
                       "so validation or test says nothing about it; about 8 rows per class put one in each: add rows "
                       "of it, raise data.val_fraction / data.test_fraction, or remove its rows from the data"]


def test_a_class_of_one_row_is_kept_in_train_not_a_scikit_learn_error(tmp_path, capsys):
    rows = "".join(f"{i},{i % 3}\n" for i in range(60)) + "9,rare\n"
    splits = prepare(csv_cfg(table(tmp_path, "a,label\n" + rows)), seed=0)
    rare = splits["train"].schema.class_names.index("rare")
    assert int((splits["train"].y == rare).sum()) == 1
    assert "'rare' 1 train, 0 validation, 0 test" in capsys.readouterr().err


def test_balanced_data_gives_no_warning(tmp_path, capsys):
    prepare(csv_cfg(table(tmp_path, "a,label\n" + "".join(f"{i},{i % 3}\n" for i in range(60)))), seed=0)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(("rows", "overrides", "message"), [
    ("".join(f"{i},x\n" for i in range(9)), [], r"^the data needs at least two classes, found: x \(9 rows\); check "
     r"data.label_column \(or the class sub-folders\), or add rows of another class$"),
    ("".join(f"{i},{i % 2}\n" for i in range(30)), ["data.ood_classes=[1]"], r"^data.ood_classes=\['1'\] leaves 1 class "
     r"to train on, .*found: 0 \(15 rows\), 1 \(15 rows\); hold out fewer classes$"),
    ("".join(f"{i},{i}\n" for i in range(30)), [], r"^every label occurs once \(30 rows, 30 classes\).*check that "
     r"data.label_column is the label"),
    ("".join(f"{i},{i % 5}\n" for i in range(10)), [], r"^data.test_fraction=0.2 gives the test split 2 of 10 rows, "
     r"fewer than the 5 classes it must hold one row of; raise data.test_fraction or add rows$"),
    ("".join(f"{i},{i % 5}\n" for i in range(10)), ["data.test_fraction=0.6", "data.val_fraction=0.1"],
     r"^data.test_fraction=0.6 leaves 4 of 10 rows outside the test split, fewer than the 5 classes"),
])
def test_splits_that_cannot_be_made_are_refused_before_any_task_and_in_it(tmp_path, rows, overrides, message):
    cfg = csv_cfg(table(tmp_path, "a,label\n" + rows), *overrides)
    for step in (check_raw, lambda c: prepare(c, seed=0)):  # run-local's pre-check, and preprocess itself
        with pytest.raises(UserError, match=message):
            step(cfg)


def test_a_validation_split_too_small_for_the_classes_says_so_in_our_words(tmp_path):
    rows = "".join(f"{i},{i % 10}\n" for i in range(40))  # test and calibration hold 10 each; 20 left, 2 for validation
    cfg = csv_cfg(table(tmp_path, "a,label\n" + rows), "data.test_fraction=0.25", "data.calib_fraction=0.25",
                  "data.val_fraction=0.05")
    with pytest.raises(UserError, match=r"^data.val_fraction=0.05 gives the validation split 2 of 20 rows, fewer than "
                                        r"the 10 classes it must hold one row of; raise data.val_fraction or add rows$"):
        prepare(cfg, seed=0)


# ---------------------------------------------------------------- numbers written as text


@pytest.mark.parametrize(("text", "overrides", "hint"), [
    ("a;label\n" + "".join(f"{i},5;{i % 2}\n" for i in range(20)), [],
     r"line 2 holds '0,5' \(20 such values\); they look like numbers with a decimal comma: set data.decimal=comma$"),
    ("a,label\n" + "".join(f'"{i + 1},{i * 7:03d}",{i % 2}\n' for i in range(20)), [],
     r"holds '1,000' .*thousands separator \(data.thousands=comma\) or a decimal comma \(data.decimal=comma\)"),
    ("a,label\n" + "".join(f'"{i + 1},{i * 7:03d},000",{i % 2}\n' for i in range(20)), [],
     r"they look like numbers with a thousands separator: set data.thousands=comma$"),
    ("a;label\n" + "".join(f"{i + 1}.{i * 7:03d},5;{i % 2}\n" for i in range(20)), [],
     r"decimal comma and points between thousands \(1.234,5\): set data.decimal=comma data.thousands=point$"),
    ("a;label\n" + "".join(f"{i + 1} {i * 7:03d};{i % 2}\n" for i in range(20)), [],
     r"set data.thousands=space$"),
    ("a,b,label\n" + "".join(f"{i},{'red' if i == 5 else i},{i % 2}\n" for i in range(20)), [],
     r"line 7 holds 'red' \(1 such value\); every feature column must hold numbers: remove or encode "
     r"text columns, or set data.label_column if this is the label$"),
])
def test_numbers_as_text_say_which_setting_reads_them(tmp_path, text, overrides, hint):
    with pytest.raises(UserError, match=r"^feature column .* in .*t.csv is not numeric: .*" + hint):
        check_raw(csv_cfg(table(tmp_path, text), *overrides))


@pytest.mark.parametrize(("text", "overrides", "expected"), [
    ("a;label\n" + "".join(f"{i},5;{i % 2}\n" for i in range(20)), ["data.decimal=comma"], 3.5),
    ("a,label\n" + "".join(f'"{i + 1},{i * 7:03d}",{i % 2}\n' for i in range(20)), ["data.thousands=comma"], 4021),
    ("a;label\n" + "".join(f"{i + 1}.{i * 7:03d},5;{i % 2}\n" for i in range(20)),
     ["data.decimal=comma", "data.thousands=point"], 4021.5),
])
def test_decimal_and_thousands_keys_read_those_numbers(tmp_path, text, overrides, expected):
    from dl_uncertainty.data.tables import load_raw

    frame, _, _ = load_raw(csv_cfg(table(tmp_path, text), *overrides))
    assert frame["a"].dtype == np.float64 and frame["a"].iloc[3] == expected


def test_an_unquoted_comma_in_a_comma_separated_file_says_to_quote_it(tmp_path):
    text = "a,b,label\n1,2,x\n3,5,4,y\n"
    with pytest.raises(UserError, match=r"Expected 3 fields in line 3, saw 4; a value holding the separator .* must be "
                                        r"quoted, or set data.separator"):
        check_raw(csv_cfg(table(tmp_path, text)))


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.decimal=comma", "data.thousands=comma"], "data.thousands and data.decimal must differ"),
    (["data.decimal=ab"], "data.decimal must be point, comma or one character"),
    (["data.thousands=dots"], "data.thousands must be null, comma, point, space, apostrophe or one character"),
])
def test_bad_decimal_and_thousands_values_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(["data=csv", "data.path=t.csv", *overrides])


# ---------------------------------------------------------------- NPZ archives


def save_npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(("arrays", "message"), [
    ({"X": np.zeros((4, 2)), "labels": np.zeros(4)}, r"holds the arrays 'X', 'labels' but needs 'x' \(features, one "
     r"row per example\) and 'y' \(labels\); 'x' and 'y' missing: save it with np.savez\(path, x=features, y=labels\)$"),
    ({"x": np.zeros((4, 2))}, r"holds the arrays 'x' but needs .*; 'y' missing"),
    ({"x": np.array([{"a": 1}] * 4, dtype=object), "y": np.zeros(4)}, r"'x' is an array of Python objects, which is "
     r"not loaded \(unpickling can run code\); save numbers instead"),
    ({"x": np.zeros((4, 2)), "y": np.array([None] * 4, dtype=object)}, r"'y' is an array of Python objects"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, r"x has 4 rows but y has 3; they must have one row per example each$"),
    ({"x": np.zeros((0, 2)), "y": np.zeros(0)}, r"holds no examples \(x has shape \(0, 2\)\)$"),
    ({"x": np.zeros((4, 2)), "y": np.eye(4)}, r"y must hold one label per row, got shape \(4, 4\) \(one-hot\? save "
     r"y.argmax\(axis=1\)\)$"),
    ({"x": np.array(["a", "b"] * 2), "y": np.zeros(4)}, r"x must hold real numbers, got dtype <U1"),
    ({"x": np.zeros((4, 2), complex), "y": np.zeros(4)}, r"x must hold real numbers, got dtype complex128"),
    ({"x": np.float64(3.0), "y": np.zeros(4)}, r"x and y must be arrays with one entry per example"),
    ({"x": np.zeros((4, 0)), "y": np.zeros(4)}, r"x has shape \(4, 0\), no features per example$"),
])
def test_bad_npz_archives_say_what_they_hold_and_what_is_needed(tmp_path, arrays, message):
    with pytest.raises(UserError, match=r"d.npz.*" + message) as err:
        check_raw(npz_cfg(save_npz(tmp_path, **arrays)))
    assert "\n" not in str(err.value) and "is not a file in the archive" not in str(err.value)


@pytest.mark.parametrize(("content", "message"), [
    (b"", r"is not a NumPy .npz archive"),
    (b"x,y\n1,2\n", r"is not a NumPy .npz archive"),
    (None, r"holds one array \(an .npy file\), not an .npz archive of x and y"),
])
def test_files_that_are_no_npz_archive_say_so(tmp_path, content, message):
    path = tmp_path / "d.npz"
    if content is None:
        with open(path, "wb") as fh:
            np.save(fh, np.zeros((4, 2)))
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        check_raw(npz_cfg(path))


def test_one_value_per_example_is_one_feature(tmp_path):
    splits = prepare(npz_cfg(save_npz(tmp_path, x=np.arange(40.0), y=np.arange(40) % 2)), seed=0)
    assert splits["train"].schema.feature_shape == [1] and splits["train"].x.shape[1] == 1


def test_three_dimensional_x_is_one_channel_images(tmp_path):
    rng = np.random.default_rng(0)
    splits = prepare(npz_cfg(save_npz(tmp_path, x=rng.random((40, 5, 6)), y=np.arange(40) % 2)), seed=0)
    assert splits["train"].schema.feature_shape == [1, 5, 6]


# ---------------------------------------------------------------- the command line


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=180, cwd=cwd,
                          env={"PYTHONPATH": f"{REPO / 'src'}:{REPO}", "PATH": "/usr/bin:/bin"})


def test_preprocess_says_a_decimal_comma_in_one_line_and_writes_nothing(tmp_path):
    table(tmp_path, "a;label\n" + "".join(f"{i},5;{i % 2}\n" for i in range(20)))
    proc = run("dl_uncertainty.preprocess", "data=csv", "data.path=t.csv", "data_dir=out", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        "error: feature column 'a' in t.csv is not numeric: line 2 holds '0,5' (20 such values); they look like "
        "numbers with a decimal comma: set data.decimal=comma"]
    assert not list((tmp_path / "out").glob("*.npz")) if (tmp_path / "out").exists() else True
    ok = run("dl_uncertainty.preprocess", "data=csv", "data.path=t.csv", "data_dir=out", "data.decimal=comma",
             "data.calib_fraction=0.5", cwd=tmp_path)  # 10 calibration rows: enough for evaluate.alpha=0.1
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.npz")) == ["calib.npz", "ood.npz", "test.npz", "train.npz", "val.npz"]


# ---------------------------------------------------------------- a corpus of other first-day files


@pytest.mark.parametrize(("text", "message"), [
    ("a,b,c,label\n" + "".join(f"{i},,{i},{i % 3}\n" for i in range(30)),
     r"^column \['b'\] of .*t.csv is empty \(or NaN\) in every row; remove it \(a separator at the end of every line"),
    ("a,b,label,\n" + "".join(f"{i},{i},{i % 3},\n" for i in range(30)), r"column \['Unnamed: 3'\] .* is empty"),
    ("a,b,label\n" + "".join(f"{1e308 if i % 2 else -1e308},{i},{i % 3}\n" for i in range(30)),
     r"^column 'a' of .*t.csv holds 1e\+308, beyond what float32 features hold \(about 3.4e\+38\); rescale it$"),
])
def test_columns_no_model_can_use_are_named(tmp_path, text, message):
    cfg = csv_cfg(table(tmp_path, text))
    for step in (check_raw, lambda c: prepare(c, seed=0)):
        with pytest.raises(UserError, match=message):
            step(cfg)


def test_an_npz_of_nan_features_is_refused_not_trained_on_zeros(tmp_path):
    with pytest.raises(UserError, match=r"columns \['feature_0', 'feature_1'\] of .*d.npz are empty \(or NaN\) in "
                                        r"every row; remove them$"):
        prepare(npz_cfg(save_npz(tmp_path, x=np.full((30, 2), np.nan), y=np.arange(30) % 2)), seed=0)


def test_numeric_labels_written_two_ways_are_one_class(tmp_path):
    text = "a,label\n" + "".join(f"{i},{'1.0' if i % 4 == 1 else i % 2}\n" for i in range(40))
    assert prepare(csv_cfg(table(tmp_path, text)), seed=0)["train"].schema.class_names == ["0", "1"]


def test_a_folder_as_data_path_says_it_is_a_folder(tmp_path):
    (tmp_path / "t.csv").mkdir()
    with pytest.raises(UserError, match=r"t.csv is a folder, not a file$"):
        check_raw(csv_cfg(tmp_path / "t.csv"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["seed=-1"], r"^seed must be in \[0, 2\*\*32\), got -1$"),
    (["train.lr=inf"], r"^train.lr must be a finite number, got inf$"),
    (["train.weight_decay=inf"], r"^train.weight_decay must be a finite number, got inf$"),
    (["data.outlier_threshold=inf"], r"^data.outlier_threshold must be a finite number, got inf \(data.outliers=none"),
])
def test_config_values_that_would_fail_deep_inside_are_refused_naming_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(overrides)
