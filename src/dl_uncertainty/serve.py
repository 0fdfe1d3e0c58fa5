"""Serve a logged model over HTTP: raw inputs in; calibrated probabilities, uncertainty, a conformal
prediction set and an abstain flag out.

    python -m dl_uncertainty.serve [--data digits | --model models:/<name>@champion] [--port 5001]

Without --model it serves the champion of the registered model of the data named by --data
(``dl-uncertainty-<data>-<input shape>``, e.g. dl-uncertainty-digits-1x8x8), and without --data too, the
champion of the registered model updated last (the last pipeline run's data).

POST /invocations                  MLflow's JSON formats: {"dataframe_split": {"columns": [...], "data": [[...]]}},
                                   {"dataframe_records": [{...}]}, {"inputs": [[...]]} or {"instances": [[...]]}
POST /v1/models/<name>:predict     KServe's v1 protocol: {"instances": [[...]]}
    -> {"predictions": [{"prob_<class>": ..., "predicted_class": ..., "predictive_entropy": ...,
                         "expected_entropy": ..., "mutual_information": ..., "prediction_set": [...],
                         "set_size": ..., "abstain": ...,
                         "feature_density": ...}]}   (log-density of the features; low = far from the data)
GET  /health, /v1/models/<name>    ready?        GET /info   the columns it takes (and their range: [0, 1]
                                   for an image model's pixels), its classes, its calibration, and
                                   feature_density: its abstain threshold and whether it decides abstaining

A body may be gzip- or deflate-compressed (Content-Encoding), up to 256 MiB unpacked.
Bad input gets a 400 whose body is one sentence: {"error": "..."}; more rows than --max-rows (10000) a 413,
a body over 256 MiB a 413, an unknown path a 404 and a wrong method a 405 (with Allow), of the same shape; HEAD
answers where GET does and OPTIONS says a path's methods; GET /info's "limits" states these bounds; a failure of the server itself a 500
of the same shape (its traceback goes to the server's log). Every answer is strict JSON: a number that is
infinite or undefined (an abstain threshold of inf) is null, and /info's "non_finite" object maps its
dotted path to "inf", "-inf" or "nan". The seeded MC draws (a BNN's noise vectors, dropout masks) are drawn once and kept
in a sample cache of at most --sample-cache-mb (256) per model. The model is any MLflow model URI
this package logged (``models:/<name>@<alias>``, ``runs:/<id>/model``, a local folder), on the store
MLFLOW_TRACKING_URI points at (default ``sqlite:///mlflow.db``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
from typing import Any

import numpy as np
from starlette.requests import Request  # noqa: I001 -- module level: FastAPI resolves annotations here

from dl_uncertainty.errors import UserError
from dl_uncertainty.request_body import (  # noqa: F401 -- parse: here too
    MAX_BODY,
    MAX_INT_DIGITS,
    MAX_ROWS,
    MAX_UNPACKED,
    TooLarge,
    check_cells,
    decoded,
    parse,
)

REGISTERED_PREFIX = "dl-uncertainty-"  # tracking.compare.registered_name: dl-uncertainty-<data>-<input shape>
log = logging.getLogger("dl_uncertainty.serve")


def champion_uri(data: str | None = None) -> str:
    """``models:/<name>@champion`` of data ``data`` (a registered name ``dl-uncertainty-<data>-<shape>``),
    else of the registered model with a champion that was updated last. Needs the tracking URI set."""
    import mlflow

    prefix = REGISTERED_PREFIX + (f"{data}-" if data else "")
    models = mlflow.MlflowClient().search_registered_models(
        filter_string=f"name LIKE '{prefix}%'", order_by=["last_updated_timestamp DESC"])
    names = [m.name for m in models if m.name.startswith(prefix) and "champion" in (m.aliases or {})
             and (not data or m.name[len(prefix):].replace("x", "").isdigit())]
    if not names:
        what = f"data {data!r} ({prefix}<input shape>)" if data else "any data"
        raise UserError(f"no registered model of {what} has a champion yet; `make run` trains and registers one "
                        "(make serve DATA=<data.source> picks the data, MODEL_URI=models:/<name>@champion a model)")
    return f"models:/{names[0]}@champion"


def _model_uri(uri: str) -> str:
    """``runs:/<id>`` names a run: its model is at ``runs:/<id>/model``; a path that is no folder is refused."""
    run = re.fullmatch(r"runs:/+([0-9a-fA-F]{32})/*", uri.strip())
    if run:
        return f"runs:/{run.group(1)}/model"
    given = re.match(r"runs:/+([^/]*)", uri.strip())
    if given and not re.fullmatch(r"[0-9a-fA-F]{32}", given.group(1)):
        said = f"{given.group(1)!r} is not a run id" if given.group(1) else "no run id after runs:/"
        raise UserError(f"{uri}: {said}; a run id is 32 hex characters, "
                        "printed by dl_uncertainty.train and shown in `make mlflow-ui` (give it whole)")
    if not re.match(r"^[a-zA-Z][\w+.-]*:", uri) and not os.path.isdir(uri):
        raise UserError(f"no model folder {uri}; --model takes models:/<name>@<alias>, runs:/<run id>/model "
                        "or the folder of a saved model")
    return uri


def load(uri: str | None, data: str | None = None):
    """The logged pyfunc's ``UncertaintyModel`` (weights, schema, calibration), or a one-line error.
    ``uri`` None: the champion of ``data`` (see ``champion_uri``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from dl_uncertainty.tracking import store
    from dl_uncertainty.training.loop import set_threads

    mlflow.set_tracking_uri(store.tracking_uri())
    store.check_reachable(store.tracking_uri())
    uri = _model_uri(uri) if uri else champion_uri(data)
    try:
        wrapper = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except (MlflowException, OSError) as err:
        message = getattr(err, "message", str(err)).splitlines()[0]
        hint = "; `make run` trains and registers a champion, or pass --model runs:/<run id>/model"
        raise UserError(f"cannot load {uri} from {store.tracking_uri()}: {message}{hint}") from None
    if not hasattr(wrapper, "predict_rows"):
        raise UserError(f"{uri} was not logged by dl_uncertainty (train one with `make train`)")
    set_threads(wrapper.cfg.num_threads)  # 1 by default: small nets answer fastest, a pod's CPU limit holds
    return wrapper


def json_safe(value, path: str = "", non_finite: dict[str, str] | None = None):
    """``value`` with every inf/nan float replaced by None, its dotted path -> "inf"/"-inf"/"nan" in ``non_finite``."""
    if isinstance(value, dict):
        return {k: json_safe(v, f"{path}.{k}" if path else str(k), non_finite) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, f"{path}.{i}", non_finite) for i, v in enumerate(value)]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        if non_finite is not None:
            non_finite[path] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    return value


