"""mk/cluster.mk: every target is documented and dry-runs, image names follow the contract,
DLU_IMAGE_* reach the recipes' environment, and the docs/workflow only use real targets."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import yaml
from k8s_helpers import REPO_ROOT, run

CLUSTER_MK = REPO_ROOT / "mk" / "cluster.mk"
TOP_MAKEFILE = REPO_ROOT / "Makefile"


def _make() -> str:
    make = shutil.which("make")
    if not make:
        pytest.fail("GNU make is needed to check mk/cluster.mk", pytrace=False)
    return make


def _make_run(*args: str, env_extra: dict[str, str] | None = None):
    env = {**os.environ, **(env_extra or {})}
    for var in ("IMAGE_TAG", "IMAGE_REPO", "DLU_IMAGE_TAG", "DLU_IMAGE_REPO", "MAKEFLAGS"):
        if env_extra is None or var not in env_extra:
            env.pop(var, None)
    return run([_make(), "--no-print-directory", "-f", str(CLUSTER_MK), *args], env=env)


def _documented_targets(makefile=CLUSTER_MK) -> dict[str, str]:
    return dict(re.findall(r"^([a-z][a-z0-9-]*):[^#\n=]*##\s*(.+)$", makefile.read_text(), re.M))


def test_required_targets_exist_and_are_documented():
    targets = _documented_targets()
    for required in (
        "images",
        "kind-load",
        "minikube-load",
        "cluster-up",
        "cluster-down",
        "deploy",
        "mlflow-port-forward",
        "kfp-ui",
        "minio-console",
    ):
        assert required in targets, f"target {required} missing or has no '## help' comment"
    declared = set(re.findall(r"^([a-z][a-z0-9-]*):(?!=)", CLUSTER_MK.read_text(), re.M))
    assert declared == set(targets), f"undocumented targets: {sorted(declared - set(targets))}"


@pytest.mark.parametrize("target", sorted(_documented_targets()))
@pytest.mark.parametrize("cluster", ["kind", "minikube"])
def test_every_target_dry_runs(target: str, cluster: str):
    result = _make_run("-n", target, f"CLUSTER={cluster}", "GPU=1", "IMAGE_TAG=0123456789ab")
    assert result.returncode == 0, f"make -n {target}: {result.stderr}"


def test_bad_cluster_is_refused():
    result = _make_run("-n", "cluster-up", "CLUSTER=k3d")
    assert result.returncode != 0 and "kind or minikube" in result.stderr


def test_image_names_follow_the_contract():
    result = _make_run("image-names", "IMAGE_TAG=0123456789ab")
    assert result.stdout.split() == [
        "dl-uncertainty:0123456789ab",
        "dl-uncertainty:0123456789ab-cuda",
    ]
    default = _make_run("image-names").stdout.split()
    assert len(default) == 2 and all(":latest" not in image for image in default)
    assert re.fullmatch(r"dl-uncertainty:([0-9a-f]{12}(-dirty)?|nogit)", default[0])
    cpu_only = _make_run("image-names", "IMAGE_VARIANTS=cpu", "IMAGE_TAG=t1").stdout.split()
    assert cpu_only == ["dl-uncertainty:t1"]


def test_pipeline_image_env_is_exported():
    result = _make_run(
        "--eval",
        "print-image-env: ; @echo $$DLU_IMAGE_REPO $$DLU_IMAGE_TAG",
        "print-image-env",
        "IMAGE_REPO=reg/x",
        "IMAGE_TAG=abc",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["reg/x", "abc"]


def test_deploy_order():
    lines = _make_run("-n", "deploy", "KUBECTL=kubectl").stdout.splitlines()
    order = [
        "apply -k .*/k8s/kfp/cluster-scoped",
        "wait --for condition=established",
        "apply -f .*/k8s/dlu/namespace.yaml",
        "ensure-secrets.sh",
        "apply -k .*/k8s/dlu$",
        "apply -k .*/k8s/kfp/platform",
        "rollout status deployment/mlflow",
        "-n kubeflow wait --for=condition=Available",
    ]
    positions = []
    for pattern in order:
        hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert hits, f"deploy does not run: {pattern}"
        positions.append(hits[0])
    assert positions == sorted(positions), "deploy steps out of order"


def _make_invocations(text: str) -> set[str]:
    targets = set()
    for line in re.findall(r"\bmake\s+([^\n`|;&]+)", text):
        for word in line.split():
            if "=" in word or word.startswith("-"):
                continue
            if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                break
            targets.add(word)
    return targets


def test_docs_and_workflow_use_existing_targets():
    known = set(_documented_targets()) | set(_documented_targets(TOP_MAKEFILE))
    docs = (REPO_ROOT / "docs" / "cluster.md").read_text()
    used = _make_invocations(docs)
    assert {
        "cluster-up",
        "deploy",
        "images",
        "kind-load",
        "pipeline-upload",
        "mlflow-port-forward",
        "kfp-ui",
    } <= used
    assert used <= known, f"docs/cluster.md uses unknown targets: {sorted(used - known)}"

    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "e2e-kind.yml").read_text())
    steps = workflow["jobs"]["e2e"]["steps"]
    script = "\n".join(step.get("run", "") for step in steps)
    used = _make_invocations(script)
    assert used <= known, f"workflow uses unknown targets: {sorted(used - known)}"
    assert "make cluster-up deploy images kind-load" in script
    assert "make pipeline-upload PIPELINE_FLAGS=--no-gpu" in script
    assert "make pipeline-run" in script
    assert re.fullmatch(r"v\d+\.\d+\.\d+", workflow["env"]["KIND_VERSION"])
