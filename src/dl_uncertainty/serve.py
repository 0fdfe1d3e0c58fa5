"""Serve a logged model over HTTP: raw inputs in; calibrated probabilities, uncertainty, a conformal
prediction set and an abstain flag out.

    python -m dl_uncertainty.serve [--model models:/dl-uncertainty@champion] [--port 5001]

POST /invocations                  MLflow's JSON formats: {"dataframe_split": {"columns": [...], "data": [[...]]}},
                                   {"dataframe_records": [{...}]}, {"inputs": [[...]]} or {"instances": [[...]]}
POST /v1/models/<name>:predict     KServe's v1 protocol: {"instances": [[...]]}
    -> {"predictions": [{"prob_<class>": ..., "predicted_class": ..., "predictive_entropy": ...,
                         "mutual_information": ..., "prediction_set": [...], "set_size": ..., "abstain": ...}]}
GET  /health, /v1/models/<name>    ready?        GET /info   the columns it takes (and their range: [0, 1]
                                   for an image model's pixels), its classes, its calibration

Bad input gets a 400 whose body is one sentence: {"error": "..."}; a failure of the server itself a 500
of the same shape (its traceback goes to the server's log). The model is any MLflow model URI
this package logged (``models:/<name>@<alias>``, ``runs:/<id>/model``, a local folder), on the store
MLFLOW_TRACKING_URI points at (default ``sqlite:///mlflow.db``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from typing import Any

import numpy as np
import pandas as pd
from starlette.requests import Request  # noqa: I001 -- module level: FastAPI resolves annotations here

from dl_uncertainty.errors import UserError

DEFAULT_MODEL = "models:/dl-uncertainty@champion"
INPUT_KEYS = ("dataframe_split", "dataframe_records", "inputs", "instances")
log = logging.getLogger("dl_uncertainty.serve")


def load(uri: str):
    """The logged pyfunc's ``UncertaintyModel`` (weights, schema, calibration), or a one-line error."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from dl_uncertainty.tracking import store
    from dl_uncertainty.training.loop import set_threads

    mlflow.set_tracking_uri(store.tracking_uri())
    store.check_reachable(store.tracking_uri())
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


def parse(body: bytes) -> pd.DataFrame:
    """A request body in one of MLflow's JSON formats as a DataFrame (columns named or positional)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise UserError('the body is not JSON; send {"dataframe_split": {"columns": [...], "data": [[...]]}}') from None
    if not isinstance(payload, dict) or not any(k in payload for k in INPUT_KEYS):
        raise UserError(f"the JSON body needs one of the keys {', '.join(INPUT_KEYS)}")
    key = next(k for k in INPUT_KEYS if k in payload)
    value = payload[key]
    if isinstance(value, list | dict) and len(value) == 0:
        raise UserError(f"{key!r} holds no rows")
    try:
        if key == "dataframe_split":
            return pd.DataFrame(value["data"], columns=value.get("columns"))
        if key == "dataframe_records" or (isinstance(value, list) and value and isinstance(value[0], dict)):
            return pd.DataFrame.from_records(value)
        if isinstance(value, dict):  # {"column": [values, ...], ...}
            return pd.DataFrame(value)
        lengths = {len(np.ravel(row)) for row in value}
        if len(lengths) > 1:
            raise UserError(f"the rows of {key!r} have different lengths ({min(lengths)} to {max(lengths)} values)")
        from dl_uncertainty.tracking.runs import (
            as_frame,  # here: mlflow is loaded by then, and --help stays fast
        )

        return as_frame(value)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{key!r} is not a table of rows: {str(err).splitlines()[0]}") from None


def info(wrapper) -> dict[str, Any]:
    schema, cal = wrapper.schema, wrapper.calibration
    from dl_uncertainty.data.rows import input_range

    return {"model": wrapper.cfg.model.name, "columns": schema.feature_names, "feature_shape": schema.feature_shape,
            "input_range": input_range(schema),  # [0, 1] for images: pixels / 255; null: any finite number
            "classes": schema.class_names, "mc_samples": wrapper.cfg.evaluate.mc_samples,
            "calibration": cal.to_dict() if cal else None}


def create_app(wrapper, name: str = "dl-uncertainty"):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    from dl_uncertainty.data.rows import raw_to_rows

    app = FastAPI(title=f"{name}: uncertainty-aware predictions", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # seeded MC sampling uses torch's global generator: one request at a time

    def predict(body: bytes) -> str:
        x = raw_to_rows(parse(body), wrapper.schema)
        with lock:
            frame = wrapper.predict_rows(x)
        return '{"predictions": ' + frame.to_json(orient="records", double_precision=15) + "}"

    async def answer(request: Request) -> Response:
        try:
            content = await run_in_threadpool(predict, await request.body())
        except UserError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        except Exception as err:  # a bug, not the client's input: one sentence out, the traceback in the log
            log.exception("prediction failed")
            return JSONResponse({"error": f"the model failed on this request ({type(err).__name__}); "
                                          "the server log has the details"}, status_code=500)
        return Response(content, media_type="application/json")

    app.post("/invocations")(answer)
    app.post(f"/v1/models/{name}:predict")(answer)
    ready = lambda: {"status": "ready", "name": name}  # noqa: E731
    app.get("/health")(ready)
    app.get("/ping")(ready)
    app.get(f"/v1/models/{name}")(ready)
    app.get("/info")(lambda: info(wrapper))
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dl_uncertainty.serve", description=__doc__.split("\n\n")[0],
                                     epilog="Endpoints and formats: see the module docstring or README.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"MLflow model URI (default {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    parser.add_argument("--name", default="dl-uncertainty", help="model name in KServe's /v1/models/<name> paths")
    args = parser.parse_args(argv)
    try:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
        wrapper = load(args.model)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    cal = wrapper.calibration
    detail = f", {cal.method.upper()} sets at alpha {cal.alpha:g}" if cal else ", no calibration (always abstains)"
    print(f"serving {wrapper.cfg.model.name} ({len(wrapper.schema.feature_names or [])} input columns"
          f"{detail}) on http://{args.host}:{args.port}/invocations", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(wrapper, args.name), host=args.host, port=args.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
