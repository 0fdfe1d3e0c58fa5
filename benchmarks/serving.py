"""Serving: requests/s and p50/p95/p99 latency of the served model at batch 1 and 64, 50 MC samples.

Trains each model briefly, logs it to a temporary MLflow store, serves it with
``python -m dl_uncertainty.serve`` (what ``make serve`` and the KServe predictor run) and sends raw
inputs to /invocations from one client, one request at a time; the models' servers run side by side
and take turns, request by request, so that the machine's load weighs on each alike. Baseline, in
this process: the model's naive loop of T forward passes on the same (already scaled) batch, which is the floor a
server could reach without MC batching, input checks, calibration and JSON. The server keeps each
model's seeded MC draws (the BNN's noise vectors, MC-Dropout's masks) in its sample cache (default 256 MB); pass
``--sample-cache-mb 0`` to measure drawing them on every request.

    python benchmarks/serving.py [--requests 300] [--models bnn,mc_dropout_dnn,deep_ensemble] [overrides]
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

BATCHES = (1, 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _times_ms(fn, n: int) -> list[float]:
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - tic))
    return times


def _start_server(model_uri: str, env: dict, args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dl_uncertainty.serve", "--model", model_uri, "--port", str(port),
                             *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server for {model_uri} did not start")


def _served(cfg, env: dict, server_args: tuple[str, ...]) -> dict:
    """Train ``cfg.model`` briefly, log it and start its server."""
    from dl_uncertainty.data.tables import prepare
    from dl_uncertainty.train import train_and_log

    trained = train_and_log(cfg)
    proc, url = _start_server(f"runs:/{trained.run_id}/model", env, server_args)
    return {"cfg": cfg, "net": trained.model, "test": prepare(cfg.data, cfg.seed)["test"], "proc": proc, "url": url}


def _loop_ms(model: dict, x: torch.Tensor) -> float:
    """The naive loop of T forward passes on rows ``x`` (already scaled), median of 100."""
    from dl_uncertainty.families.deep_ensemble import Ensemble
    from dl_uncertainty.uncertainty.mc_plan import mc_mode

    net, samples = model["net"], model["cfg"].evaluate.mc_samples

    def loop():
        with mc_mode(net), torch.inference_mode():
            if isinstance(net, Ensemble):
                return torch.log_softmax(net.member_logits(x), -1)
            return torch.stack([torch.log_softmax(net(x), -1) for _ in range(samples)])

    return statistics.median(_times_ms(loop, 100))


def _request(model: dict, batch: int) -> urllib.request.Request:
    from dl_uncertainty.data.rows import unscaled

    test = model["test"]
    body = json.dumps({"dataframe_split": {"columns": test.schema.feature_names,
                                           "data": np.rint(unscaled(test.x[:batch], test.schema)).tolist()}})
    return urllib.request.Request(f"{model['url']}/invocations", data=body.encode(),
                                  headers={"Content-Type": "application/json"})


def measure(models: dict[str, dict], requests: int, p50s: dict) -> list[str]:
    """Table rows: per batch size and model, the naive loop vs the served request. The models' requests
    take turns (one to each server, round after round, the first of a round rotating), so a change of the
    machine's load hits all alike."""
    from dl_uncertainty.families.deep_ensemble import Ensemble

    rows: dict[tuple[str, int], str] = {}
    for batch in BATCHES:
        sent = {name: _request(m, batch) for name, m in models.items()}
        for r in sent.values():
            for _ in range(5):
                urllib.request.urlopen(r, timeout=60).read()
        times: dict[str, list[float]] = {name: [] for name in models}
        order = list(sent)
        for i in range(requests):
            for name in order[i % len(order):] + order[:i % len(order)]:  # who goes first rotates: no order bias
                r = sent[name]
                tic = time.perf_counter()
                urllib.request.urlopen(r, timeout=60).read()
                times[name].append(1000 * (time.perf_counter() - tic))
        for name, m in models.items():
            cfg, net = m["cfg"], m["net"]
            loop_ms = _loop_ms(m, torch.as_tensor(m["test"].x[:batch]))
            p50, p95, p99 = np.percentile(times[name], [50, 95, 99])
            p50s[name, batch] = p50
            per_second = 1000 * len(times[name]) / sum(times[name])
            draws = cfg.model.ensemble_size if isinstance(net, Ensemble) else cfg.evaluate.mc_samples
            rows[name, batch] = (f"| {name} | {batch} | {draws} | {loop_ms:.2f} | {p50:.2f} | {p95:.2f} | {p99:.2f} | "
                                 f"{per_second:.0f} | {per_second * batch:.0f} | {p50 / loop_ms:.1f}x |")
    return [rows[name, batch] for name in models for batch in BATCHES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per batch size (default 300)")
    parser.add_argument("--models", default="bnn,mc_dropout_dnn,deep_ensemble")
    parser.add_argument("--sample-cache-mb", default=None, help="the server's sample cache (default: its own, 256)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. evaluate.mc_samples=100")
    args = parser.parse_args()

    from dl_uncertainty.config.compose import load_config

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        os.environ.update(env)
        os.chdir(tmp)
        load = os.getloadavg()[0]
        print(f"{os.cpu_count()} CPU cores, load average {load:.2f}, torch {torch.__version__}, one client, "
              "sequential requests")
        print("| model | batch | MC samples | naive loop ms | served p50 ms | p95 ms | p99 ms | requests/s | rows/s "
              "| p50 / loop |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        p50s: dict = {}
        server_args = ("--sample-cache-mb", args.sample_cache_mb) if args.sample_cache_mb is not None else ()
        models: dict[str, dict] = {}
        try:
            for name in args.models.split(","):
                cfg = load_config([f"model={name}", "train.epochs=3", *args.overrides])
                models[name] = _served(cfg, env, server_args)
            for row in measure(models, args.requests, p50s):
                print(row, flush=True)
        finally:
            for m in models.values():
                m["proc"].terminate()
                m["proc"].wait(timeout=20)
        if ("bnn", 1) in p50s and ("mc_dropout_dnn", 1) in p50s:
            print(f"BNN p50 / MC-Dropout p50 at batch 1: {p50s['bnn', 1] / p50s['mc_dropout_dnn', 1]:.2f}x; "
                  f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
