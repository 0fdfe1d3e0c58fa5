"""The entry points a new user types, end to end: make variables, the command lines' flags, the
tracking URI, S3 locations, image folders of odd files, and the served model's own HTTP surface.

A bad input ends in one ``error: ...`` line, a non-zero exit and no traceback; a valid one is read
right. Make and the pipeline CLI run as real processes or in this process (the same code as
``python -m``); S3 is moto's HTTP server; the served model is a one-epoch model in a fresh process."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.test_bad_inputs_more import assert_one_error_line, run_in_process

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "0123456789abcdef0123456789abcdef"


def make(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``make <args>`` of this checkout with this interpreter, as a user's top-level make (not make[1] under
    `make test`); INSTALLED names a file newer than pyproject.toml, so no install runs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for name in ("MLFLOW_TRACKING_URI", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(name, None)
    installed = cwd / "installed"
    installed.touch()
    return subprocess.run(["make", "-s", "-C", str(ROOT), f"PY={sys.executable}", f"INSTALLED={installed}",
                           f"MLFLOW_TRACKING_URI=sqlite:///{cwd / 'mlflow.db'}", *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


# ---------------------------------------------------------------- make variables

MAKE_BAD = [
    ("run-unknown-family", ("run", "MODELS=bnn,foo"), r"pipeline.models\[\]='foo' is not one of bnn"),
    ("run-family-twice", ("run", "MODELS=bnn,swag,bnn"), r"pipeline.models names bnn twice; each family trains once per seed"),
    ("run-no-family", ("run", "MODELS="), r"^error: MODELS is empty; name one or more of bnn"),
    ("run-data-file-missing", ("run", "DATA=/no/such/file"), r"data file not found: /no/such/file$"),
    ("run-runner-unknown", ("run", "RUNNER=kubernetes"), r"^error: argument --runner: invalid choice: 'kubernetes'"),
    ("run-seeds-not-a-number", ("run", "SEEDS=abc"), r"pipeline.seeds=abc"),
    ("train-data-unknown", ("train", "DATA=nosuch"), r"Could not find 'data/nosuch'"),
    ("train-no-family", ("train", "MODELS="), r"^error: MODELS is empty"),
    ("tune-no-family", ("tune", "TUNE_MODELS="), r"^error: TUNE_MODELS is empty"),
    ("serve-port-empty", ("serve", "SERVE_PORT="), r"^error: SERVE_PORT is empty"),
    ("serve-port-not-a-number", ("serve", "SERVE_PORT=abc"),
     r"^error: argument --port: invalid int value: 'abc'; see python -m dl_uncertainty.serve --help$"),
]


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in MAKE_BAD], ids=[c[0] for c in MAKE_BAD])
def test_a_bad_make_variable_is_one_error_line_and_no_work(tmp_path, args, message):
    done = make(*args, cwd=tmp_path)
    stderr = "\n".join(ln for ln in done.stderr.splitlines() if not ln.startswith("make: ***"))
    assert_one_error_line(done.returncode, stderr, message)


def test_data_as_a_file_or_folder_picks_its_reader(tmp_path):
    (tmp_path / "t.csv").write_text("a,label\n1,x\n")
    (tmp_path / "x.npz").write_bytes(b"")
    (tmp_path / "imgs").mkdir()
    for data, source in ((tmp_path / "t.csv", "csv"), (tmp_path / "x.npz", "npz"), (tmp_path / "imgs", "image_folder"),
                         ("mnist", "mnist")):
        done = make("train", "MODELS=bnn", f"DATA={data}", "OVERRIDES=--cfg", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"source: {source}\n" in done.stdout
        if source != "mnist":
            assert f"path: {data}\n" in done.stdout


# ---------------------------------------------------------------- command-line flags


def pipelines_main(argv: list[str], capsys) -> tuple[int, str]:
    from pipelines.__main__ import main

    try:
        code = main(argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    return code, capsys.readouterr().err


def test_wrong_flags_are_one_line_naming_the_help(capsys):
    from dl_uncertainty.serve import main as serve

    for argv, message in ((["compile", "--bogus"], r"unrecognized arguments: --bogus; see python -m pipelines --help"),
                          (["run", "--timeout", "soon"], r"--timeout: invalid int value: 'soon'; see python -m pipelines run --help"),
                          (["run-local", "--pipeline", "nosuch"], r"--pipeline: invalid choice: 'nosuch'"),
                          ([], r"the following arguments are required"),
                          (["run-local", "--pipeline-root", ""], r"^error: --pipeline-root is empty")):
        code, stderr = pipelines_main(argv, capsys)
        assert_one_error_line(code, stderr, message)
    with pytest.raises(SystemExit) as stop:
        serve(["--port", "abc"])
    assert_one_error_line(stop.value.code, capsys.readouterr().err, r"--port: invalid int value: 'abc'")
    assert_one_error_line(serve(["--host", "no-such-host.invalid", "--port", "0"]), capsys.readouterr().err,
                          r"cannot listen on no-such-host.invalid:0 \((Name or service not known|.*not known.*|.*resolution.*)\)")


@pytest.mark.parametrize(("output", "message"), [
    ("a-file/pipeline.yaml", r"--output a-file/pipeline.yaml: a-file is a file, not a folder$"),
    (".", r"--output \. is a folder; give a file, e.g. \./pipeline.yaml$"),
    ("pipeline.txt", r"--output pipeline.txt must end with .yaml"),
], ids=["below-a-file", "a-folder", "not-yaml"])
def test_a_compile_output_that_cannot_be_written_is_refused_before_compiling(tmp_path, monkeypatch, capsys, output, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    code, stderr = pipelines_main(["compile", "--output", output], capsys)
    assert_one_error_line(code, stderr, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# ---------------------------------------------------------------- tracking URIs


@pytest.mark.parametrize(("uri", "message"), [
    ("foo://somewhere", r"tracking URI foo://somewhere has a scheme MLflow cannot track to \(foo:\)"),
    ("sqlite:///{tmp}/notes.db", r"notes.db is not an MLflow sqlite database \(file is not a database\)"),
    ("sqlite:///{tmp}/folder", r"folder is a folder, not a sqlite database"),
], ids=["unknown-scheme", "sqlite-not-a-database", "sqlite-a-folder"])
def test_a_tracking_uri_mlflow_cannot_use_is_one_line(in_tmp, monkeypatch, capsys, uri, message):
    (in_tmp / "notes.db").write_text("not a database, just notes\n" * 20)
    (in_tmp / "folder").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=in_tmp))
    code, stderr, _ = run_in_process("evaluate", [f"run_id={RUN_ID}"], capsys)
    assert_one_error_line(code, stderr, message)
    assert (in_tmp / "notes.db").read_text().startswith("not a database")  # left as it was


# ---------------------------------------------------------------- S3


class Failing(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with HTTP 500."""

    def do_GET(self):  # noqa: N802 -- http.server's name
        self.send_response(500)
        self.end_headers()
        self.wfile.write(b"<Error><Code>InternalError</Code></Error>")

    do_HEAD = do_PUT = do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def failing_s3():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_s3_locations_that_cannot_be_read_say_why(in_tmp, s3_env, failing_s3, monkeypatch, capsys):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="entry-data")
    s3.put_object(Bucket="entry-data", Key="tables/t.csv", Body=b"a,label\n1,x\n")
    cases = [
        ("csv", "s3://entry-data", None, r"'s3://entry-data' is not an s3://bucket/key URI$"),
        ("csv", "s3://no-such-bucket/t.csv", None, r"there is no bucket 'no-such-bucket' at http://127.0.0.1:\d+$"),
        ("csv", "s3://entry-data/tables", None, r"s3://entry-data/tables is a folder, not a file; give a file's key"),
        ("csv", "s3://entry-data/tables/", None, r"s3://entry-data/tables/ is a folder, not a file"),
        ("csv", "s3://entry-data/nope.csv", None, r"cannot read s3://entry-data/nope.csv: there is no such key"),
        ("csv", "s3://entry-data/tables/t.csv", "http://127.0.0.1:9", r"no S3 server answers at http://127.0.0.1:9; start it"),
        ("csv", "s3://entry-data/tables/t.csv", failing_s3, r"the S3 server at http://127.0.0.1:\d+ failed \(HTTP 500\)"),
        ("csv", "s3://entry-data/tables/t.csv", "not a url", r"Invalid endpoint: not a url; set AWS_ENDPOINT_URL"),
        ("image_folder", "s3://no-such-bucket/imgs", None, r"cannot list s3://no-such-bucket/imgs: there is no bucket"),
    ]
    for source, path, endpoint, message in cases:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint or s3_env["AWS_ENDPOINT_URL"])
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the 500: said at once, not after boto3's retries
        code, stderr, _ = run_in_process("preprocess", [f"data={source}", f"data.path={path}", "data_dir=out"], capsys)
        assert_one_error_line(code, stderr, message)
        assert not list(in_tmp.glob("out/*"))


