"""The registered champion served over HTTP in a fresh process (python -m dl_uncertainty.serve):
raw inputs in, the offline evaluation's calibrated probabilities and valid conformal sets out."""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from dl_uncertainty.data.rows import unscaled
from dl_uncertainty.reports.evaluation import evaluate_model
from dl_uncertainty.tracking.compare import register_champion, registered_name
from dl_uncertainty.train import train_and_log
from tests.conftest import TINY, model_server


def strict_json(text: bytes):
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise AssertionError(f"{constant} in a JSON answer: {text[:200]!r}")

    return json.loads(text, parse_constant=refuse)


def post_raw(url: str, body, content_type: str | None = "application/json") -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post(url: str, body, content_type: str | None = "application/json") -> tuple[int, dict]:
    status, text = post_raw(url, body, content_type)
    return status, strict_json(text)


TRAINED: dict = {}  # the served model's run id and store


@pytest.fixture(scope="module")
def served(tmp_path_factory, digits_splits):
    """Train and register a champion, evaluate it offline, serve it from a fresh process."""
    from dl_uncertainty.config.compose import load_config

    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = load_config([*TINY, "model=mc_dropout_dnn", "train.epochs=8", "evaluate.mc_samples=20",
                           f"train.checkpoint_dir={tmp / 'ckpt'}"])
        trained = train_and_log(cfg, digits_splits["train"], digits_splits["val"], digits_splits["calib"])
        register_champion(trained.run_id, registered_name(cfg.data, digits_splits["train"].schema.feature_shape))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    offline = evaluate_model(trained.model, cfg, digits_splits["test"], digits_splits["ood"], digits_splits["val"],
                             calib=digits_splits["calib"], calibration=trained.calibration, with_figures=False)
    TRAINED.update(run_id=trained.run_id, uri=uri, tmp=tmp)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": "/usr/bin:/bin"}  # no venv on PATH
    with model_server(env, cwd=tmp) as url:
        yield url, offline, cfg


def test_raw_inputs_get_the_offline_evaluations_calibrated_probabilities(served, digits_splits):
    url, offline, _ = served
    test = digits_splits["test"]
    raw = np.rint(unscaled(test.x, test.schema)).astype(int)  # the pixel values of the original images
    status, body = post(f"{url}/invocations", {"dataframe_split": {"columns": test.schema.feature_names,
                                                                   "data": raw.tolist()}})
    assert status == 200, body
    rows = body["predictions"]
    names = test.schema.class_names
    probs = np.array([[r[f"prob_{c}"] for c in names] for r in rows])
    np.testing.assert_allclose(probs, offline.predictions["calibrated_probs"], atol=1e-6)
    assert [r["abstain"] for r in rows] == offline.predictions["abstain"].tolist()
    # the feature density over HTTP is the one evaluation scored (stored there as float32)
    np.testing.assert_allclose([r["feature_density"] for r in rows], offline.predictions["feature_density"], rtol=1e-5)
    assert all(r["predicted_class"] == names[int(np.argmax(p))] for r, p in zip(rows, probs, strict=True))
    # the served uncertainty is that of the served (temperature-scaled) probabilities
    entropy = -(probs * np.log(np.maximum(probs, 1e-300))).sum(1)
    np.testing.assert_allclose([r["predictive_entropy"] for r in rows], entropy, atol=1e-6)
    np.testing.assert_allclose([r["mutual_information"] for r in rows],
                               [r["predictive_entropy"] - r["expected_entropy"] for r in rows], atol=1e-9)
    # split-conformal coverage on the test split: 1 - alpha within sampling error (3 sigma, test + calibration)
    alpha = offline.metrics["alpha"]
    covered = np.mean([names[y] in r["prediction_set"] for r, y in zip(rows, test.y, strict=True)])
    sigma = math.sqrt(alpha * (1 - alpha) * (1 / len(test.y) + 1 / len(digits_splits["calib"].y)))
    assert abs(covered - (1 - alpha)) < 3 * sigma, covered
    assert covered == pytest.approx(offline.metrics["coverage"])
    assert all(r["set_size"] == len(r["prediction_set"]) for r in rows)


