"""A corpus of inputs a careful new user could bring, run through the command lines with tiny data.

Each bad one must end in one line, ``error: ...`` naming the key or file, a non-zero exit, no
traceback, no split file written and no MLflow run left FINISHED. Each odd-but-valid one must work.
The commands run in this process (``cli.run``, the same code as ``python -m``) to stay fast; a few
run as real processes."""

from __future__ import annotations

import importlib
import io
import re
import sqlite3

import numpy as np
import pytest
from PIL import Image

from dl_uncertainty import cli
from tests.conftest import free_port, run_module

ROWS = 100  # enough for every split and evaluate.alpha=0.1's calibration rows


def rows_csv(label=lambda i: i % 2, sep=",", n=ROWS) -> str:
    return "".join(f"{i}{sep}{i * 3 % 7}{sep}{label(i)}\n" for i in range(n))


def csv_file(text: str | bytes, name: str = "t.csv"):
    def make(tmp):
        (tmp / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["data=csv", f"data.path={name}"]
    return make


def npz_file(**arrays):
    def make(tmp):
        np.savez(tmp / "d.npz", **arrays)
        return ["data=npz", "data.path=d.npz"]
    return make


def image_folder(damage=lambda root: None, per_class: int = 36, *extra: str):
    def make(tmp):
        root = tmp / "imgs"
        for label in ("a", "b"):
            (root / label).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12, 12), (i * 10, 80 if label == "a" else 0, 0)).save(root / label / f"{i}.png")
        damage(root)
        return ["data=image_folder", "data.path=imgs", "data.image_size=[8,8]", *extra]
    return make


def jpeg_bytes(size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def parquet_file(truncate: bool = False, **columns):
    def make(tmp):
        import pandas as pd

        pd.DataFrame(columns).to_parquet(tmp / "t.parquet")
        if truncate:
            (tmp / "t.parquet").write_bytes((tmp / "t.parquet").read_bytes()[:200])
        return ["data=csv", "data.path=t.parquet"]
    return make


def deleted_run(tmp):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("other"))
    client.set_terminated(run.info.run_id, "FAILED")
    client.delete_run(run.info.run_id)
    return [f"run_id={run.info.run_id}"]


def paths_csv(extra: str = "", header: str = "path,label", sep: str = ","):
    """A CSV of image paths (relative to its folder) and labels, 40 images per class, then ``extra`` rows."""
    def make(tmp):
        (tmp / "pics").mkdir()
        for i in range(80):
            Image.new("RGB", (10, 10), (i * 3, 0, 0)).save(tmp / "pics" / f"{i}.png")
        rows = "".join(f"pics/{i}.png{sep}{'a' if i % 2 else 'b'}\n" for i in range(80))
        (tmp / "pics.csv").write_text(f"{header}\n{rows}{extra}")
        return ["data=image_folder", "data.path=pics.csv", "data.image_size=[8,8]"]
    return make


def given(*overrides: str):
    return lambda tmp: list(overrides)


X = np.random.default_rng(0).normal(size=(ROWS, 3))
Y = np.arange(ROWS) % 2