# ---------------------------------------------------------------- image folders


def picture() -> np.ndarray:
    """12 wide, 8 high: a red top band and a green left band, so a turn or a flip shows."""
    pixels = np.zeros((8, 12, 3), np.uint8)
    pixels[:2, :, 0] = 255
    pixels[:, :2, 1] = 200
    return pixels


def folder_of(root: Path, save) -> Path:
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            save(Image.fromarray(picture()), root / label / str(i))
    return root


def decoded(root: Path) -> np.ndarray:
    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.data.images import check_source, decode_all, list_images

    cfg = load_config(["data=image_folder", f"data.path={root}", "data.image_size=null"]).data
    check_source(cfg)
    return decode_all([f for f, _ in list_images(cfg)], cfg)


def exif_turned(image: Image.Image, path: Path) -> None:
    """Stored turned a quarter to the left with orientation 6, as a phone does: shown as ``picture()``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    image.transpose(Image.Transpose.ROTATE_90).save(f"{path}.jpg", exif=exif, quality=100, subsampling=0)


def palette_with_transparency(image: Image.Image, path: Path) -> None:
    image.convert("P").save(f"{path}.png", transparency=0)


def palette_with_alpha_per_colour(image: Image.Image, path: Path) -> None:
    image.convert("P").save(f"{path}.png", transparency=bytes([0, 128] + [255] * 254))


def animated(image: Image.Image, path: Path) -> None:
    second = Image.fromarray(255 - picture())
    image.save(f"{path}.gif", save_all=True, append_images=[second], duration=100, loop=0)


@pytest.mark.filterwarnings("error")  # Pillow's warning for a palette with alpha: a line a user would see
@pytest.mark.parametrize("save", [exif_turned, palette_with_transparency, palette_with_alpha_per_colour,
                                  lambda image, path: image.convert("CMYK").save(f"{path}.jpg", quality=100, subsampling=0), animated],
                         ids=["exif-rotation", "palette-transparency", "palette-alpha-per-colour", "cmyk-jpeg", "animated-gif-first-frame"])
def test_odd_but_valid_images_are_read_as_they_are_shown(tmp_path, save):
    images = decoded(folder_of(tmp_path / "imgs", save))
    assert images.shape == (6, 3, 8, 12)
    difference = np.abs(images.astype(int) - picture().transpose(2, 0, 1))
    assert difference.mean() < 8  # JPEG's loss at the bands' edges; turned or flipped, the bands miss by ~60


def test_a_class_folder_linked_to_another_class_is_refused(tmp_path):
    from dl_uncertainty.errors import UserError

    root = folder_of(tmp_path / "imgs", lambda image, path: image.save(f"{path}.png"))
    (root / "c").symlink_to(root / "a", target_is_directory=True)
    with pytest.raises(UserError, match=r"class folder .*/c is a link to .*/a, whose images class 'a' already holds"):
        decoded(root)
    (root / "c").unlink()
    (root / "c").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a link to images of its own: a class
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(picture()).save(tmp_path / "elsewhere" / "0.png")
    assert len(decoded(root)) == 7


# ---------------------------------------------------------------- the served model's HTTP surface


@pytest.fixture(scope="module")
def served_url(tiny_served_model):
    return tiny_served_model.url


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    answer = connection.getresponse()
    return answer.status, dict(answer.getheaders()), answer.read()


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("HEAD", "/health", 200, None), ("HEAD", "/info", 200, None),
    ("OPTIONS", "/info", 204, "GET, HEAD, OPTIONS"), ("OPTIONS", "/invocations", 204, "POST, OPTIONS"),
    ("GET", "/invocations", 405, "POST"), ("HEAD", "/invocations", 405, "POST"), ("OPTIONS", "/nosuch", 404, None),
    ("GET", "/info?verbose=1", 200, None),
])
def test_http_methods_and_query_strings_get_the_answer_http_says(served_url, method, path, status, allow):
    code, headers, body = request(served_url, method, path)
    assert code == status, body
    if allow:
        assert {k.lower(): v for k, v in headers.items()}["allow"] == allow
    if method == "HEAD" or code == 204:
        assert body == b""
    if code >= 400 and method != "HEAD":
        assert list(json.loads(body)) == ["error"]


def test_info_states_the_limits_a_request_is_held_to(served_url):
    with urllib.request.urlopen(f"{served_url}/info") as answer:
        limits = json.load(answer)["limits"]
    assert limits["max_rows"] == 50 and limits["max_body_bytes"] == 256 << 20 and limits["max_number_digits"] == 300
    assert limits["input_range"] is None  # a table model: any finite number within its column's range
    low, high = limits["column_ranges"][3]
    assert low < 0 < 16 < high
    for value, status in ((high * 0.99, 200), (high * 1.01, 400)):
        row = [0.0] * 64
        row[3] = value
        code, _, body = request(served_url, "POST", "/invocations", json.dumps({"inputs": [row]}).encode(),
                                {"Content-Type": "application/json"})
        assert code == status, body
    rows = [[0.0] * 64] * (limits["max_rows"] + 1)
    code, _, body = request(served_url, "POST", "/invocations", json.dumps({"inputs": rows}).encode(),
                            {"Content-Type": "application/json"})
    assert code == 413 and "at most 50" in json.loads(body)["error"]
    code, _, body = request(served_url, "POST", "/invocations?format=pandas", json.dumps({"inputs": rows[:1]}).encode(),
                            {"Content-Type": "application/json"})
    assert code == 200, body


def test_a_body_past_the_limit_is_a_413_before_it_is_read(served_url):
    code, _, body = request(served_url, "POST", "/invocations", b"",
                            {"Content-Type": "application/json", "Content-Length": str((256 << 20) + 1)})
    assert code == 413 and "256 MiB" in json.loads(body)["error"]


@pytest.mark.parametrize(("name", "says"), [("team/model", r" \(it holds '/'\)"), ("model:v2", r" \(it holds ':'\)"),
                                            ("model@prod", r" \(it holds '@'\)"), (" ", r"' ' cannot name an MLflow registered model; use")],
                         ids=["slash", "colon", "at", "blank"])
def test_a_registered_model_name_mlflow_refuses_is_refused_before_training(in_tmp, capsys, name, says):
    code, stderr, _ = run_in_process("train", [f"evaluate.registered_model_name={name}" if name.strip()
                                               else "evaluate.registered_model_name=' '", "--cfg"], capsys)
    assert_one_error_line(code, stderr, r"^error: evaluate\.registered_model_name=.*" + says)
    assert not (in_tmp / "mlflow.db").exists()


@pytest.mark.parametrize(("uri", "message"), [
    ("runs:/0123abcd/model", r"runs:/0123abcd/model: '0123abcd' is not a run id; a run id is 32 hex characters"),
    ("runs:/", r"runs:/: no run id after runs:/"),
    ("garbage", r"no model folder garbage; --model takes models:/<name>@<alias>"),
    (" ", r"^error: --model is empty; give models:/<name>@<alias>"),
], ids=["run-id-prefix", "no-run-id", "not-a-uri", "blank"])
def test_a_model_uri_that_names_no_run_is_one_line_before_loading(in_tmp, capsys, uri, message):
    from dl_uncertainty.serve import main as serve

    assert_one_error_line(serve(["--model", uri, "--port", "0"]), capsys.readouterr().err, message)
    assert not (in_tmp / "mlflow.db").exists()


# ---------------------------------------------------------------- run ids by their first characters


def test_a_run_is_evaluated_by_the_first_characters_of_its_id_and_a_shared_prefix_is_refused(
        tiny_served_model, monkeypatch, capsys):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_served_model.uri)
    run_id = tiny_served_model.run_id
    code, stderr, out = run_in_process("evaluate", [f"run_id={run_id[:8]}", "evaluate.mc_samples=3"], capsys)
    assert code == 0, stderr
    assert f"logged to run {run_id}:" in out

    client = mlflow.MlflowClient(tiny_served_model.uri)
    others = client.create_experiment("prefix-test")
    ids = [run_id] + [client.create_run(others).info.run_id for _ in range(20)]
    shared = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1)  # 21 ids, 16 letters
    code, stderr, _ = run_in_process("evaluate", [f"run_id={shared}"], capsys)
    assert_one_error_line(code, stderr, rf"run_id={shared} starts {sum(i.startswith(shared) for i in ids)} runs' ids "
                                        r"\([0-9a-f]{32}, [0-9a-f]{32}.*\); give more of the id$")
    unused = next(f"{n:06x}" for n in range(2**24) if not any(i.startswith(f"{n:06x}") for i in ids))
    code, stderr, _ = run_in_process("evaluate", [f"run_id={unused}"], capsys)
    assert_one_error_line(code, stderr, rf"^error: no MLflow run {unused} at sqlite:///")
