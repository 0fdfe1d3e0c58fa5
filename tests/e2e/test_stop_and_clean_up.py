"""What a run and a test run leave behind in the machine's container engine, which every checkout and
user shares: Ctrl-C and SIGTERM remove the run's own containers and stop the MLflow server it started,
and nothing else; the e2e image cleanup touches only this checkout's images; a missing image under make
names the make variable that picks another."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pipelines.__main__ import _descendants
from pipelines.containers import RUN_LABEL
from tests.e2e.conftest import (
    CHECKOUT,
    REPO,
    RUN_OVERRIDES,
    TINY,
    remove_older_e2e_images,
    sh,
)

pytestmark = pytest.mark.e2e


def _labelled(engine: str, value: str) -> list[str]:
    out = sh([engine, "ps", "-a", "--filter", f"label={RUN_LABEL}={value}", "--format", "{{.ID}}"])
    return out.stdout.split()


def _running(engine: str, container: str) -> bool:
    return sh([engine, "inspect", "--format", "{{.State.Running}}", container], check=False).stdout.strip() == "true"


@pytest.fixture
def other_container(engine, image):
    """A container of someone else's run, labelled as ours are but with another run's id."""
    name = f"dlu-e2e-other-{os.getpid()}"
    sh([engine, "run", "-d", "--rm", "--name", name, "--label", f"{RUN_LABEL}=someone-else",
        f"dl-uncertainty:{image['DLU_IMAGE_TAG']}", "python", "-c", "import time; time.sleep(900)"])
    try:
        yield name
    finally:
        sh([engine, "rm", "-f", name], check=False)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_stopping_a_run_removes_its_containers_and_its_mlflow_server_and_nothing_else(
        how, engine, image, docker_host, other_container, tmp_path, timings):
    env = {**os.environ, **image, "DOCKER_HOST": docker_host, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PYTHONUNBUFFERED": "1"}
    # two training branches that would run for hours: only a stop ends them
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "run-local", "--runner", "docker", "--pipeline-root",
                             str(tmp_path / "out"), *RUN_OVERRIDES, "train.epochs=100000",
                             "pipeline.models=[bnn,mc_dropout_dnn]"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a shell's foreground job
    try:
        run_id = None
        while run_id is None and proc.poll() is None:
            line = proc.stdout.readline()
            run_id = (re.search(rf"containers labelled {re.escape(RUN_LABEL)}=(\w+)", line) or [None, None])[1]
        assert run_id, proc.communicate()[1][-2000:]
        deadline = time.monotonic() + 600
        while len(_labelled(engine, run_id)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1)  # until both training containers run
        ours = _labelled(engine, run_id)
        servers = [pid for pid in _descendants(proc.pid) if b"mlflow" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(ours) == 2 and servers, f"{ours} {servers}"
        tic = time.monotonic()
        if how == "ctrl-c":  # the terminal signals the whole foreground group; an impatient user presses twice
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.5)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.terminate()
        _, stderr = proc.communicate(timeout=120)
        seconds = time.monotonic() - tic
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    timings[f"{how} to exit, 2 training containers"] = f"{seconds:.1f} s"
    assert proc.returncode == (130 if how == "ctrl-c" else 143)
    lines = [ln for ln in stderr.splitlines() if ln.strip() and " INFO " not in ln]  # a new mlflow.db's own lines
    assert lines == [f"error: {'interrupted' if how == 'ctrl-c' else 'terminated'}"], stderr[-2000:]
    assert _labelled(engine, run_id) == []  # removed, not just stopped: `podman ps -a` has none of them
    assert not any(_alive(pid) for pid in servers)
    assert _running(engine, other_container)


def test_only_this_checkouts_older_e2e_images_are_removed(engine, image):
    current = f"dl-uncertainty:{image['DLU_IMAGE_TAG']}"
    older_here = f"dl-uncertainty:e2e-{CHECKOUT}-{'0' * 16}"
    other_checkout = f"dl-uncertainty:e2e-{'f' * 8}-{'0' * 16}"
    pre_checkout_tag = f"dl-uncertainty:e2e-{'1' * 16}"  # the tag format before checkouts were told apart
    made = [older_here, other_checkout, pre_checkout_tag]
    try:
        for name in made:  # more names for the same image: cheap, and removing one only untags it
            sh([engine, "tag", current, name])
        remove_older_e2e_images(engine, keep=image["DLU_IMAGE_TAG"])

        def exists(name: str) -> bool:
            return sh([engine, "image", "inspect", name], check=False).returncode == 0

        assert not exists(older_here)
        assert exists(current) and exists(other_checkout) and exists(pre_checkout_tag)
    finally:
        for name in made:
            sh([engine, "rmi", name], check=False)


def test_a_missing_image_under_make_names_the_make_variable(container_env, tmp_path):
    """mk/cluster.mk sets DLU_IMAGE_TAG from IMAGE_TAG: under make, IMAGE_TAG is what picks the image."""
    venv = os.path.dirname(os.path.dirname(sys.executable))
    env = {**container_env, "DLU_IMAGE_TAG": "ignored-under-make", "MLFLOW_TRACKING_URI": container_env["MLFLOW_TRACKING_URI"]}
    for nested in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # under `make test-e2e` this make is make[1]
        env.pop(nested, None)
    out = sh(["make", "--no-print-directory", "-o", f"{venv}/.installed", "run", f"VENV={venv}", "RUNNER=docker",
              "IMAGE_TAG=no-such-tag", f"OVERRIDES={' '.join(TINY)} --pipeline-root {tmp_path}"], env=env, check=False)
    assert out.returncode == 2  # make's own exit for a failed recipe
    error = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert error == [ln for ln in out.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", ln)], out.stderr
    assert "image dl-uncertainty:no-such-tag is not in the container engine" in error[0]
    assert "`make run RUNNER=docker IMAGE_TAG=<tag>`" in error[0] and "DLU_IMAGE" not in error[0]