def test_kserve_v1_protocol_and_info(served, digits_splits):
    url, _, cfg = served
    test = digits_splits["test"]
    row = np.rint(unscaled(test.x[:1], test.schema)).tolist()
    status, body = post(f"{url}/v1/models/dl-uncertainty:predict", {"instances": row})
    assert status == 200 and len(body["predictions"]) == 1
    again = post(f"{url}/v1/models/dl-uncertainty:predict", {"instances": row})[1]
    assert again == body  # seeded MC sampling: the same request, the same answer
    info = json.loads(urllib.request.urlopen(f"{url}/info", timeout=10).read())
    assert info["columns"] == test.schema.feature_names and info["calibration"]["alpha"] == cfg.evaluate.alpha
    density = info["feature_density"]
    assert density["abstain_on"] == "entropy" and density["target_rate"] == 0.95
    assert isinstance(density["threshold"], float)


@pytest.mark.parametrize(("body", "says"), [
    ({"inputs": [[1, 2, 3]]}, "expected 64 values per row, got 3"),
    ({"dataframe_split": {"columns": ["pixel_0"], "data": [[1]]}}, "missing columns"),
    ({"inputs": [[float("nan")] + [0] * 63]}, "row 0 column 'pixel_0' is nan"),
    ({"inputs": [["seven"] + [0] * 63]}, "row 0 column 'pixel_0' is 'seven'"),
    ({"inputs": [[0] * 64, [0] * 63]}, "different lengths"),
    ({"rows": [[0] * 64]}, "needs one of the keys"),
    (b"not json", "not JSON"),
    ({"dataframe_split": {"columns": ["pixel_0", *(f"pixel_{i}" for i in range(64))], "data": [[0] * 65]}},
     "columns ['pixel_0'] are given more than once"),
    ({"inputs": [[1e300] + [0] * 63]}, "row 0 column 'pixel_0' is 1e+300, too large to scale"),
    ({"inputs": [[0] * 63 + [-1e300]]}, "row 0 column 'pixel_63' is -1e+300, too large to scale"),
    ({"dataframe_split": {"columns": [f"pixel_{i}" for i in range(64)], "data": []}}, "'dataframe_split' holds no rows"),
    ({"dataframe_split": {"columns": [f"pixel_{i}" for i in range(64)], "data": None}}, "holds no rows"),
    (b"[" * 100_000, "the request is nested too deeply"),
    (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "the request is nested too deeply"),
    ({"inputs": [[True] + [0] * 63]}, "row 0 column 'pixel_0' is true, a boolean; every feature must be a number"),
    ({"dataframe_split": {"columns": [f"pixel_{i}" for i in range(64)], "data": [[0] * 63 + [False]]}},
     "row 0 column 'pixel_63' is false, a boolean"),
    ({"dataframe_records": [{**{f"pixel_{i}": 0 for i in range(64)}, "pixel_3": True}]},
     "row 0 column 'pixel_3' is true, a boolean"),
    (b"", "the body is empty"),
    (b'{"inputs": [[1' + b"0" * 400 + b"," + b"0," * 62 + b"0]]}", "a number in the body has 401 digits"),
    (b'{"inputs": [[1' + b"0" * 5000 + b"," + b"0," * 62 + b"0]]}", "a number in the body has 5001 digits"),
    (b'{"inputs": [[1e400,' + b"0," * 62 + b"0]]}", "row 0 column 'pixel_0' is inf"),
    (b'{"inputs": [[-Infinity,' + b"0," * 62 + b"0]]}", "row 0 column 'pixel_0' is -inf"),
    (b'{"inputs": ' + b"[" * 900 + b"1" + b"]" * 900 + b"}", "must be lists of numbers"),
    ({"inputs": [[[1, 2]] + [0] * 63]}, "must be lists of numbers"),
    ({"dataframe_split": {"columns": [f"pixel_{i}" for i in range(64)], "data": [[[1, 2]] + [0] * 63]}},
     "row 0 column 'pixel_0' holds a list, not one number"),
    ({"dataframe_split": {"columns": [f"pixel_{i}" for i in range(64)], "data": [[{"a": 1}] + [0] * 63]}},
     "row 0 column 'pixel_0' holds an object, not one number"),
    ({"dataframe_split": {"columns": ["pixel_0"], "data": "[[1]]"}}, "'dataframe_split' data must be a list of rows"),
    ({"dataframe_split": [[0] * 64]}, "'dataframe_split' needs {\"columns\""),
    ({"dataframe_split": {"columns": ["pixel_0"]}}, "'dataframe_split' needs {\"columns\""),
    ({"dataframe_split": {"columns": ["pixel_0", "pixel_1"], "data": [[0] * 64]}}, "2 columns passed"),
    ({"dataframe_records": [[0] * 64]}, "'dataframe_records' must be a list of records"),
    ({"dataframe_records": {"pixel_0": 0}}, "'dataframe_records' must be a list of records"),
    ({"inputs": {f"pixel_{i}": 0 for i in range(64)}}, "'inputs' as an object needs a list of values per column"),
    ({"inputs": None}, "'inputs' must be a list of rows"),
    ({"instances": "0,0,0"}, "'instances' must be a list of rows"),
    ({"inputs": [[0] * 64], "instances": [[0] * 64]}, "the JSON body has the keys inputs, instances"),
    ({"inputs": [[0] * 64], "params": {"temperature": 2}}, "unknown keys ['params'] next to 'inputs'"),
    (b'{"dataframe_split": {"columns": ["\\ud800"], "data": [[1]]}}', "missing columns"),
    (b'{"inputs": [["\\ud800",' + b"0," * 62 + b"0]]}", "row 0 column 'pixel_0' is '\\ud800'"),
    (b"\xff\xfe{", "not JSON"),
    ({"dataframe_split": {"columns": "pixel_0", "data": [[0] * 64]}},
     "'dataframe_split' columns must be a list of column names"),
])
def test_bad_input_is_a_400_with_one_sentence(served, body, says):
    url = served[0]
    data = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    status, answer = post(f"{url}/invocations", data)
    assert status == 400, answer
    assert says in answer["error"] and "\n" not in answer["error"] and "Traceback" not in answer["error"], answer
    assert list(answer) == ["error"]
    assert post(f"{url}/invocations", {"inputs": [[0] * 64]})[0] == 200  # the server is still up and well


