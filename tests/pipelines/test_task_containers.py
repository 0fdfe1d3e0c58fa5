"""`run-local --runner docker` when the container engine, not the task, ends a task: an OOM kill, a
segfault, a ulimit podman cannot set. The engine is a fake docker client; kfp.local and our code
are real."""

import docker
import pytest
from kfp import dsl

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.errors import UserError
from pipelines.containers import PODMAN_CONF
from pipelines.local import execute

RLIMIT = ('runc create failed: unable to start container process: error during container init: error setting '
          'rlimits for ready process: error setting rlimit type 7: operation not permitted: OCI permission denied')


class FakeContainer:
    def __init__(self, engine: "FakeEngine"):
        self.engine = engine

    def logs(self, stream: bool = False, follow: bool = False):
        log = b"epoch 1 done\n"
        return iter([log]) if stream else log

    def wait(self):
        return {"StatusCode": self.engine.exit_code}

    def remove(self, force: bool = False):
        self.engine.removed += 1


class FakeEngine:
    """docker.DockerClient's surface that connect(), local_image() and the task runner use."""

    def __init__(self, exit_code: int = 0, refuse: str = ""):
        self.exit_code, self.refuse, self.removed, self.started = exit_code, refuse, 0, []
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
        return type("Image", (), {"tags": [f"localhost/{image}"]})()

    def run(self, image, command, **kwargs):  # containers.run
        self.started.append(image)
        if self.refuse:
            raise docker.errors.APIError("500 Server Error for http+docker://localhost/v1.41/containers/x/start",
                                         explanation=self.refuse)
        return FakeContainer(self)


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
