"""The pipeline in containers, for real: the project image built with podman or Docker, every task
run in it by kfp.local's DockerRunner, against the local production-parity stack (PostgreSQL-backed
MLflow serving artifacts into S3). `make test-e2e`; CI runs it where podman works.

Knobs: E2E_ENGINE (podman|docker, default: the one found), E2E_BASE (auto|offline|registry: where
the image's Python base comes from; auto tries the registry, then `make offline-base` builds one from
Debian packages).

The image is tagged e2e-<checkout>-<content>: a checkout removes its own older e2e images, never
another checkout's (the image store is shared by every checkout on the machine).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LOOSE_GATE, TINY, free_port

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
REGISTRY_BASE = "python:3.11.15-slim-bookworm"  # images/Dockerfile's CPU_BASE_IMAGE
IMAGE_INPUTS = ["pyproject.toml", "README.md", "images/Dockerfile", "src", "configs"]
# a Bayesian and an ensemble branch: two containers per family, on 2 cores; MC-Dropout runs alone below
MODELS = ["bnn", "deep_ensemble"]
RUN_OVERRIDES = [*TINY, "train.epochs=4", "experiment_name=e2e", *LOOSE_GATE]
TIMINGS: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("container run")
        for name, value in TIMINGS.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def timings() -> dict[str, str]:
    """Where a test leaves a measured number for the terminal summary (this module's TIMINGS: importing
    it by name in a test module would give another copy)."""
    return TIMINGS


def sh(cmd: list[str], env: dict | None = None, timeout: float = 1200, check: bool = True):
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                         timeout=timeout)
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:3])} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}",
                    pytrace=False)
    return out


@pytest.fixture(scope="session")
def engine() -> str:
    """The first of podman and Docker that can run containers here (E2E_ENGINE picks one)."""
    os.environ.setdefault("CONTAINERS_CONF", str(HERE / "containers.conf"))
    candidates = [os.environ["E2E_ENGINE"]] if os.environ.get("E2E_ENGINE") else ["podman", "docker"]
    problems = []
    for name in candidates:
        if not shutil.which(name):
            problems.append(f"{name} not installed")
            continue
        probe = sh([name, "info"], check=False, timeout=120)
        if probe.returncode == 0:
            return name
        problems.append(f"`{name} info` fails: {(probe.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    pytest.fail("containers cannot run here (" + "; ".join(problems) + "): install podman and runc "
                "(apt-get install podman runc debootstrap) or start Docker", pytrace=False)


@pytest.fixture(scope="session")
def docker_host(engine, tmp_path_factory):
    """The Docker API kfp.local talks to: Docker's own, or podman's compatible socket for this session."""
    if engine == "docker" or os.environ.get("DOCKER_HOST"):
        yield os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return
    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen([engine, "system", "service", "--time=0", f"unix://{sock}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        yield f"unix://{sock}"
    finally:
        service.terminate()
        service.wait(timeout=30)


def _base_image(engine: str) -> str:
    mode = os.environ.get("E2E_BASE", "auto")
    if mode in ("auto", "registry"):
        have = sh([engine, "image", "inspect", REGISTRY_BASE], check=False).returncode == 0
        if have or sh([engine, "pull", REGISTRY_BASE], check=False, timeout=600).returncode == 0:
            return REGISTRY_BASE
        if mode == "registry":
            pytest.fail(f"cannot pull {REGISTRY_BASE}; E2E_BASE=offline builds a base without a registry",
                        pytrace=False)
    tic = time.perf_counter()
    base = sh(["make", "--no-print-directory", "-s", "offline-base", f"CONTAINER_ENGINE={engine}"]).stdout.strip()
    TIMINGS["offline base image"] = f"{base} ({time.perf_counter() - tic:.0f} s, cached by content hash)"
    return base


# this checkout's mark in its e2e tags
CHECKOUT = hashlib.sha256(str(REPO).encode()).hexdigest()[:8]


def _content_tag(base: str) -> str:
    digest = hashlib.sha256(base.encode())
    for entry in IMAGE_INPUTS:
        path = REPO / entry
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(REPO)).encode() + file.read_bytes())
    return f"e2e-{CHECKOUT}-{digest.hexdigest()[:16]}"


@pytest.fixture(scope="session")
def image(engine) -> dict[str, str]:
    """Builds the CPU image with `make image-cpu` (skipped when this exact content was built before)."""
    base = _base_image(engine)
    tag = _content_tag(base)
    if sh([engine, "image", "inspect", f"dl-uncertainty:{tag}"], check=False).returncode != 0:
        tic = time.perf_counter()
        sh(["make", "--no-print-directory", "image-cpu", f"CONTAINER_ENGINE={engine}", f"IMAGE_TAG={tag}",
            f"CPU_BASE_IMAGE={base}"])
        TIMINGS["image build"] = f"dl-uncertainty:{tag} ({time.perf_counter() - tic:.0f} s)"
        remove_older_e2e_images(engine, keep=tag)
    return {"DLU_IMAGE_REPO": "dl-uncertainty", "DLU_IMAGE_TAG": tag}


def stale_e2e_images(listing: str, keep: str) -> list[str]:
    """The images this checkout's earlier e2e builds left (other content hashes), from `<engine> images`
    lines of repository:tag: only dl-uncertainty (also as podman's localhost/ and kind-load's
    docker.io/library/ names), only e2e-<this checkout>-<hash> tags, never ``keep``."""
    found = []
    for name in listing.split():
        repo, _, tag = name.rpartition(":")
        ours = repo in ("dl-uncertainty", "localhost/dl-uncertainty", "docker.io/library/dl-uncertainty")
        if ours and re.fullmatch(rf"e2e-{CHECKOUT}-[0-9a-f]{{16}}", tag) and tag != keep:
            found.append(name)
    return found


def remove_older_e2e_images(engine: str, keep: str) -> None:
    """Each change to the image's inputs builds a new e2e image of a few GB: keep only this checkout's newest."""
    listing = sh([engine, "images", "--format", "{{.Repository}}:{{.Tag}}"], check=False).stdout
    for name in stale_e2e_images(listing, keep):
        sh([engine, "rmi", name], check=False)  # untags; the layers go once no tag holds them


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """`make stack-up`'s script on free ports; yields the environment it writes; stops it after."""
    state = tmp_path_factory.mktemp("stack")
    env = {"STACK_DIR": str(state), "VENV": str(Path(sys.executable).parents[1]),
           "STACK_MLFLOW_PORT": str(free_port()), "STACK_S3_PORT": str(free_port()), "STACK_PG_PORT": str(free_port())}
    script = str(REPO / "k8s" / "scripts" / "local-stack.sh")
    try:
        sh([script, "up"], env=env, timeout=300)
        values = dict(re.findall(r"^export (\w+)=(.*)$", (state / "env").read_text(), re.M))
        yield {**values, "STACK_DIR": str(state)}
    finally:
        sh([script, "down"], env=env, check=False)


def run_pipeline(*overrides: str, env: dict, root: Path, timeout: float = 1200):
    return sh([sys.executable, "-m", "pipelines", "run-local", "--runner", "docker", "--verbose", "--pipeline-root", str(root),
               *overrides], env=env, check=False, timeout=timeout)


@pytest.fixture(scope="session")
def container_env(image, docker_host, stack) -> dict[str, str]:
    return {**image, **stack, "DOCKER_HOST": docker_host}


@pytest.fixture(scope="session")
def container_run(container_env, tmp_path_factory):
    """The whole pipeline, every task in the image, against the stack."""
    root = tmp_path_factory.mktemp("pipeline-root")
    tic = time.perf_counter()
    out = run_pipeline(*RUN_OVERRIDES, f"pipeline.models=[{','.join(MODELS)}]", env=container_env, root=root)
    TIMINGS["pipeline in containers"] = f"{time.perf_counter() - tic:.0f} s (exit {out.returncode})"
    if times := re.search(r"^task wall times \(s\): (.*)$", out.stdout, re.M):
        TIMINGS["task wall times (s)"] = times[1]
    return out, root
