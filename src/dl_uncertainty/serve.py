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
an unknown path a 404 and a wrong method a 405, of the same shape; a failure of the server itself a 500
of the same shape (its traceback goes to the server's log). Every answer is strict JSON: a number that is
infinite or undefined (an abstain threshold of inf) is null, and /info's "non_finite" object maps its
dotted path to "inf", "-inf" or "nan". The seeded MC draws (a BNN's noise vectors, dropout masks) are drawn once and kept
in a sample cache of at most --sample-cache-mb (256) per model. The model is any MLflow model URI
this package logged (``models:/<name>@<alias>``, ``runs:/<id>/model``, a local folder), on the store
MLFLOW_TRACKING_URI points at (default ``sqlite:///mlflow.db``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import threading
import zlib
from typing import Any

import numpy as np
import pandas as pd
from starlette.requests import Request  # noqa: I001 -- module level: FastAPI resolves annotations here

from dl_uncertainty.errors import UserError

REGISTERED_PREFIX = "dl-uncertainty-"  # tracking.compare.registered_name: dl-uncertainty-<data>-<input shape>
INPUT_KEYS = ("dataframe_split", "dataframe_records", "inputs", "instances")
MAX_INT_DIGITS = 300  # a longer integer is past float64's range (1.8e308) or close to it
MAX_UNPACKED = 256 << 20  # bytes a gzip body may unpack to (a few bytes can unpack to gigabytes)
MAX_ROWS = 10_000  # per request, by default: bounds one request's memory (its T x rows x classes samples)
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


def load(uri: str | None, data: str | None = None):
    """The logged pyfunc's ``UncertaintyModel`` (weights, schema, calibration), or a one-line error.
    ``uri`` None: the champion of ``data`` (see ``champion_uri``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from dl_uncertainty.tracking import store
    from dl_uncertainty.training.loop import set_threads

    mlflow.set_tracking_uri(store.tracking_uri())
    store.check_reachable(store.tracking_uri())
    uri = uri or champion_uri(data)
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


def _number(text: str) -> int | float:
    """A JSON integer; one too long for a float is refused here (Python's int() also stops at 4300 digits)."""
    if len(text) > MAX_INT_DIGITS:
        raise UserError(f"a number in the body has {len(text.lstrip('-'))} digits; every feature must be a finite "
                        "64-bit float")
    return int(text)


class TooLarge(UserError):
    """A request with more rows than the server takes: a 413."""


def decoded(body: bytes, encoding: str | None) -> bytes:
    """The body as sent before its Content-Encoding (gzip or deflate), unpacked to at most MAX_UNPACKED bytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity" or not body:
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise UserError(f"Content-Encoding: {encoding} is not read; send the body uncompressed or with gzip")
    out, rest = bytearray(), body
    while True:  # one member after another: concatenated gzip files are one gzip stream
        unpack = zlib.decompressobj(wbits=47)  # gzip or zlib header, told apart by its first bytes
        try:
            out += unpack.decompress(rest, MAX_UNPACKED + 1 - len(out))  # >= 1: 0 would mean no limit
        except zlib.error:
            raise UserError(f"the body is not {encoding} data, as its Content-Encoding says") from None
        if len(out) > MAX_UNPACKED:
            raise TooLarge(f"the {encoding} body unpacks to more than {MAX_UNPACKED >> 20} MiB; send fewer rows "
                           "per request")
        if not unpack.eof:
            raise UserError(f"the {encoding} body is cut short: it ends before its compressed data does")
        rest = unpack.unused_data
        if not rest:
            return bytes(out)


def parse(body: bytes, content_type: str | None = None, max_rows: int = MAX_ROWS, schema=None) -> pd.DataFrame:
    """A request body in one of MLflow's JSON formats as a DataFrame (columns named or positional);
    with the model's ``schema``, rows nested as lists must have its input's shape."""
    example = 'send {"dataframe_split": {"columns": [...], "data": [[...]]}}'
    if not body.strip():
        raise UserError(f"the body is empty; {example}")
    try:
        payload = json.loads(body, parse_int=_number)
    except RecursionError:
        raise UserError("the request is nested too deeply to be a table of rows") from None
    except (ValueError, UnicodeDecodeError):
        if body[:2] == b"\x1f\x8b":  # gzip's magic number
            raise UserError("the body is gzip-compressed but says no Content-Encoding; send it with "
                            "Content-Encoding: gzip") from None
        given = f" (Content-Type: {content_type})" if content_type and "json" not in content_type else ""
        raise UserError(f"the body is not JSON{given}; {example}") from None
    if not isinstance(payload, dict) or not any(k in payload for k in INPUT_KEYS):
        raise UserError(f"the JSON body needs one of the keys {', '.join(INPUT_KEYS)}")
    keys = [k for k in INPUT_KEYS if k in payload]
    if len(keys) > 1:
        raise UserError(f"the JSON body has the keys {', '.join(keys)}; send the rows under one of them")
    key = keys[0]
    extra = [k for k in payload if k != key]
    if extra:
        raise UserError(f"unknown keys {extra[:5]} next to {key!r}; the body holds {key!r} only")
    value = payload[key]
    if isinstance(value, list | dict) and len(value) == 0:
        raise UserError(f"{key!r} holds no rows")
    try:
        frame = _frame(key, value, schema)
    except RecursionError:
        raise UserError("the request is nested too deeply to be a table of rows") from None
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
        raise UserError(f"{key!r} is not a table of rows: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if len(frame) == 0:
        raise UserError(f"{key!r} holds no rows")
    if len(frame) > max_rows:
        raise TooLarge(f"the request has {len(frame)} rows; this server takes at most {max_rows} per request "
                       "(--max-rows): send them in smaller batches")
    return frame


def _frame(key: str, value, schema=None) -> pd.DataFrame:
    if key == "dataframe_split":
        if not isinstance(value, dict) or "data" not in value:
            raise UserError('\'dataframe_split\' needs {"columns": [...], "data": [[...]]}')
        if value["data"] is not None and not isinstance(value["data"], list):
            raise UserError("'dataframe_split' data must be a list of rows")
        if value.get("columns") is not None and not isinstance(value["columns"], list):
            raise UserError("'dataframe_split' columns must be a list of column names")
        return pd.DataFrame(value["data"], columns=value.get("columns"))
    if key == "dataframe_records" or (isinstance(value, list) and value and isinstance(value[0], dict)):
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            raise UserError(f"{key!r} must be a list of records, one {{column: value}} object per row")
        return pd.DataFrame.from_records(value)
    if isinstance(value, dict):  # {"column": [values, ...], ...}
        if not all(isinstance(v, list) for v in value.values()):
            raise UserError(f"{key!r} as an object needs a list of values per column")
        return pd.DataFrame(value)
    if not isinstance(value, list):
        raise UserError(f"{key!r} must be a list of rows")
    try:
        shapes = {np.shape(row) for row in value}
    except ValueError:  # ragged or too deep: not one number per cell
        raise UserError(f"the rows of {key!r} must be lists of numbers (an image's may be nested lists of one "
                        "shape)") from None
    if schema is not None:
        from dl_uncertainty.data.rows import check_row_shape

        for shape in shapes:
            check_row_shape(shape, schema, key, len(value))
    lengths = {int(np.prod(shape)) for shape in shapes}
    if schema is not None and len(lengths) == 1 and lengths != {schema.num_features}:  # before a frame that wide
        raise UserError(f"expected {schema.num_features} values per row, got {lengths.pop()}")
    if len(lengths) > 1:
        raise UserError(f"the rows of {key!r} have different lengths ({min(lengths)} to {max(lengths)} values)")
    from dl_uncertainty.tracking.runs import (
        as_frame,  # here: mlflow is loaded by then, and --help stays fast
    )

    return as_frame(value)


def check_cells(frame: pd.DataFrame, names: list[str]) -> None:
    """Refuse cells that pandas would silently turn into numbers (true -> 1) or that are not one value."""
    def name(col: int) -> str:
        return str(frame.columns[col]) if not isinstance(frame.columns, pd.RangeIndex) else (
            names[col] if col < len(names) else str(col))

    suspect = [col for col, dtype in enumerate(frame.dtypes) if dtype.kind in ("b", "O")]
    for col in suspect:  # a numeric column holds numbers only: reading each column costs ~20 us
        series = frame.iloc[:, col]
        if series.dtype == bool:
            raise UserError(f"row 0 column {name(col)!r} is {str(bool(series.iloc[0])).lower()}, a boolean; "
                            "every feature must be a number")
        for row, cell in enumerate(series.array):
            if isinstance(cell, bool | np.bool_):
                raise UserError(f"row {row} column {name(col)!r} is {str(bool(cell)).lower()}, a boolean; "
                                "every feature must be a number")
            if isinstance(cell, list | dict | tuple):
                raise UserError(f"row {row} column {name(col)!r} holds {'a list' if not isinstance(cell, dict) else 'an object'}, "
                                "not one number; send one value per column")


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


def info(wrapper) -> dict[str, Any]:
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
            content = await run_in_threadpool(predict, await request.body(), headers.get("content-type"),
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
        return error(f"{what} ({request.method} {request.url.path}); this server answers {routes}", err.status_code)

    app.add_exception_handler(Exception, failed)
    app.add_exception_handler(HTTPException, refused)

    app.post("/invocations")(answer)
    app.post(f"/v1/models/{name}:predict")(answer)
    ready = lambda: {"status": "ready", "name": name}  # noqa: E731
    app.get("/health")(ready)
    app.get("/ping")(ready)
    app.get(f"/v1/models/{name}")(ready)
    app.get("/info")(lambda: info(wrapper))
    return app


def warm_up(wrapper) -> None:
    """One prediction before the first request: the MC plan is made and the sample cache filled."""
    try:
        wrapper.predict_rows(np.zeros((1, wrapper.schema.num_features), np.float32))
    except Exception:  # noqa: BLE001 -- requests will say what fails; serving starts regardless
        log.warning("the warm-up prediction failed", exc_info=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dl_uncertainty.serve", description=__doc__.split("\n\n")[0],
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
    if args.max_rows < 1:
        print(f"error: --max-rows must be at least 1, got {args.max_rows}", file=sys.stderr)
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
