"""k8s/scripts/ensure-secrets.sh against a fake kubectl that keeps Secrets in a JSON file:
creates random credentials once, never rotates them, keeps kubeflow's copy equal to dlu's,
and never puts a value on a command line."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from k8s_helpers import K8S_DIR, run

SCRIPT = K8S_DIR / "scripts" / "ensure-secrets.sh"

FAKE_KUBECTL = r'''#!__PYTHON__
"""Minimal kubectl stand-in for ensure-secrets.sh (state in $FAKE_KUBE_STATE)."""
import base64, json, os, sys
import yaml

state_path = os.environ["FAKE_KUBE_STATE"]
with open(state_path) as f:
    state = json.load(f)
with open(os.environ["FAKE_KUBE_ARGV_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")

args = sys.argv[1:]
ns = None
if args[:1] == ["-n"]:
    ns, args = args[1], args[2:]

def save():
    with open(state_path, "w") as f:
        json.dump(state, f)

if args[:2] == ["get", "namespace"]:
    sys.exit(0 if args[2] in state["namespaces"] else 1)
if args[:2] == ["get", "secret"]:
    secret = state["secrets"].get(f"{ns}/{args[2]}")
    if secret is None:
        sys.exit(1)
    if "-o" in args:
        key = args[args.index("-o") + 1].split(".data.")[1].rstrip("}")
        sys.stdout.write(secret["data"].get(key, ""))
    sys.exit(0)
if args[:3] == ["create", "secret", "generic"]:
    assert "--from-env-file=/dev/stdin" in args and "--dry-run=client" in args
    data = {}
    for line in sys.stdin.read().splitlines():
        k, v = line.split("=", 1)
        data[k] = base64.b64encode(v.encode()).decode()
    yaml.safe_dump({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": args[3], "namespace": ns}, "data": data}, sys.stdout)
    sys.exit(0)
if args[:1] == ["label"] and "--local" in args:
    obj = yaml.safe_load(sys.stdin.read())
    k, v = args[-1].split("=", 1)
    obj["metadata"].setdefault("labels", {})[k] = v
    yaml.safe_dump(obj, sys.stdout)
    sys.exit(0)
if args[:3] == ["apply", "-f", "-"]:
    obj = yaml.safe_load(sys.stdin.read())
    assert obj["kind"] == "Secret"
    meta = obj["metadata"]
    state["secrets"][f"{meta['namespace']}/{meta['name']}"] = {"data": obj["data"]}
    save()
    sys.exit(0)
sys.stderr.write(f"fake kubectl: unsupported {sys.argv[1:]}\n")
sys.exit(2)
'''


@pytest.fixture()
def fake_kube(tmp_path: Path):
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed by k8s/scripts/ensure-secrets.sh", pytrace=False)
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("__PYTHON__", sys.executable))
    kubectl.chmod(0o755)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"namespaces": ["dlu", "kubeflow"], "secrets": {}}))
    argv_log = tmp_path / "argv.log"
    argv_log.write_text("")
    env = {
        **os.environ,
        "KUBECTL": str(kubectl),
        "FAKE_KUBE_STATE": str(state),
        "FAKE_KUBE_ARGV_LOG": str(argv_log),
    }

    class Kube:
        def run(self):
            return run(["bash", str(SCRIPT)], env=env)

        def secrets(self) -> dict[str, dict[str, str]]:
            raw = json.loads(state.read_text())["secrets"]
            return {
                name: {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
                for name, s in raw.items()
            }

        def set_state(self, **changes):
            data = json.loads(state.read_text())
            data.update(changes)
            state.write_text(json.dumps(data))

        def argv(self) -> str:
            return argv_log.read_text()

    return Kube()


def test_creates_once_and_never_rotates(fake_kube):
    first = fake_kube.run()
    assert first.returncode == 0, first.stderr
    secrets = fake_kube.secrets()
    assert set(secrets) == {
        "dlu/dlu-s3-credentials",
        "kubeflow/dlu-s3-credentials",
        "dlu/mlflow-postgres",
        "dlu/optuna-postgres",
        "kubeflow/optuna-postgres",
    }
    s3 = secrets["dlu/dlu-s3-credentials"]
    assert set(s3) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert len(s3["AWS_ACCESS_KEY_ID"]) == 20 and len(s3["AWS_SECRET_ACCESS_KEY"]) == 40
    assert secrets["kubeflow/dlu-s3-credentials"] == s3
    assert len(secrets["dlu/mlflow-postgres"]["POSTGRES_PASSWORD"]) == 48
    optuna = secrets["dlu/optuna-postgres"]
    assert set(optuna) == {"OPTUNA_DB_PASSWORD"} and len(optuna["OPTUNA_DB_PASSWORD"]) == 48
    assert secrets["kubeflow/optuna-postgres"] == optuna
    assert optuna["OPTUNA_DB_PASSWORD"] != secrets["dlu/mlflow-postgres"]["POSTGRES_PASSWORD"]

    second = fake_kube.run()
    assert second.returncode == 0, second.stderr
    assert fake_kube.secrets() == secrets, "a redeploy must not rotate credentials"

    values = [*s3.values(), secrets["dlu/mlflow-postgres"]["POSTGRES_PASSWORD"], optuna["OPTUNA_DB_PASSWORD"]]
    encoded = [base64.b64encode(v.encode()).decode() for v in values]
    for value in values + encoded:
        assert value not in fake_kube.argv(), "a secret value reached a command line"
        assert value not in first.stdout + first.stderr + second.stdout + second.stderr


def test_resyncs_kubeflow_copy_from_dlu(fake_kube):
    assert fake_kube.run().returncode == 0
    secrets = fake_kube.secrets()
    raw = {k: v for k, v in secrets.items() if not k.startswith("kubeflow/")}
    fake_kube.set_state(
        secrets={
            k: {"data": {kk: base64.b64encode(vv.encode()).decode() for kk, vv in v.items()}}
            for k, v in raw.items()
        }
    )
    assert fake_kube.run().returncode == 0
    assert fake_kube.secrets() == secrets


def test_fails_without_the_namespaces(fake_kube):
    fake_kube.set_state(namespaces=["dlu"])
    result = fake_kube.run()
    assert result.returncode != 0
    assert "kubeflow" in result.stderr
