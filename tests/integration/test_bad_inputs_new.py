"""More inputs a careful new user could bring: packed tables, workbooks, notes and system folders
beside images, config values of the wrong shape, and request bodies the served model must read or
refuse in one sentence (nested rows, single numbers, absurd magnitudes, compressed bodies)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import zipfile
import zlib
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.integration.test_bad_inputs_more import (
    ROWS,
    assert_one_error_line,
    csv_file,
    finished_runs,
    given,
    image_folder,
    npz_file,
    rows_csv,
    run_in_process,
)
from tests.integration.test_serving import post

TABLE = "a,b,label\n" + rows_csv()


def zip_file(members: dict[str, str | bytes], name: str = "t.zip"):
    def make(tmp):
        with zipfile.ZipFile(tmp / name, "w") as archive:
            for member, content in members.items():
                archive.writestr(member, content)
        return ["data=csv", f"data.path={name}"]
    return make


BAD = [
    ("xlsx-workbook", "preprocess", zip_file({"[Content_Types].xml": "x", "xl/workbook.xml": "x"}, "t.xlsx"),
     r"t.xlsx is an Excel workbook \(.xlsx\), not a table; save it as CSV"),
    ("xls-workbook", "preprocess", csv_file(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 500, "t.xls"),
     r"t.xls is an Excel 97-2003 workbook"),
    ("ods-workbook", "preprocess", zip_file({"mimetype": "application/vnd.oasis.opendocument.spreadsheet",
                                             "content.xml": "x"}, "t.ods"), r"t.ods is an OpenDocument file"),
    ("zip-of-two-tables", "preprocess", zip_file({"t.csv": TABLE, "u.csv": TABLE}),
     r"t.zip is a ZIP archive of 2 files \(t.csv, u.csv\); unpack it"),
    ("gzip-cut-short", "preprocess", csv_file(gzip.compress(TABLE.encode())[:60]),
     r"t.csv is gzip-compressed but cannot be unpacked"),
    ("three-rows", "preprocess", csv_file("a,b,label\n1,2,a\n3,4,b\n5,6,a\n"),
     r"the data has 3 rows \(a \(2 rows\), b \(1 rows\)\): too few for test, calibration, validation and train"),
    ("momentum-negative", "train", given("train.optimizer=sgd", "train.momentum=-1"), r"train.momentum must be in \[0, 1\)"),
    ("momentum-one", "train", given("train.optimizer=sgd", "train.momentum=1"), r"train.momentum must be in \[0, 1\)"),
    ("model-typo", "train", given("model=bnnn"), r"Could not find 'model/bnnn'.*\(did you mean model=bnn\?\)$"),
    ("data-typo", "preprocess", given("data=cvs"), r"Could not find 'data/cvs'.*\(did you mean data=csv\?\)$"),
    ("list-key-given-one-value", "preprocess", given("data.image_size=8"),
     r"\(data.image_size is a list: write data.image_size=\[8\]\)$"),
    ("ood-classes-one-value", "preprocess", given("data.ood_classes=8"), r"write data.ood_classes=\[8\]\)$"),
    ("override-without-value", "train", given("train.epochs"), r"an override is key=value: write train.epochs=<value>"),
    ("label-column-needing-quotes", "preprocess", given("data.label_column=a~b"),
     r"\(a value holding ~ must be quoted: data.label_column='a~b'\)$"),
    ("epochs-fraction", "train", given("train.epochs=1.5"), r"train.epochs=1.5 .*could not be converted to Integer"),
]


@pytest.mark.parametrize(("command", "make", "message"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_a_bad_input_is_one_error_line_and_leaves_nothing_behind(in_tmp, capsys, command, make, message):
    argv = make(in_tmp)
    if command == "preprocess":
        argv.append("data_dir=out")
    code, stderr, _ = run_in_process(command, argv, capsys)
    assert_one_error_line(code, stderr, message)
    assert not list(in_tmp.glob("out/*.npz"))
    assert finished_runs(in_tmp) == []


def test_a_run_that_holds_no_model_of_ours_says_so(in_tmp, capsys):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("by hand"))
    client.set_terminated(run.info.run_id, "FINISHED")
    code, stderr, _ = run_in_process("evaluate", [f"run_id={run.info.run_id}"], capsys)
    assert_one_error_line(code, stderr, rf"run {run.info.run_id} holds no model trained by dl_uncertainty")


def macos_and_notebook_leftovers(root):
    (root / "__MACOSX" / "a").mkdir(parents=True)
    (root / "__MACOSX" / "a" / "._0.png").write_bytes(b"\0\5 resource fork")
    (root / "a" / ".ipynb_checkpoints").mkdir()
    (root / "a" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(b"not an image")


def notes_beside_images(root):
    (root / "a" / "README.md").write_text("# where these come from")
    (root / "b" / "labels.csv").write_text("file,label\n")
    (root / "b" / "notes.txt").write_text("shot on a phone")


def deeper_folders_and_odd_images(root):
    (root / "a" / "2024" / "june").mkdir(parents=True)
    Image.new("L", (12, 12), 200).save(root / "a" / "2024" / "june" / "deep.png")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(root / "b" / "tiny.PNG")
    Image.new("P", (12, 12)).save(root / "b" / "palette.gif")


GOOD = [
    ("bom-semicolons-crlf", csv_file(("\ufeffa;b;label\n" + rows_csv(sep=";")).replace("\n", "\r\n"))),
    ("trailing-blank-lines", csv_file(TABLE + "\n\n  \n")),
    ("old-mac-line-ends", csv_file(TABLE.replace("\n", "\r"))),
    ("npz-five-dimensional-x", npz_file(x=np.zeros((ROWS, 1, 1, 4, 4)) + np.arange(ROWS)[:, None, None, None, None],
                                        y=np.arange(ROWS) % 2)),
    ("npz-extra-arrays", npz_file(x=np.arange(ROWS * 3.0).reshape(ROWS, 3), y=np.arange(ROWS) % 2, notes=np.zeros(3))),
    ("macos-and-notebook-leftovers", image_folder(macos_and_notebook_leftovers)),
    ("notes-beside-images", image_folder(notes_beside_images)),
    ("deeper-folders-and-odd-images", image_folder(deeper_folders_and_odd_images)),
]


@pytest.mark.parametrize("make", [case[1] for case in GOOD], ids=[case[0] for case in GOOD])
def test_an_odd_but_valid_input_is_read(in_tmp, capsys, make):
    code, stderr, _ = run_in_process("preprocess", [*make(in_tmp), "data_dir=out"], capsys)
    assert code == 0, stderr
    assert len(list((in_tmp / "out").glob("*.npz"))) == 5


def test_images_beside_notes_and_system_folders_are_exactly_the_class_images(in_tmp):
    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.data.images import list_images

    argv = image_folder(lambda root: (macos_and_notebook_leftovers(root), notes_beside_images(root),
                                      deeper_folders_and_odd_images(root)), 3)(in_tmp)
    files = list_images(load_config(argv).data)
    assert sorted((os.path.relpath(f, in_tmp / "imgs"), label) for f, label in files) == sorted(
        [(f"a/{i}.png", "a") for i in range(3)] + [(f"b/{i}.png", "b") for i in range(3)]
        + [("a/2024/june/deep.png", "a"), ("b/tiny.PNG", "b"), ("b/palette.gif", "b")])


@pytest.mark.parametrize(("name", "packed"), [
    ("t.csv.gz", gzip.compress(TABLE.encode())),
    ("t.csv", bz2.compress(TABLE.encode())),  # packed whatever its name says
    ("t.xz", lzma.compress(TABLE.encode())),
    ("t.zip", None),
])
def test_a_packed_table_gives_the_splits_of_the_table_itself(in_tmp, capsys, name, packed):
    csv_file(TABLE, "plain.csv")(in_tmp)
    if packed is None:
        zip_file({"__MACOSX/._t.csv": b"\0", "t.csv": TABLE})(in_tmp)
    else:
        (in_tmp / name).write_bytes(packed)
    for path, out in (("plain.csv", "plain"), (name, "packed")):
        code, stderr, _ = run_in_process("preprocess", ["data=csv", f"data.path={path}", f"data_dir={out}"], capsys)
        assert code == 0, stderr
    for split in ("train", "val", "calib", "test"):
        plain, packed_split = np.load(in_tmp / "plain" / f"{split}.npz"), np.load(in_tmp / "packed" / f"{split}.npz")
        assert np.array_equal(plain["x"], packed_split["x"]) and np.array_equal(plain["y"], packed_split["y"])


@pytest.mark.parametrize(("override", "file"), [("data.path=~/t.csv", "t.csv"), ("data.path=café&co.csv", "café&co.csv"),
                                                ("data.path=a~b.csv", "a~b.csv")])
def test_a_path_that_hydra_reads_only_quoted_is_read_as_typed(in_tmp, capsys, monkeypatch, override, file):
    monkeypatch.setenv("HOME", str(in_tmp))
    csv_file(TABLE, file)(in_tmp)
    code, stderr, _ = run_in_process("preprocess", ["data=csv", override, "data_dir=~/out"], capsys)
    assert code == 0, stderr
    assert len(list((in_tmp / "out").glob("*.npz"))) == 5


def test_a_gzipped_parquet_table_is_read(in_tmp, capsys):
    frame = pd.DataFrame({"a": np.arange(ROWS, dtype=float), "label": np.arange(ROWS) % 2})
    frame.to_parquet(in_tmp / "t.parquet")
    (in_tmp / "t.parquet.gz").write_bytes(gzip.compress((in_tmp / "t.parquet").read_bytes()))
    code, stderr, _ = run_in_process("preprocess", ["data=csv", "data.path=t.parquet.gz", "data_dir=out"], capsys)
    assert code == 0, stderr


# ---------------------------------------------------------------- the served model

PIXELS = [0, *(int(v) for v in np.random.default_rng(3).integers(0, 17, 63))]  # one digits image: 8 x 8, values 0-16


class Served(NamedTuple):
    url: str
    flat: dict  # the answer to PIXELS sent as one flat row
    run_id: str
    uri: str


@pytest.fixture(scope="module")
def server(tiny_served_model):
    """A one-epoch MC-Dropout model on digits, logged and served from a fresh process."""
    status, flat = post(f"{tiny_served_model.url}/invocations", {"inputs": [PIXELS]})
    assert status == 200, flat
    return Served(tiny_served_model.url, flat, tiny_served_model.run_id, tiny_served_model.uri)


def row(*values):
    return json.dumps({"inputs": [[*values, *PIXELS[len(values):]]]}).encode()


def nested(shape):
    return json.dumps({"inputs": [np.asarray(PIXELS).reshape(shape).tolist()]}).encode()


REFUSED = [
    ("five-deep", b'{"inputs": [[[[[1]]]]]}', {}, "the rows of 'inputs' are nested as (1, 1, 1, 1), 1 value each; "
     "this model takes 64 values per row, flat or nested as (1, 8, 8) or (8, 8) or (8, 8, 1)"),
    ("64-by-1", nested((64, 1)), {}, "nested as (64, 1), 64 values each"),
    ("2-by-32", nested((2, 32)), {}, "nested as (2, 32), 64 values each"),
    ("numbers-not-rows", json.dumps({"inputs": PIXELS}).encode(), {},
     "'inputs' holds 64 single numbers, not rows: this model takes 64 values per row, so send one row as [[v1, ..., v64]]"),
    ("integer-1e20", row(10**20), {}, "row 0 column 'pixel_0' is 1e+20, too large to scale (1.7e+19 times the training "
     "data's spread from its centre)"),
    ("float-1e20", row(1e20), {}, "row 0 column 'pixel_0' is 1e+20, too large to scale"),
    ("beyond-float32", row(1e39), {}, "row 0 column 'pixel_0' is 1e+39, too large to scale"),
    ("negative-1e10", row(0, -1e10), {}, "row 0 column 'pixel_1' is -1e+10, too large to scale"),
    ("nan-literal", b'{"inputs": [[NaN' + b", 0" * 63 + b"]]}", {}, "row 0 column 'pixel_0' is nan"),
    ("infinity-string", row("Infinity"), {}, "row 0 column 'pixel_0' is 'Infinity'; every feature must be a finite number"),
    ("hex-string", row("0x10"), {}, "row 0 column 'pixel_0' is '0x10'"),
    ("empty-row", json.dumps({"inputs": [[]]}).encode(), {}, "expected 64 values per row, got 0"),
    ("very-long-row", json.dumps({"inputs": [[0] * 100_000]}).encode(), {}, "expected 64 values per row, got 100000"),
    ("typo-and-missing-column", json.dumps({"dataframe_records": [{"pixl_0": 1}]}).encode(), {},
     "unknown columns ['pixl_0']; missing columns ['pixel_0'"),
    ("gzip-without-encoding", gzip.compress(row()), {}, "the body is gzip-compressed but says no Content-Encoding"),
    ("brotli", b"\x0b\x02\x80", {"Content-Encoding": "br"}, "Content-Encoding: br is not read"),
    ("not-gzip", b"plain text", {"Content-Encoding": "gzip"}, "the body is not gzip data, as its Content-Encoding says"),
    ("gzip-cut-short", gzip.compress(row())[:40], {"Content-Encoding": "gzip"}, "the gzip body is cut short"),
]


def send(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize(("body", "headers", "says"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_request_the_model_cannot_answer_is_a_400_saying_why(server, body, headers, says):
    status, answer = send(server.url, body, headers)
    assert status == 400, answer
    assert says in answer["error"] and "\n" not in answer["error"], answer


def test_a_gzip_bomb_is_a_413_not_a_full_memory(server):
    bomb = gzip.compress(b" " * (1 << 20)) * 257  # 257 members of 1 MiB each: 260 kB sent
    status, answer = send(server.url, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "unpacks to more than 256 MiB" in answer["error"]


ANSWERED = [
    ("channels-first", nested((1, 8, 8)), {}),
    ("height-by-width", nested((8, 8)), {}),
    ("channels-last", nested((8, 8, 1)), {}),
    ("gzip", gzip.compress(row()), {"Content-Encoding": "gzip"}),
    ("gzip-two-members", gzip.compress(row()[:20]) + gzip.compress(row()[20:]), {"Content-Encoding": "gzip"}),
    ("deflate", zlib.compress(row()), {"Content-Encoding": "deflate"}),
    ("text-plain", row(), {"Content-Type": "text/plain"}),
    ("numbers-as-strings", json.dumps({"inputs": [[str(v) for v in PIXELS]]}).encode(), {}),
    ("columns-in-another-order", json.dumps({"dataframe_records": [
        {f"pixel_{i}": PIXELS[i] for i in reversed(range(64))}]}).encode(), {}),
    ("minus-zero", b'{"inputs": [[-0, ' + ", ".join(map(str, PIXELS[1:])).encode() + b"]]}", {}),
    ("minus-zero-float", b'{"inputs": [[-0.0, ' + ", ".join(map(str, PIXELS[1:])).encode() + b"]]}", {}),
]


@pytest.mark.parametrize(("body", "headers"), [c[1:] for c in ANSWERED], ids=[c[0] for c in ANSWERED])
def test_the_same_row_sent_another_valid_way_gets_the_same_answer(server, body, headers):
    status, answer = send(server.url, body, headers)
    assert status == 200, answer
    assert answer == server.flat


def test_a_value_far_but_plausible_is_answered(server):
    status, answer = post(f"{server.url}/invocations", {"inputs": [[1000] + PIXELS[1:]]})
    assert status == 200 and len(answer["predictions"]) == 1


def test_a_run_uri_without_the_model_path_loads_the_runs_model(server):
    from dl_uncertainty.serve import load

    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    try:
        for uri in (f"runs:/{server.run_id}", f"runs:/{server.run_id}/"):
            assert load(uri).schema.num_features == 64
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


@pytest.mark.parametrize(("args", "says"), [
    (["--port", "99999"], r"--port must be in 0-65535, got 99999$"),
    (["--port", "{busy}"], r"cannot listen on 127.0.0.1:\d+ \(Address already in use\); pass another --port"),
    (["--host", "no-such-host.invalid"], r"cannot listen on no-such-host.invalid:0 \(.*\); pass another --port or --host"),
    (["--sample-cache-mb", "-5"], r"--sample-cache-mb must be >= 0 \(0 draws on every request\), got -5$"),
    (["--sample-cache-mb", "inf"], r"--sample-cache-mb must be >= 0 .*got inf$"),
    (["--model", "no/such/folder"], r"no model folder no/such/folder; --model takes models:/<name>@<alias>, runs:/<run id>"),
], ids=["port-out-of-range", "port-in-use", "unknown-host", "negative-cache", "infinite-cache", "missing-folder"])
def test_bad_serve_arguments_are_one_line_before_the_model_loads(in_tmp, capsys, args, says):
    import re
    import socket

    from dl_uncertainty.serve import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        args = [a.format(busy=busy.getsockname()[1]) for a in args]
        assert main(["--model", "runs:/0123456789abcdef0123456789abcdef/model", "--port", "0", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and re.search(says, err[-1]), err
    assert "Traceback" not in "\n".join(err)


def test_the_logged_model_takes_image_arrays_of_its_shape_only(server):
    from mlflow.exceptions import MlflowException

    from dl_uncertainty.serve import load

    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    try:
        wrapper = load(f"runs:/{server.run_id}/model")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    image = np.asarray(PIXELS, dtype=float).reshape(1, 1, 8, 8)
    assert len(wrapper.predict(None, image)) == 1
    with pytest.raises(MlflowException, match=r"the rows of 'the input' are nested as \(2, 32\)"):
        wrapper.predict(None, image.reshape(1, 2, 32))
