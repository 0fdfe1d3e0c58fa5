"""mk/cluster.mk: every target is documented and dry-runs, image names follow the contract,
DLU_IMAGE_* reach the recipes' environment, and the docs/workflow only use real targets."""

from __future__ import annotations

import os
import re
import shutil
import tomllib

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


def test_image_cpu_builds_on_the_base_it_is_given_and_offline_base_makes_one():
    """A machine with no registry: `make image-cpu CPU_BASE_IMAGE=$(make -s offline-base)`."""
    given = _make_run("-n", "image-cpu", "CONTAINER_ENGINE=podman", "CPU_BASE_IMAGE=localhost/dlu-pybase:abc").stdout
    assert "--build-arg CPU_BASE_IMAGE=localhost/dlu-pybase:abc " in given and "podman build" in given
    assert "CPU_BASE_IMAGE" not in _make_run("-n", "image-cpu").stdout  # the Dockerfile's pinned python image
    script = REPO_ROOT / "images" / "offline-base" / "build.sh"
    offline = _make_run("-n", "offline-base", "CONTAINER_ENGINE=podman").stdout.strip()
    assert offline == f"CONTAINER_ENGINE=podman {script}"
    assert os.access(script, os.X_OK) and (script.parent / "Containerfile").is_file()
    # the CPU base the Dockerfile defaults to is the one the offline base stands in for
    assert re.search(r"^ARG CPU_BASE_IMAGE=python:3\.11", (REPO_ROOT / "images" / "Dockerfile").read_text(), re.M)


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
        "rollout status statefulset/mlflow-postgres",
        "exec mlflow-postgres-0 -c postgres -- sh /docker-entrypoint-initdb.d/10-optuna.sh$",
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


def _fake_engine_and_cluster(tmp_path):
    """podman, kind and minikube stand-ins on PATH: podman logs its calls and CONTAINERS_CONF and
    saves an "archive" holding the name it was asked to save; kind/minikube log the archive's name."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    scripts = {
        "podman": f'echo "podman $* conf=${{CONTAINERS_CONF:-}}" >>{log}\n'
                  'if [ "$1" = save ]; then echo "$4" >"$3"; fi\n',
        "kind": f'for a; do last=$a; done\necho "kind loads $(cat "$last")" >>{log}\n',
        "minikube": f'for a; do last=$a; done\necho "minikube loads $(cat "$last")" >>{log}\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CONTAINERS_CONF", "MAKEFLAGS") and not k.startswith("DLU_")}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}"}, log


@pytest.mark.parametrize(("repo", "pod_asks_for"), [
    ("dl-uncertainty", "docker.io/library/dl-uncertainty:t1"),
    ("localhost/dl-uncertainty", "docker.io/library/dl-uncertainty:t1"),
    ("me/dl-uncertainty", "docker.io/me/dl-uncertainty:t1"),
    ("ghcr.io/me/dl-uncertainty", "ghcr.io/me/dl-uncertainty:t1"),
    ("registry.local:5000/dl-uncertainty", "registry.local:5000/dl-uncertainty:t1"),
])
@pytest.mark.parametrize("target", ["kind-load", "minikube-load"])
def test_load_from_podman_saves_the_name_a_pod_asks_for(tmp_path, repo, pod_asks_for, target):
    env, log = _fake_engine_and_cluster(tmp_path)
    result = run([_make(), "--no-print-directory", "-f", str(CLUSTER_MK), target, "CONTAINER_ENGINE=podman",
                  f"IMAGE_REPO={repo}", "IMAGE_TAG=t1", "IMAGE_VARIANTS=cpu"], env=env)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    conf = f"conf={REPO_ROOT / 'images' / 'podman-containers.conf'}"
    assert calls == [f"podman tag {repo}:t1 {pod_asks_for} {conf}",
                     f"podman save -o {calls[1].split()[3]} {pod_asks_for} {conf}",
                     f"{target.split('-')[0]} loads {pod_asks_for}"]


def test_podman_targets_use_the_projects_settings_unless_containers_conf_is_set(tmp_path):
    env, log = _fake_engine_and_cluster(tmp_path)
    build = [_make(), "--no-print-directory", "-f", str(CLUSTER_MK), "image-cpu", "CONTAINER_ENGINE=podman",
             "IMAGE_TAG=t1"]
    assert run(build, env=env).returncode == 0
    assert run(build, env={**env, "CONTAINERS_CONF": "/etc/mine.conf"}).returncode == 0
    first, second = log.read_text().splitlines()
    assert first.startswith("podman build") and first.endswith(f"conf={REPO_ROOT / 'images' / 'podman-containers.conf'}")
    assert second.endswith("conf=/etc/mine.conf")
    settings = tomllib.loads((REPO_ROOT / "images" / "podman-containers.conf").read_text())
    assert "nofile=20000:20000" in settings["containers"]["default_ulimits"]
    docker = run([_make(), "--no-print-directory", "-f", str(CLUSTER_MK), "--eval", "conf: ; @echo [$$CONTAINERS_CONF]",
                  "conf", "CONTAINER_ENGINE=docker"], env=env)
    assert docker.stdout.strip() == "[]"  # Docker has nothing to do with podman's settings