# (id, command, inputs, what the error line must say)
BAD = [
    # ---- tables
    ("empty-csv", "preprocess", csv_file(""), r"t.csv is empty$"),
    ("header-only-csv", "preprocess", csv_file("a,b,label\n"), r"t.csv has a header but no rows$"),
    ("binary-as-csv", "preprocess", csv_file(b"\x00\x01\xff" * 50), r"t.csv is a binary file, not a CSV"),
    ("utf16-csv-without-bom", "preprocess", csv_file(("a,b,label\n" + rows_csv()).encode("utf-16-le")),
     r"binary file, not a CSV \(or set data.encoding, e.g. utf-16\)$"),
    ("latin1-csv", "preprocess", csv_file(("a,b,label\n" + rows_csv(lambda i: "é" if i % 2 else "e")).encode("latin-1")),
     r"not utf-8 text .*data.encoding=latin-1$"),
    ("duplicate-columns", "preprocess", csv_file("a,a,label\n" + rows_csv()), r"duplicated column names \['a'\]"),
    ("label-all-blank", "preprocess", csv_file("a,b,label\n" + rows_csv(lambda i: "")),
     r"100 rows of .*t.csv have a blank 'label' .*data.blank_labels=drop$"),
    ("inf-values", "preprocess", csv_file("a,b,label\n" + rows_csv().replace("5,", "inf,", 1)),
     r"1 infinite values .*data.non_finite=drop"),
    ("label-column-typo", "preprocess", lambda tmp: [*csv_file("a,b,label\n" + rows_csv())(tmp), "data.label_column=lable"],
     r"label column 'lable' not in .*columns found .*: a, b, label\); set data.label_column"),
    ("label-column-only", "preprocess", csv_file("label\n" + "".join(f"{i % 2}\n" for i in range(ROWS))),
     r"no feature columns besides 'label'$"),
    ("single-class", "preprocess", csv_file("a,b,label\n" + rows_csv(lambda i: "cat")), r"at least two classes, found: cat"),
    ("one-row-per-class", "preprocess", csv_file("a,b,label\n" + rows_csv(lambda i: f"c{i}", n=30)),
     r"every label occurs once \(30 rows, 30 classes\)"),
    ("ood-leaves-one-class", "preprocess", lambda tmp: [*csv_file("a,b,label\n" + rows_csv())(tmp), "data.ood_classes=[1]"],
     r"data.ood_classes=\['1'\] leaves 1 class to train on"),
    ("ood-class-not-in-data", "preprocess", lambda tmp: [*csv_file("a,b,label\n" + rows_csv())(tmp), "data.ood_classes=[7]"],
     r"data.ood_classes \['7'\] are not labels in the data$"),
    ("thousands-separators", "preprocess", csv_file("a,b,label\n" + "".join(f'"1,{i:03d}",{i},{i % 2}\n' for i in range(ROWS))),
     r"holds '1,000' .*data.thousands=comma"),
    ("decimal-commas", "preprocess", csv_file("a;b;label\n" + "".join(f"{i},5;{i};{i % 2}\n" for i in range(ROWS))),
     r"holds '0,5' .*set data.decimal=comma$"),
    ("text-feature", "preprocess", csv_file("a,b,label\n" + rows_csv().replace("4,5,0", "4,red,0")),
     r"feature column 'b' .* holds 'red'"),
    ("empty-column", "preprocess", csv_file("a,b,label\n" + "".join(f"{i},,{i % 2}\n" for i in range(ROWS))),
     r"column \['b'\] of .*t.csv is empty \(or NaN\) in every row"),
    ("unquoted-separator", "preprocess", csv_file("a,b,label\n" + rows_csv() + "1,2,3,0\n"),
     r"Expected 3 fields .*must be quoted, or set data.separator"),
    ("folder-as-csv", "preprocess", lambda tmp: ((tmp / "t.csv").mkdir(), ["data=csv", "data.path=t.csv"])[1],
     r"t.csv is a folder, not a file$"),
    ("missing-csv", "preprocess", given("data=csv", "data.path=nope.csv"), r"data file not found: nope.csv$"),
    ("path-too-long", "preprocess", given("data=csv", f"data.path={'x' * 300}.csv"), r"\(File name too long\); check data.path$"),
    ("link-loop-as-csv", "preprocess", lambda tmp: ((tmp / "l1.csv").symlink_to("l2.csv"),
                                                    (tmp / "l2.csv").symlink_to("l1.csv"), ["data=csv", "data.path=l1.csv"])[2],
     r"l1.csv \(a symbolic link to nothing, or a loop of links\)$"),
    ("http-url", "preprocess", given("data=csv", "data.path=https://example.com/t.csv"),
     r"only local paths and s3://bucket/key URIs are read"),
    ("parquet-blank-label", "preprocess", parquet_file(a=X[:, 0], label=np.where(np.arange(ROWS) == 4, None, Y.astype(str))),
     r"1 rows of t.parquet have a blank 'label' \(first on row 4\)"),
    ("parquet-text-feature", "preprocess", parquet_file(a=X[:, 0], s=["q"] * ROWS, label=Y),
     r"feature column 's' in t.parquet is not numeric: row 0 holds 'q'"),
    ("parquet-truncated", "preprocess", parquet_file(True, a=X[:, 0], label=Y), r"t.parquet is not a readable Parquet file"),
    # ---- NPZ archives
    ("npz-wrong-keys", "preprocess", npz_file(X=X, labels=Y), r"holds the arrays 'X', 'labels' but needs 'x' .*np.savez"),
    ("npz-object-arrays", "preprocess", npz_file(x=np.array([{"a": 1}] * ROWS, dtype=object), y=Y),
     r"'x' is an array of Python objects"),
    ("npz-length-mismatch", "preprocess", npz_file(x=X, y=Y[:90]), r"x has 100 rows but y has 90"),
    ("npz-nan-label", "preprocess", npz_file(x=X, y=np.where(np.arange(ROWS) == 3, np.nan, Y)),
     r"1 labels in .*d.npz's y are blank \(NaN or empty; first at row 3\)"),
    ("npz-one-hot-y", "preprocess", npz_file(x=X, y=np.eye(2)[Y]), r"y must hold one label per row, got shape \(100, 2\)"),
    ("csv-named-npz", "preprocess", lambda tmp: ((tmp / "d.npz").write_text("x,y\n1,2\n"), ["data=npz", "data.path=d.npz"])[1],
     r"is not a NumPy .npz archive"),
    # ---- image folders
    ("zero-byte-png", "preprocess", image_folder(lambda r: (r / "a" / "z.png").write_bytes(b"")), r"z.png is an empty file"),
    ("text-as-png", "preprocess", image_folder(lambda r: (r / "a" / "z.png").write_text("hello")),
     r"z.png is not a readable image"),
    ("truncated-jpeg", "preprocess", image_folder(lambda r: (r / "b" / "t.jpg").write_bytes(jpeg_bytes()[:-600])),
     r"t.jpg is truncated: the file ends before its image does"),
    ("empty-class-folder", "preprocess", image_folder(lambda r: (r / "c").mkdir()), r"class folder .*imgs/c has no images$"),
    ("one-class-folder", "preprocess", image_folder(lambda r: [p.unlink() for p in (r / "b").iterdir()] and (r / "b").rmdir()),
     r"at least two classes, found: a"),
    ("sizes-differ-unresized", "preprocess", lambda tmp: [*image_folder(lambda r: Image.new("RGB", (13, 12)).save(
        r / "b" / "wide.png"))(tmp), "data.image_size=null"], r"images differ in size: .* set data.image_size"),
    ("no-class-folders", "preprocess", lambda tmp: ((tmp / "flat").mkdir(), Image.new("RGB", (8, 8)).save(tmp / "flat" / "a.png"),
                                                   ["data=image_folder", "data.path=flat"])[2], r"flat has no class sub-folders"),
    ("paths-csv-missing-image", "preprocess", paths_csv("pics/nope.png,a\n"),
     r"pics.csv line 82: image ./pics/nope.png not found \(relative paths start at the CSV's folder, .\)"),
    ("paths-csv-folder-as-image", "preprocess", paths_csv("pics,a\n"), r"line 82: image ./pics is a folder, not an image"),
    ("paths-csv-no-path-column", "preprocess", paths_csv(header="file,label"),
     r"needs a header with columns 'path' and 'label' .*\(found: file, label\)"),
    ("image-folder-missing", "preprocess", given("data=image_folder", "data.path=nowhere"), r"image folder not found: nowhere$"),
    # ---- config values and overrides
    ("typo-key", "preprocess", given("trian.epochs=3"), r"Key 'trian' not in 'Config'"),
    ("typo-added-key", "preprocess", given("+train.epochz=3"), r"adds train.epochz, .*did you mean train.epochs\?"),
    ("interval-under-multirun", "train", given("--multirun", "train.lr=interval(0.001,0.1)"),
     r"--multirun runs lists \(a,b,c\) and range\(start, stop\); interval\(\) is sampled by .*dl_uncertainty.tune$"),
    ("interpolation-of-no-key", "train", given("train.epochs=${nope}"), r"Interpolation key 'nope' not found"),
    ("sweep-without-multirun", "train", given("train.lr=0.1,0.01"), r"Ambiguous value for argument 'train.lr=0.1,0.01'"),
    ("epochs-zero", "train", given("train.epochs=0"), r"train.epochs must be >= 1, got 0$"),
    ("epochs-negative", "train", given("train.epochs=-1"), r"train.epochs must be >= 1, got -1$"),
    ("batch-size-zero", "train", given("train.batch_size=0"), r"train.batch_size must be >= 1"),
    ("lr-negative", "train", given("train.lr=-0.1"), r"train.lr must be > 0"),
    ("lr-text", "train", given("train.lr=fast"), r"train.lr=fast .*could not be converted to Float"),
    ("mc-samples-zero", "evaluate", given("evaluate.mc_samples=0"), r"evaluate.mc_samples must be >= 1"),
    ("mc-samples-huge", "train", given("evaluate.mc_samples=100000000000"), r"evaluate.mc_samples=100000000000 needs about "
     r"[\d,]+ GiB .*lower evaluate.mc_samples"),
    ("alpha-above-one", "train", given("evaluate.alpha=1.5"), r"evaluate.alpha must be in \(0, 1\), got 1.5$"),
    ("alpha-zero", "train", given("evaluate.alpha=0"), r"evaluate.alpha must be in \(0, 1\), got 0.0$"),
    ("seed-text", "train", given("seed=abc"), r"seed=abc .*could not be converted to Integer"),
    ("unknown-model", "train", given("model=resnet50"), r"Could not find 'model/resnet50'"),
    ("unknown-device", "train", given("device=gpu"), r"device='gpu' is not auto, cpu, cuda or cuda:N$"),
    ("empty-data-dir", "preprocess", given("data_dir="), r"data_dir is empty"),
    ("checksum-not-md5", "preprocess", given("data=mnist", "data.checksums=[mnist/train-images-idx3-ubyte.gz:abc]"),
     r"data.checksums\['mnist/train-images-idx3-ubyte.gz'\] must be an MD5"),
    ("tuned-before-tuning", "train", given("+tuned=bnn"), r"there is no .*tuned folder yet; `make tune`"),
    # ---- MLflow run ids
    ("run-id-missing", "evaluate", given(), r"set run_id=<MLflow run id>"),
    ("run-id-unknown", "evaluate", given("run_id=0123456789abcdef0123456789abcdef"), r"no MLflow run 0123456789abcdef"),
    ("run-id-deleted", "evaluate", deleted_run, r"MLflow run \w+ is deleted; restore it first"),
    ("run-id-models-uri", "evaluate", given("run_id=models:/dl-uncertainty-digits-1x8x8@champion"),
     r"is a URI, not a run id"),
]