def _density_info(wrapper) -> dict[str, Any] | None:
    """The served ``feature_density`` column's abstain threshold, and whether it decides abstaining."""
    from dl_uncertainty.families.feature_density import density_of

    fitted = density_of(wrapper.model)
    if fitted is None:
        return None
    return {"threshold": fitted.threshold, "target_rate": fitted.target_rate,
            "abstain_on": wrapper.cfg.evaluate.get("abstain_on", "entropy")}


def _column_ranges(schema) -> list[list[float]] | None:
    """Per column, the values a request may hold: within LIMIT_SCALED training spreads of the training
    centre (data.rows refuses the rest). None where scaling does not bound them (none, or clipped first)."""
    from dl_uncertainty.data.rows import LIMIT_SCALED

    cleaning = schema.cleaning
    if "center" not in cleaning or "clip_low" in cleaning:
        return None
    center, scale = np.asarray(cleaning["center"], float), np.asarray(cleaning["scale"], float)
    return np.stack([center - LIMIT_SCALED * scale, center + LIMIT_SCALED * scale], axis=1).tolist()


def info(wrapper, max_rows: int = MAX_ROWS) -> dict[str, Any]:
    schema, cal = wrapper.schema, wrapper.calibration
    from dl_uncertainty.data.rows import input_range

    cache = getattr(wrapper, "sample_cache", None)
    non_finite: dict[str, str] = {}
    answer = json_safe({
        "model": wrapper.cfg.model.name, "columns": schema.feature_names, "feature_shape": schema.feature_shape,
        "input_range": input_range(schema),  # [0, 1] for images: pixels / 255; null: any finite number
        "classes": schema.class_names, "mc_samples": wrapper.cfg.evaluate.mc_samples,
        "calibration": cal.to_dict() if cal else None,
        "feature_density": _density_info(wrapper),
        # the MC draws kept for reuse (a BNN's noise vectors or weight sets, dropout masks): bytes held, the bound, samples held
        "sample_cache": {"bytes": cache.bytes, "max_bytes": cache.max_bytes, "samples": len(cache)} if cache is not None else None,
        # what a request may hold; beyond it, a 413 (rows, bytes) or a 400 (values) saying which
        "limits": {"max_rows": max_rows, "max_body_bytes": MAX_BODY, "max_unpacked_bytes": MAX_UNPACKED,
                   "max_number_digits": MAX_INT_DIGITS, "input_range": input_range(schema),
                   "column_ranges": _column_ranges(schema),
                   "values": "finite numbers, one per column; booleans, lists and objects are refused"},
    }, non_finite=non_finite)
    return {**answer, "non_finite": non_finite}


