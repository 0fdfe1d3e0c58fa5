"""Shared fixtures: tiny configs, digits splits, and real servers (MLflow, S3) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.tables import prepare

REPO = Path(__file__).resolve().parents[1]
os.environ.pop("DLU_TUNE_STORAGE", None)  # set by `make stack-up`'s env; tests choose their storage
VENV_BIN = Path(sys.executable).parent

TINY = [
    "train.epochs=3", "train.early_stopping_patience=0", "train.val_mc_samples=3",
    "model.hidden_sizes=[64]", "evaluate.mc_samples=8",
]

# The champion gate's thresholds, loosened for runs of a few epochs whose winner must become champion;
# the gate itself is tested with thresholds the winner fails (tests/components).
LOOSE_GATE = ["evaluate.champion_gate.max_ece=0.5", "evaluate.champion_gate.min_ood_auroc=0.5",
              "evaluate.champion_gate.coverage_slack=0.4"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def tiny_cfg():
    return lambda *overrides: load_config([*TINY, *overrides])


@pytest.fixture
def one_thread():
    """Tiny models: a second OpenMP thread only adds barrier waits (badly so on a busy machine)."""
    import torch  # here: most test sessions never load it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_splits():
    cfg = load_config(TINY)
    return prepare(cfg.data, cfg.seed)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` process (lean flags) on an ephemeral port; yields its URI."""
    from dl_uncertainty.tracking.store import serve_local_store

    with serve_local_store(f"sqlite:///{tmp_path_factory.mktemp('mlflow-server') / 'mlflow.db'}") as (uri, _):
        yield uri


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 as a real HTTP endpoint on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder so sqlite:///mlflow.db and checkpoints land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@contextmanager
def model_server(env: dict, cwd: Path | None = None, timeout: float = 180, args: tuple[str, ...] = ()):
    """``python -m dl_uncertainty.serve *args`` (the champion, by default) in a fresh process; yields its URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dl_uncertainty.serve", "--port", str(port), *args], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    pytest.fail(f"the model server did not start: {server.stdout.read()[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_module(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """``python -m <module> args`` in a fresh process; returns the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)



class ServedModel(NamedTuple):
    url: str
    run_id: str
    uri: str  # its MLflow tracking URI


@pytest.fixture(scope="session")
def tiny_served_model(tmp_path_factory, digits_splits):
    """A one-epoch MC-Dropout model on digits, logged and served from a fresh process (at most 50 rows a
    request), for the tests of what the server answers to odd requests."""
    from dl_uncertainty.train import train_and_log

    tmp = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config([*TINY, "model=mc_dropout_dnn", "train.epochs=1", "model.hidden_sizes=[16]",
                       f"tracking_uri={uri}", f"train.checkpoint_dir={tmp / 'ckpt'}"])
    trained = train_and_log(cfg, digits_splits["train"], digits_splits["val"], digits_splits["calib"])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": "/usr/bin:/bin"}
    with model_server(env, cwd=tmp, args=("--model", f"runs:/{trained.run_id}/model", "--max-rows", "50")) as url:
        yield ServedModel(url, trained.run_id, uri)
