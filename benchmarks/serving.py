"""Serving latency of the logged pyfunc: one example, evaluate.mc_samples MC samples (default 50).

Trains each model briefly, logs it to a temporary MLflow store, then measures
  model time   ``pyfunc.load_model(...).predict(one row)`` in this process (median of many calls)
  HTTP time    the same request through ``mlflow models serve --env-manager local`` (/invocations)
against a baseline in the same process: the same model's naive loop of T forward passes.

    python benchmarks/serving.py [--calls 200] [key=value overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_ms(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return 1000 * statistics.median(times)


def _serve(model_uri: str, env: dict, calls: int, row: np.ndarray) -> float:
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
           "local", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = json.dumps({"inputs": row.tolist()}).encode()
    url = f"http://127.0.0.1:{port}/invocations"

    def post():
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(req, timeout=30).read()

    try:
        for _ in range(120):
            try:
                post()
                break
            except OSError:
                time.sleep(0.5)
        return _median_ms(post, calls)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def measure(cfg, env: dict, calls: int) -> str:
    """One table row: train briefly, log, then time the naive loop, pyfunc predict and HTTP."""
    import mlflow

    from dl_uncertainty.data import prepare
    from dl_uncertainty.inference import mc_mode
    from dl_uncertainty.train import train_and_log

    trained = train_and_log(cfg)
    row = prepare(cfg.data, cfg.seed)["test"].x[:1]
    uri = f"runs:/{trained.run_id}/model"
    loaded = mlflow.pyfunc.load_model(uri)
    predict_ms = _median_ms(lambda: loaded.predict(row), calls)
    net, x, samples = trained.model, torch.as_tensor(row), cfg.evaluate.mc_samples

    def loop():
        with mc_mode(net), torch.inference_mode():
            torch.stack([torch.log_softmax(net(x), -1) for _ in range(samples)])

    loop_ms = _median_ms(loop, calls)
    http_ms = _serve(uri, env, max(20, calls // 4), row)
    return (f"| {cfg.model.name} | {samples} | {loop_ms:.2f} | {predict_ms:.2f} | {http_ms:.2f} | "
            f"{loop_ms / predict_ms:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--models", default="bnn,mc_dropout_dnn")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from dl_uncertainty.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # serve runs uvicorn
        os.environ.update(env)
        os.chdir(tmp)
        print("| model | T | naive loop ms | pyfunc predict ms | HTTP /invocations ms | loop / predict |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name in args.models.split(","):
            print(measure(load_config([f"model={name}", "train.epochs=3", *args.overrides]), env, args.calls))

if __name__ == "__main__":
    main()