def run_in_process(command: str, argv: list[str], capsys) -> tuple[int, str, str]:
    module = importlib.import_module(f"dl_uncertainty.{command}")
    try:
        cli.run(command, module.__doc__, module._task, argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def finished_runs(folder, db: str = "mlflow.db") -> list[str]:
    db = folder / db
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return [row[0] for row in con.execute("select run_uuid from runs where status = 'FINISHED'")]


def assert_one_error_line(code, stderr: str, message: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code not in (0, None), stderr
    assert "Traceback" not in stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]]
    assert re.search(message, lines[-1]), lines[-1]
    return lines[-1]


@pytest.mark.parametrize(("command", "make", "message"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_a_bad_input_is_one_error_line_and_leaves_nothing_behind(in_tmp, capsys, command, make, message):
    argv = make(in_tmp)
    if command == "preprocess" and not any(a.startswith("data_dir=") for a in argv):
        argv.append("data_dir=out")
    code, stderr, _ = run_in_process(command, argv, capsys)
    assert_one_error_line(code, stderr, message)
    assert not list(in_tmp.glob("out/*.npz"))
    assert finished_runs(in_tmp) == []


GOOD = [
    ("bom", csv_file("\ufeffa,b,label\n" + rows_csv())),
    ("semicolons", csv_file("a;b;label\n" + rows_csv(sep=";"))),
    ("utf16-with-bom-tab-separated", csv_file(("a\tb\tlabel\n" + rows_csv(sep="\t")).encode("utf-16"))),
    ("crlf", csv_file(("a,b,label\n" + rows_csv()).replace("\n", "\r\n"))),
    ("spaces-after-separators", csv_file("a, b, label\n" + rows_csv(sep=", "))),
    ("unicode-class-names", csv_file("a,b,label\n" + rows_csv(lambda i: "猫" if i % 2 else "čaj"))),
    ("decimal-comma-set", lambda tmp: [*csv_file("a;b;label\n" + "".join(f"{i},5;{i};{i % 2}\n" for i in range(ROWS)))(tmp),
                                       "data.decimal=comma"]),
    ("parquet-float-labels", parquet_file(a=X[:, 0], b=X[:, 1], label=Y.astype(float))),
    ("npz-float-labels-that-are-integers", npz_file(x=X, y=Y.astype(float))),
    ("npz-string-labels", npz_file(x=X, y=np.array(["no", "yes"])[Y])),
    ("npz-compressed-int8", lambda tmp: (np.savez_compressed(tmp / "d.npz", x=(X * 10).astype(np.int8), y=Y),
                                         ["data=npz", "data.path=d.npz"])[1]),
    ("paths-csv-semicolons-and-spaces", paths_csv(header="path; label", sep="; ")),
    ("hidden-and-system-files", image_folder(lambda r: [(r / "a" / n).write_bytes(b"\0junk")
                                                        for n in (".DS_Store", "Thumbs.db", "desktop.ini")])),
    ("mixed-modes-and-sizes", image_folder(lambda r: [Image.new(m, (10 + i, 9), 1).save(r / "b" / f"m{i}.png")
                                                      for i, m in enumerate(["RGBA", "P", "LA", "L", "1", "I;16"])])),
    ("cmyk-jpeg-padded-after-its-end", image_folder(lambda r: (Image.new("CMYK", (12, 12)).save(r / "a" / "c.jpg"),
                                                               (r / "b" / "p.jpg").write_bytes(jpeg_bytes() + b"\0" * 300)))),
]


@pytest.mark.parametrize("make", [case[1] for case in GOOD], ids=[case[0] for case in GOOD])
def test_an_odd_but_valid_input_is_read(in_tmp, capsys, make):
    code, stderr, _ = run_in_process("preprocess", [*make(in_tmp), "data_dir=out"], capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in (in_tmp / "out").glob("*.npz")) == ["calib.npz", "ood.npz", "test.npz", "train.npz",
                                                                         "val.npz"]


def test_channels_last_images_in_an_npz_become_channels_first(in_tmp):
    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.data.npz import read_npz

    images = np.random.default_rng(0).integers(0, 255, (ROWS, 8, 6, 3), dtype=np.uint8)  # N, H, W, C
    npz_file(x=images, y=Y)(in_tmp)
    frame, _, shape = read_npz(load_config(["data=npz", "data.path=d.npz"]).data)
    assert shape == [3, 8, 6]
    assert np.array_equal(frame.to_numpy()[5].reshape(3, 8, 6), images[5].transpose(2, 0, 1))


def test_checksums_as_a_list_of_file_md5_pairs_with_a_quoted_key_under_multirun(in_tmp, capsys):
    md5 = "12345678901234567890123456789012"  # digits only: still read as text
    code, err, out = run_in_process("preprocess", ["--multirun", "--cfg", "data=mnist", "seed=1,2",
                                                   f"data.checksums=['mnist/train-images-idx3-ubyte.gz':{md5},"
                                                   f"mnist/t10k-images-idx3-ubyte.gz:{md5}]"], capsys)
    assert code == 0, err
    for file in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        assert out.count(f"mnist/{file}: '{md5}'") == 2  # in both jobs' configs


def test_a_failed_resume_leaves_the_earlier_successful_run_finished(in_tmp, capsys):
    """The resume passes its checks, continues the finished run, then fails after training (a singular
    feature density): one error line, and the earlier run is still FINISHED."""
    x = np.random.default_rng(0).normal(size=(80, 3))
    (in_tmp / "t.csv").write_text("a,b,c,label\n" + "".join(f"{a:.3f},{b:.3f},{c:.3f},{int(a > 0)}\n" for a, b, c in x))
    base = ["data=csv", "data.path=t.csv", "data.calib_fraction=0.2", "model=mc_dropout_dnn",
            "tracking_uri=sqlite:///runs.db"]  # not MLflow's default store: the resume must read this one
    code, stderr, _ = run_in_process("train", [*base, "train.epochs=1"], capsys)
    assert code == 0, stderr
    (first,) = finished_runs(in_tmp, "runs.db")
    # a fresh process: the continued run's status is read from its store before anything set MLflow up
    proc = run_module("dl_uncertainty.train", *base, "train.epochs=2", "train.resume=true", "evaluate.density_ridge=0",
                      cwd=in_tmp, timeout=180)
    assert_one_error_line(proc.returncode, proc.stderr, r"cannot fit the feature density.*evaluate.density_ridge")
    assert finished_runs(in_tmp, "runs.db") == [first]


@pytest.mark.parametrize(("module", "args", "env", "message"), [
    ("dl_uncertainty.train", ["train.epochs=1"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"},
     r"cannot reach the MLflow tracking server at http://127.0.0.1:\d+ .*unset MLFLOW_TRACKING_URI"),
    ("dl_uncertainty.preprocess", ["data=csv", "data.path=t.csv", "data_dir=out"], {},
     r"line 2 holds '0,5' .*set data.decimal=comma$"),
], ids=["tracking-server-down", "decimal-commas"])
def test_the_real_command_lines_say_it_in_one_line(tmp_path, module, args, env, message):
    (tmp_path / "t.csv").write_text("a;label\n" + "".join(f"{i},5;{i % 2}\n" for i in range(ROWS)))
    env = {k: v.format(port=free_port()) for k, v in env.items()}
    proc = run_module(module, *args, cwd=tmp_path, env=env, timeout=120)
    assert_one_error_line(proc.returncode, proc.stderr, message)
    assert not list(tmp_path.glob("out/*.npz")) and finished_runs(tmp_path) == []


@pytest.mark.parametrize(("value", "message"), [
    ("1,5", r"is '1,5'; .*send '1,5' as a JSON number with a decimal point .*1.5 for '1,5'"),
    ("1,234", r"is '1,234'; .*no thousands separators, e.g. .*1234 for '1,234'\)$"),
    ("x,y", r"is 'x,y'; every feature must be a finite number$"),
])
def test_a_served_number_written_with_commas_says_how_to_send_it(in_tmp, value, message):
    """The body a request brings, parsed and turned into rows as the server does (no model needed)."""
    import json

    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.data.rows import raw_to_rows
    from dl_uncertainty.data.tables import prepare
    from dl_uncertainty.errors import UserError
    from dl_uncertainty.serve import parse

    csv_file("a,b,label\n" + rows_csv())(in_tmp)
    schema = prepare(load_config(["data=csv", "data.path=t.csv"]).data, seed=0)["train"].schema
    assert raw_to_rows(parse(json.dumps({"inputs": [["7", 2]]}).encode()), schema).shape == (1, 2)
    with pytest.raises(UserError, match=message):
        raw_to_rows(parse(json.dumps({"inputs": [[value, 2]]}).encode()), schema)
