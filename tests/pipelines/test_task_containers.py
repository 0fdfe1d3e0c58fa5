"""`run-local --runner docker` when the container engine, not the task, ends a task: an OOM kill, a
segfault, a ulimit podman cannot set; a missing image; Ctrl-C. The engine is a fake docker client;
kfp.local and our code are real."""

import os
import signal
import threading
import time

import docker
import pytest
from kfp import dsl

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.errors import UserError
from pipelines.containers import PODMAN_CONF, RUN_LABEL
from pipelines.local import execute

RLIMIT = ('runc create failed: unable to start container process: error during container init: error setting '
          'rlimits for ready process: error setting rlimit type 7: operation not permitted: OCI permission denied')


class FakeContainer:
    def __init__(self, engine: "FakeEngine", labels: dict | None = None):
        self.engine, self.labels, self.gone = engine, labels or {}, threading.Event()

    def logs(self, stream: bool = False, follow: bool = False):
        log = b"epoch 1 done\n"
        if stream and self.engine.task_s:  # a long task: its log ends when it does, or when it is removed
            self.gone.wait(self.engine.task_s)
        return iter([log]) if stream else log

    def wait(self):
        if self.gone.is_set():
            raise docker.errors.NotFound("no such container")
        return {"StatusCode": self.engine.exit_code}

    def remove(self, force: bool = False):
        if self.gone.is_set():
            raise docker.errors.NotFound("no such container")
        self.gone.set()
        self.engine.removed += 1


class FakeEngine:
    """docker.DockerClient's surface that connect(), local_image() and the task runner use."""

    def __init__(self, exit_code: int = 0, refuse: str = "", task_s: float = 0, image_tags: list | None = None):
        self.exit_code, self.refuse, self.removed, self.started = exit_code, refuse, 0, []
        self.task_s, self.image_tags, self.all = task_s, image_tags, []  # all: every container, with their labels
        self.images, self.containers = self, self

    def __call__(self, *args, **kwargs):  # docker.DockerClient(base_url=...) / docker.from_env()
        return self

    def ping(self):
        return True

    def info(self):
        return {}

    def close(self):
        pass

    def get(self, image):  # images.get
        if self.image_tags is not None and image not in self.image_tags:
            raise docker.errors.ImageNotFound(f"{image}: image not known")
        return type("Image", (), {"tags": [f"localhost/{image}"]})()

    def run(self, image, command, labels=None, **kwargs):  # containers.run
        self.started.append(image)
        if self.refuse:
            raise docker.errors.APIError("500 Server Error for http+docker://localhost/v1.41/containers/x/start",
                                         explanation=self.refuse)
        self.all.append(FakeContainer(self, labels))
        return self.all[-1]

    def list(self, all=False, filters=None):  # containers.list(all=True, filters={"label": "key=value"})
        key, _, value = (filters or {}).get("label", "=").partition("=")
        return [c for c in self.all if (all or not c.gone.is_set()) and c.labels.get(key) == value]


@dsl.component(base_image="dl-uncertainty:test", install_kfp_package=False)
def _step() -> str:
    return "never runs: the fake engine decides"


def _run(tmp_path, monkeypatch, engine: "FakeEngine"):
    monkeypatch.setattr(docker, "DockerClient", engine)
    monkeypatch.setattr(docker, "from_env", engine)
    monkeypatch.setenv("DOCKER_HOST", "unix:///fake/docker.sock")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")  # no server, no store to create

    @dsl.pipeline(name="one-step")
    def one_step():
        _step().set_caching_options(False)

    cfg = load_config([])
    with pytest.raises(UserError) as info:
        execute(cfg, "one-step", tmp_path / "out", False, "docker", lambda uri, image: one_step)
    return str(info.value)