def create_app(wrapper, name: str = "dl-uncertainty", max_rows: int = MAX_ROWS):
    from fastapi import FastAPI
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from dl_uncertainty.data.rows import raw_to_rows

    app = FastAPI(title=f"{name}: uncertainty-aware predictions", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # seeded MC sampling uses torch's global generator: one request at a time

    names = wrapper.schema.feature_names or [str(i) for i in range(wrapper.schema.num_features)]

    def error(message: str, status: int) -> Response:  # ASCII-escaped: any character a client sent survives
        return Response(json.dumps({"error": message}), status_code=status, media_type="application/json")

    def predict(body: bytes, content_type: str | None, encoding: str | None) -> str:
        frame = parse(decoded(body, encoding), content_type, max_rows, wrapper.schema)
        check_cells(frame, names)
        x = raw_to_rows(frame, wrapper.schema)
        with lock:
            frame = wrapper.predict_rows(x)
        # NaN/inf (a model that failed numerically) become null: the answer stays strict JSON
        return '{"predictions": ' + frame.to_json(orient="records", double_precision=15) + "}"

    async def answer(request: Request) -> Response:
        try:
            headers = request.headers
            content = await run_in_threadpool(predict, await read_body(request), headers.get("content-type"),
                                              headers.get("content-encoding"))
        except UserError as err:
            return error(str(err), 413 if isinstance(err, TooLarge) else 400)
        except Exception as err:  # a bug, not the client's input: one sentence out, the traceback in the log
            log.exception("prediction failed")
            return error(f"the model failed on this request ({type(err).__name__}); the server log has the details", 500)
        return Response(content, media_type="application/json")

    async def failed(request: Request, err: Exception) -> Response:  # any other route's bug: the same shape
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return error(f"the server failed on {request.url.path} ({type(err).__name__}); the server log has the details", 500)

    async def refused(request: Request, err: HTTPException) -> Response:  # unknown path, wrong method: the same shape
        routes = f"POST /invocations or /v1/models/{name}:predict; GET /health, /info"
        what = "no such path" if err.status_code == 404 else (
            f"{request.method} is not allowed here" if err.status_code == 405 else str(err.detail))
        answer = error(f"{what} ({request.method} {request.url.path}); this server answers {routes}", err.status_code)
        answer.headers.update(err.headers or {})  # a 405's Allow: the methods the path takes
        return answer

    app.add_exception_handler(Exception, failed)
    app.add_exception_handler(HTTPException, refused)

    ready = lambda: {"status": "ready", "name": name}  # noqa: E731
    routes = {"/invocations": ("POST", answer), f"/v1/models/{name}:predict": ("POST", answer),
              "/health": ("GET", ready), "/ping": ("GET", ready), f"/v1/models/{name}": ("GET", ready),
              "/info": ("GET", lambda: info(wrapper, max_rows))}
    for path, (method, endpoint) in routes.items():  # HEAD: a GET's headers, as HTTP says every GET path answers
        app.api_route(path, methods=[method, "HEAD"] if method == "GET" else [method])(endpoint)

    for path, (method, _) in routes.items():  # OPTIONS: the methods a path takes, without calling it
        allow = "GET, HEAD, OPTIONS" if method == "GET" else "POST, OPTIONS"
        app.options(path)(_allowing(allow, Response))

    return app


def _allowing(allow: str, response):
    """An endpoint answering 204 with ``Allow`` (a closure: a default argument would be a query parameter)."""
    return lambda: response(status_code=204, headers={"Allow": allow})


async def read_body(request: Request) -> bytes:
    """The body, refused with a 413 past MAX_BODY bytes before it is all in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise TooLarge(f"the body is {int(declared)} bytes; this server takes at most {MAX_BODY >> 20} MiB per request: "
                       "send fewer rows per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise TooLarge(f"the body is over {MAX_BODY >> 20} MiB; this server takes at most that per request: "
                           "send fewer rows per request")
        chunks.append(chunk)
    return b"".join(chunks)


def warm_up(wrapper) -> None:
    """One prediction before the first request: the MC plan is made and the sample cache filled."""
    try:
        wrapper.predict_rows(np.zeros((1, wrapper.schema.num_features), np.float32))
    except Exception:  # noqa: BLE001 -- requests will say what fails; serving starts regardless
        log.warning("the warm-up prediction failed", exc_info=True)


def _bad_argument(args) -> str | None:
    """What is wrong with the command line, checked before the model loads (the port: that it is free)."""
    import socket

    if args.model is not None and not args.model.strip():
        return "--model is empty; give models:/<name>@<alias>, runs:/<run id>/model or a model folder, or leave it out for the champion"
    if args.max_rows < 1:
        return f"--max-rows must be at least 1, got {args.max_rows}"
    if args.sample_cache_mb is not None and not (math.isfinite(args.sample_cache_mb) and args.sample_cache_mb >= 0):
        return f"--sample-cache-mb must be >= 0 (0 draws on every request), got {args.sample_cache_mb:g}"
    if not 0 <= args.port <= 65535:
        return f"--port must be in 0-65535, got {args.port}"
    try:
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as err:  # create_server appends " (while attempting to bind on address ...)" to strerror
        why = (err.strerror or str(err)).split(" (while attempting to bind")[0]
        return f"cannot listen on {args.host}:{args.port} ({why}); pass another --port or --host"
    return None


def main(argv: list[str] | None = None) -> int:
    from dl_uncertainty.cli import OneLineParser

    parser = OneLineParser(prog="python -m dl_uncertainty.serve", description=__doc__.split("\n\n")[0],
                                     epilog="Endpoints and formats: see the module docstring or README.")
    parser.add_argument("--model", default=None, help="MLflow model URI (default: the champion of --data)")
    parser.add_argument("--data", default=None, help="serve the champion of this data (data.source, with the file or "
                        "folder name for csv/npz/image_folder, e.g. digits or image_folder-shapes); default: the "
                        "registered model updated last")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    parser.add_argument("--name", default="dl-uncertainty", help="model name in KServe's /v1/models/<name> paths")
    parser.add_argument("--sample-cache-mb", type=float, default=None, metavar="MB",
                        help="memory for the model's seeded MC draws (a BNN's noise vectors, dropout masks), drawn once and reused; "
                             "0 draws them on every request (default 256)")
    parser.add_argument("--max-rows", type=int, default=MAX_ROWS, metavar="N",
                        help=f"rows one request may hold; more get a 413 (default {MAX_ROWS})")
    args = parser.parse_args(argv)
    problem = _bad_argument(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        print(f"loading {args.model or 'the champion of ' + (args.data or 'the data registered last')} ...",
              file=sys.stderr, flush=True)
        wrapper = load(args.model, args.data)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.sample_cache_mb is not None:
        from dl_uncertainty.tracking.runs import new_sample_cache

        wrapper.sample_cache = new_sample_cache(args.sample_cache_mb)
    warm_up(wrapper)
    import uvicorn

    cal = wrapper.calibration
    detail = f", {cal.method.upper()} sets at alpha {cal.alpha:g}" if cal else ", no calibration (always abstains)"
    print(f"serving {wrapper.cfg.model.name} ({len(wrapper.schema.feature_names or [])} input columns"
          f"{detail}) on http://{args.host}:{args.port}/invocations", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(wrapper, args.name, args.max_rows), host=args.host, port=args.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