def test_content_types(served):
    url = served[0]
    body = json.dumps({"inputs": [[0] * 64]}).encode()
    answers = {ct: post(f"{url}/invocations", body, ct) for ct in (None, "text/plain", "application/json")}
    assert all(status == 200 for status, _ in answers.values()) and len({json.dumps(a) for _, a in answers.values()}) == 1
    status, answer = post(f"{url}/invocations", b"pixel_0,pixel_1\n1,2\n", "text/csv")
    assert status == 400 and answer["error"].startswith("the body is not JSON (Content-Type: text/csv); send {")


def test_more_rows_than_the_server_takes_is_a_413_with_one_sentence(served):
    from dl_uncertainty.serve import MAX_ROWS

    status, answer = post(f"{served[0]}/invocations", {"inputs": [[0] * 64] * (MAX_ROWS + 1)})
    assert status == 413 and list(answer) == ["error"] and "\n" not in answer["error"]
    assert answer["error"].startswith(f"the request has {MAX_ROWS + 1} rows; this server takes at most {MAX_ROWS}")


def test_an_unknown_path_or_a_wrong_method_is_a_404_or_405_with_one_json_sentence(served):
    url = served[0]
    for method, path, code, says in (("GET", "/invocations", 405, "GET is not allowed here (GET /invocations)"),
                                     ("POST", "/info", 405, "POST is not allowed here (POST /info)"),
                                     ("POST", "/predict", 404, "no such path (POST /predict)"),
                                     ("GET", "/v1/models/other", 404, "no such path (GET /v1/models/other)")):
        request = urllib.request.Request(f"{url}{path}", data=b"{}" if method == "POST" else None, method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        answer = strict_json(refused.value.read())
        assert refused.value.code == code and list(answer) == ["error"], answer
        assert answer["error"].startswith(says) and "POST /invocations" in answer["error"], answer


def test_a_row_limit_below_one_is_refused_in_one_line(tmp_path):
    from tests.conftest import run_module

    out = run_module("dl_uncertainty.serve", "--max-rows", "0", cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == "error: --max-rows must be at least 1, got 0"


def test_serving_a_model_that_is_not_there_is_one_line_naming_the_fix(tmp_path):
    from tests.conftest import run_module

    out = run_module("dl_uncertainty.serve", "--port", "1", cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"}, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr
    assert "no registered model of any data has a champion yet" in errors[0] and "`make run`" in errors[0]


BROKEN_SERVER = """
import sys, uvicorn
from dl_uncertainty.data.splits import Schema
from dl_uncertainty.serve import create_app

class Broken:  # a model whose prediction fails on every request: a bug, not bad input
    schema = Schema([2], ["a", "b"], [], "test", feature_names=["x0", "x1"])
    def predict_rows(self, x):
        raise RuntimeError("weights on the wrong device")

uvicorn.run(create_app(Broken()), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def test_a_failure_of_the_server_is_a_500_with_one_json_sentence_and_the_traceback_in_the_log(tmp_path):
    import subprocess
    import sys
    import time

    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    server = subprocess.Popen([sys.executable, "-c", BROKEN_SERVER, str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.2)
        status, answer = post(f"{url}/invocations", {"inputs": [[0.5, 0.5]]})
        assert status == 500
        assert answer == {"error": "the model failed on this request (RuntimeError); the server log has the details"}
        assert post(f"{url}/invocations", {"inputs": [[0.5]]})[0] == 400  # bad input is still the client's
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[0]
    assert "Traceback" in log and "weights on the wrong device" in log


def test_an_image_model_refuses_pixels_outside_0_1_and_says_so(tmp_path):
    import types

    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.data.rows import raw_to_rows
    from dl_uncertainty.data.shapes import make_shapes
    from dl_uncertainty.data.tables import prepare
    from dl_uncertainty.errors import UserError
    from dl_uncertainty.serve import info, parse

    folder = make_shapes(tmp_path, per_class=12, size=8)
    schema = prepare(load_config(["data=image_folder", f"data.path={folder}"]).data, seed=0)["train"].schema
    n = schema.num_features
    pixels = np.linspace(0, 1, n)[None]
    assert raw_to_rows(parse(json.dumps({"inputs": pixels.tolist()}).encode()), schema).shape == (1, n)
    assert raw_to_rows(parse(json.dumps({"inputs": (pixels * 1.005).tolist()}).encode()), schema).shape == (1, n)
    with pytest.raises(UserError, match=r"^row 0 column 'pixel_5' is 255, but this image model takes pixels "
                                        r"scaled to \[0, 1\]; divide 0-255 pixel values by 255$"):
        raw_to_rows(parse(json.dumps({"inputs": [[0.5] * 5 + [255] + [0.5] * (n - 6)]}).encode()), schema)
    with pytest.raises(UserError, match="is -0.5, but this image model"):
        raw_to_rows(parse(json.dumps({"inputs": [[-0.5] + [0.5] * (n - 1)]}).encode()), schema)
    wrapper = types.SimpleNamespace(schema=schema, calibration=None, model=torch.nn.Identity(),
                                    cfg=load_config(["data=image_folder", f"data.path={folder}"]))
    assert info(wrapper)["input_range"] == [0.0, 1.0]


def test_info_of_a_table_model_has_no_input_range(served):
    assert json.loads(urllib.request.urlopen(f"{served[0]}/info", timeout=10).read())["input_range"] is None


def test_evaluate_refuses_calibration_options_that_the_trained_model_cannot_honour(served):
    from tests.conftest import run_module

    env = {"MLFLOW_TRACKING_URI": TRAINED["uri"]}
    out = run_module("dl_uncertainty.evaluate", f"run_id={TRAINED['run_id']}", "evaluate.alpha=0.2",
                     "evaluate.conformal_method=aps", cwd=TRAINED["tmp"], env=env, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert errors[0] == (
        f"error: evaluate.alpha=0.2 evaluate.conformal_method=aps cannot change a trained model: run {TRAINED['run_id']} "
        "is evaluated with the calibration bundled at training (calibration=temperature, alpha=0.1, "
        "conformal_method=lac, target_risk=0.01); to change it, retrain with "
        "`python -m dl_uncertainty.train evaluate.alpha=0.2 evaluate.conformal_method=aps` (or `make run OVERRIDES=...`)")
    same = run_module("dl_uncertainty.evaluate", f"run_id={TRAINED['run_id']}", "evaluate.alpha=0.1",
                      "evaluate.mc_samples=5", cwd=TRAINED["tmp"], env=env, timeout=300)
    assert same.returncode == 0, same.stderr  # the bundled value itself is fine


def test_a_row_gets_the_same_answer_alone_or_anywhere_in_a_batch(served, digits_splits):
    url, _, _ = served
    test = digits_splits["test"]
    rows = np.rint(unscaled(test.x[:32], test.schema)).astype(int).tolist()
    batch = post(f"{url}/invocations", {"inputs": rows})[1]["predictions"]
    reversed_ = post(f"{url}/invocations", {"inputs": rows[::-1]})[1]["predictions"][::-1]
    alone = post(f"{url}/invocations", {"inputs": rows[7:8]})[1]["predictions"][0]
    for got in (reversed_, [*batch[:7], alone, *batch[8:]]):
        for a, b in zip(got, batch, strict=True):
            assert a["prediction_set"] == b["prediction_set"] and a["abstain"] == b["abstain"]
            assert a["predicted_class"] == b["predicted_class"]
            for key in (k for k in a if k.startswith("prob_") or k in ("predictive_entropy", "mutual_information")):
                assert a[key] == pytest.approx(b[key], abs=1e-6)


def serving(env: dict, cwd, *args: str):
    """``python -m dl_uncertainty.serve *args`` in a fresh process; yields its URL."""
    from tests.conftest import model_server

    return model_server(env, cwd, args=args)


MC_SAMPLES = 20
SMALL_CACHE_MB = 0.0006  # 629 bytes: two of the tiny BNN's 20 samples (a noise vector per unit, 288 bytes each)


@pytest.fixture(scope="module")
def served_bnn(tmp_path_factory, digits_splits):
    """A BNN whose abstain threshold is infinite (so few validation errors that every entropy is kept),
    served three times: with the default sample cache, with none, and with one too small for its draws."""
    import dataclasses

    import pandas as pd

    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.tracking import runs as tracking

    tmp = tmp_path_factory.mktemp("serving-bnn")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = load_config([*TINY, "model=bnn", f"evaluate.mc_samples={MC_SAMPLES}", f"train.checkpoint_dir={tmp / 'ckpt'}"])
        trained = train_and_log(cfg, digits_splits["train"], digits_splits["val"], digits_splits["calib"])
        calibration = dataclasses.replace(trained.calibration, max_entropy=math.inf, errors=2)
        train = digits_splits["train"]
        with tracking.start_run(cfg) as run:
            example = pd.DataFrame(unscaled(train.x[:5], train.schema).round(6), columns=train.schema.feature_names)
            tracking.log_model(trained.model, cfg, train.schema, example, calibration)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": "/usr/bin:/bin"}
    model = ("--model", f"runs:/{run.info.run_id}/model")
    with (serving(env, tmp, *model) as cached, serving(env, tmp, *model, "--sample-cache-mb", "0") as uncached,
          serving(env, tmp, *model, "--sample-cache-mb", str(SMALL_CACHE_MB)) as small):
        yield {"cached": cached, "uncached": uncached, "small": small}


def test_info_of_a_model_whose_abstain_threshold_is_infinite_is_json_with_null_and_a_note(served_bnn):
    with urllib.request.urlopen(f"{served_bnn['cached']}/info", timeout=10) as response:
        assert response.status == 200 and response.headers["content-type"] == "application/json"
        info = strict_json(response.read())
    assert info["calibration"]["max_entropy"] is None and info["calibration"]["errors"] == 2
    assert info["non_finite"] == {"calibration.max_entropy": "inf"}
    assert info["model"] == "bnn" and info["mc_samples"] == MC_SAMPLES


def test_served_answers_with_the_sample_cache_equal_answers_without_it_exactly(served_bnn, digits_splits):
    test = digits_splits["test"]
    rows = np.rint(unscaled(test.x[:16], test.schema)).astype(int).tolist()
    bodies = [{"inputs": rows}, {"inputs": rows[3:4]}, {"dataframe_split": {"columns": test.schema.feature_names,
                                                                             "data": rows[::-1]}}]
    for body in bodies:
        answers = {name: post_raw(f"{url}/invocations", body) for name, url in served_bnn.items()}
        assert {status for status, _ in answers.values()} == {200}
        assert answers["cached"][1] == answers["uncached"][1] == answers["small"][1]  # the very bytes
        assert post_raw(f"{served_bnn['cached']}/invocations", body)[1] == answers["cached"][1]
        predictions = strict_json(answers["cached"][1])["predictions"]
        assert len(predictions) == len(body.get("inputs") or body["dataframe_split"]["data"])
        assert not any(p["abstain"] for p in predictions if p["set_size"] == 1)  # no entropy threshold


def test_the_sample_cache_holds_every_sample_or_as_many_as_its_bound_allows(served_bnn):
    def cache(url: str) -> dict:
        return strict_json(urllib.request.urlopen(f"{url}/info", timeout=10).read())["sample_cache"]

    assert cache(served_bnn["uncached"]) is None
    full, small = cache(served_bnn["cached"]), cache(served_bnn["small"])
    assert full["samples"] == MC_SAMPLES and 0 < full["bytes"] <= full["max_bytes"] == 256 * 2**20
    assert small["max_bytes"] == int(SMALL_CACHE_MB * 2**20)
    assert 0 < small["samples"] < MC_SAMPLES and small["bytes"] <= small["max_bytes"]
    assert small["bytes"] == small["samples"] * (full["bytes"] // MC_SAMPLES)