@pytest.mark.parametrize(("code", "said"), [
    (137, "killed (exit 137: out of memory? give the container engine more memory or lower train.batch_size)"),
    (139, "segmentation fault (exit 139)"),
])
def test_a_task_container_killed_by_the_engine_says_why_in_one_line(tmp_path, monkeypatch, capsys, code, said):
    engine = FakeEngine(exit_code=code)
    message = _run(tmp_path, monkeypatch, engine)
    assert "\n" not in message and "step" in message and "FAILURE" in message
    assert said in message
    assert engine.started == ["dl-uncertainty:test"] and engine.removed == 1


def test_a_task_that_fails_on_its_own_keeps_its_own_cause(tmp_path, monkeypatch):
    message = _run(tmp_path, monkeypatch, FakeEngine(exit_code=1))
    assert "FAILURE" in message and "exit 137" not in message and "Cause" not in message


def test_a_ulimit_the_engine_cannot_set_names_containers_conf(tmp_path, monkeypatch):
    message = _run(tmp_path, monkeypatch, FakeEngine(refuse=RLIMIT))
    assert "\n" not in message and "step" in message
    assert "error setting rlimit type 7: operation not permitted" in message
    assert f"CONTAINERS_CONF={PODMAN_CONF}" in message and PODMAN_CONF.is_file()
    assert "podman system service" in message


def test_other_engine_errors_are_not_blamed_on_ulimits(tmp_path, monkeypatch):
    message = _run(tmp_path, monkeypatch, FakeEngine(refuse="no space left on device"))
    assert "\n" not in message and "no space left on device" in message and "CONTAINERS_CONF" not in message


def test_a_missing_image_names_the_setting_its_caller_can_change(tmp_path, monkeypatch):
    """Under make, mk/cluster.mk sets DLU_IMAGE_TAG from IMAGE_TAG: a make user must set IMAGE_TAG."""
    monkeypatch.delenv("MAKELEVEL", raising=False)
    message = _run(tmp_path, monkeypatch, FakeEngine(image_tags=[]))
    assert message.startswith("image dl-uncertainty:") and "is not in the container engine" in message
    assert "set DLU_IMAGE_REPO/DLU_IMAGE_TAG" in message and "make image-cpu" in message
    monkeypatch.setenv("MAKELEVEL", "1")
    message = _run(tmp_path, monkeypatch, FakeEngine(image_tags=[]))
    assert "`make run RUNNER=docker IMAGE_TAG=<tag>`" in message and "IMAGE_REPO=" in message
    assert "DLU_IMAGE" not in message


@dsl.component(base_image="dl-uncertainty:test", install_kfp_package=False)
def _then(after: str) -> str:
    return after


def test_ctrl_c_removes_this_runs_containers_at_once_and_starts_no_more(tmp_path, monkeypatch):
    """Two branches, each a long task then another: Ctrl-C while the long ones run removes them (not
    waiting for their end), starts neither second task, and leaves another run's container alone."""
    engine = FakeEngine(task_s=30)
    other = FakeContainer(engine, {RUN_LABEL: "another-run"})
    engine.all.append(other)
    monkeypatch.setattr(docker, "DockerClient", engine)
    monkeypatch.setattr(docker, "from_env", engine)
    monkeypatch.setenv("DOCKER_HOST", "unix:///fake/docker.sock")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")

    @dsl.pipeline(name="two-branches")
    def two_branches():
        with dsl.ParallelFor([0, 1]):
            _then(after=_step().set_caching_options(False).output).set_caching_options(False)

    def ctrl_c_once_both_run():
        deadline = time.monotonic() + 20
        while len(engine.all) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # Python's own, or ignored where started in the background
    threading.Thread(target=ctrl_c_once_both_run, daemon=True).start()
    tic = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        execute(load_config([]), "two-branches", tmp_path / "out", False, "docker", lambda uri, image: two_branches)
    ours = engine.all[1:]
    assert len(ours) == 2 and engine.removed == 2 and all(c.gone.is_set() for c in ours)
    assert time.monotonic() - tic < engine.task_s  # removed, not waited for
    assert len({c.labels[RUN_LABEL] for c in ours}) == 1 and ours[0].labels[RUN_LABEL] != "another-run"
    assert not other.gone.is_set()
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C is handled as before the run again
