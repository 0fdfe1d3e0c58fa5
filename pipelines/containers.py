"""Run the pipeline's tasks in the project image: kfp.local's DockerRunner on Docker or podman.

Containers share the host's network, so MLflow at 127.0.0.1 (`make stack-up`, or
``dl_uncertainty.store.serve_local_store``) is reachable from them as it is from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import uuid
from pathlib import Path

from dl_uncertainty.errors import UserError

# What a task may need from this shell besides MLFLOW_TRACKING_URI (set per task): S3 data.
PASSED_ENV = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")
# podman settings that let containers start where its default open-files ulimit cannot be set
PODMAN_CONF = Path(__file__).resolve().parents[1] / "images" / "podman-containers.conf"
PODMAN_HINT = (f"for podman, start its Docker-compatible socket: `CONTAINERS_CONF={PODMAN_CONF} podman system "
               "service --time=0 unix:///tmp/podman.sock &` and `export DOCKER_HOST=unix:///tmp/podman.sock`")
# How a task's container can end without a word from the task itself.
EXIT_CAUSES = {
    137: "killed (exit 137: out of memory? give the container engine more memory or lower train.batch_size)",
    139: "crashed with a segmentation fault (exit 139) inside the container",
}
# Every container a run starts carries this label with the run's id: what Ctrl-C removes, and nothing else.
RUN_LABEL = "dl-uncertainty.run"
_run = {"id": "", "stopping": threading.Event()}


def _engine_addresses() -> list[str]:
    if os.environ.get("DOCKER_HOST"):
        return [os.environ["DOCKER_HOST"]]
    runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    sockets = ["/var/run/docker.sock", "/run/podman/podman.sock", f"{runtime}/podman/podman.sock"]
    return [f"unix://{path}" for path in sockets if Path(path).exists()] or ["unix:///var/run/docker.sock"]


def connect():
    """A docker client for the first engine that answers; DOCKER_HOST is set to it for kfp.local."""
    import docker

    for address in _engine_addresses():
        try:
            client = docker.DockerClient(base_url=address, timeout=30)
            client.ping()
        except docker.errors.DockerException:
            continue
        os.environ["DOCKER_HOST"] = address
        return client
    raise UserError(f"no container engine answers at {' or '.join(_engine_addresses())}: start Docker, "
                    f"or {PODMAN_HINT}")


def local_image(client, image: str) -> str:
    """The image's name as the engine lists it: kfp.local matches names exactly, and podman keeps
    a locally built ``dl-uncertainty:<tag>`` as ``localhost/dl-uncertainty:<tag>``."""
    import docker

    try:
        tags = client.images.get(image).tags
    except docker.errors.ImageNotFound:
        # under make, mk/cluster.mk sets DLU_IMAGE_REPO/DLU_IMAGE_TAG from IMAGE_REPO/IMAGE_TAG
        other = ("run one you have with `make run RUNNER=docker IMAGE_TAG=<tag>` (and IMAGE_REPO=<repository> "
                 "if not dl-uncertainty)" if os.environ.get("MAKELEVEL") else
                 "set DLU_IMAGE_REPO/DLU_IMAGE_TAG to an image you have")
        raise UserError(f"image {image} is not in the container engine: build it with `make image-cpu` "
                        f"(podman: `make image-cpu CONTAINER_ENGINE=podman`), or {other}") from None
    return next((t for t in tags if t == image or t.endswith(f"/{image}")), tags[0] if tags else image)


def runner(mounts: list[str] = ()):
    """DockerRunner: host network, this user's uid (outputs stay ours), S3 settings passed on."""
    import docker
    from kfp import local

    env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
    env["HOME"] = "/tmp"  # the image's home belongs to its own user, not necessarily to ours
    return local.DockerRunner(
        network_mode="host", user=f"{os.getuid()}:{os.getgid()}", environment=env,
        mounts=[docker.types.Mount(target=path, source=path, type="bind") for path in mounts])


def run_task_container(client, image: str, command: list[str], volumes: dict, **run_args) -> int:
    """Run one task's container to the end, stream its log, return its real exit code.

    Stands in for kfp.local 2.17.0's ``run_docker_container``, which starts containers with
    auto-remove and then asks for their exit code: by then a short task is gone, so Docker answers
    404 (which kfp takes as success), podman answers 500, and the end of the log is lost.
    Inside :func:`task_containers` the container carries the run's label, and once the run is
    stopping no container starts.
    """
    import docker

    run_args.pop("auto_remove", None)
    if _run["stopping"].is_set():
        return 130
    print(f"Found image {image!r}\n")
    labels = {RUN_LABEL: _run["id"]} if _run["id"] else {}
    try:
        container = client.containers.run(image=image, command=command, detach=True, stdout=True, stderr=True,
                                          volumes=volumes, labels=labels, **run_args)
    except docker.errors.APIError as err:
        if not re.search(r"rlimit|ulimit", str(err), re.I):
            raise
        # the line the run's error quotes as the cause (pipelines.local)
        print(f"ContainerEngineError: the container engine cannot set the container's ulimits "
              f"({_engine_message(err)}); with podman, restart its socket with the project's settings: "
              f"`CONTAINERS_CONF={PODMAN_CONF} podman system service ...`")
        return 125
    try:
        if _run["stopping"].is_set():  # stopped while this one was starting: the sweep may have missed it
            return 130
        streamed, printed = b"", 0
        for chunk in container.logs(stream=True, follow=True):
            streamed += chunk
            # whole lines only: kfp.local indents every print, which would split a line in two
            text, printed = whole_lines(streamed, printed)
            if text:
                print(text, end="")
        code = container.wait()["StatusCode"]
        whole = container.logs()  # the stream can end before the last lines of a short task
        if text := whole_lines(whole if len(whole) > len(streamed) else streamed, printed, final=True)[0]:
            print(text if text.endswith("\n") else text + "\n", end="")
        if code in EXIT_CAUSES and not _run["stopping"].is_set():  # the cause the run's error quotes (pipelines.local)
            print(f"TaskContainerError: {EXIT_CAUSES[code]}")
        return code
    except docker.errors.APIError:
        if _run["stopping"].is_set():  # removed by stop_run() under our feet
            return 130
        raise
    finally:
        with contextlib.suppress(docker.errors.APIError):  # already gone when stop_run() removed it
            container.remove(force=True)


def stop_run(client) -> int:
    """Remove (killing them first) the containers of the current run, and start no more; returns how many."""
    import docker

    _run["stopping"].set()
    if not _run["id"]:
        return 0
    found = client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={_run['id']}"})
    for container in found:
        with contextlib.suppress(docker.errors.APIError):  # its own task may have removed it meanwhile
            container.remove(force=True)
    return len(found)


@contextlib.contextmanager
def task_containers(client):
    """One run's task containers: labelled with a fresh id, removed at once on Ctrl-C or SIGTERM
    (kfp.local would otherwise wait for its branch threads, whose containers run on and start the
    next tasks' ones), and removed if the run ends by any error. Containers of other runs are
    never touched."""
    _run["id"], _run["stopping"] = uuid.uuid4().hex[:12], threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.getsignal(sig) for sig in signals}

    def stop(signum, frame):
        for sig in signals:  # a second Ctrl-C must not cut the removal short
            signal.signal(sig, signal.SIG_IGN)
        logging.disable(logging.CRITICAL)  # kfp.local's "Task ... finished with status FAILURE" for each one
        try:
            stop_run(client)
        except Exception as err:  # the engine itself gone: say which containers to look for
            print(f"could not remove the run's containers ({RUN_LABEL}={_run['id']}): {err}", file=sys.__stderr__)
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, frame)  # SIGINT's raises KeyboardInterrupt, as the CLI's SIGTERM one does
        raise KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, stop)
    try:
        yield _run["id"]
    except BaseException:
        with contextlib.suppress(Exception):  # the engine itself gone: nothing more to do here
            stop_run(client)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logging.disable(logging.NOTSET)
        _run["id"] = ""


def _engine_message(err) -> str:
    """The engine's own words, without docker-py's "500 Server Error for http+docker://..." prefix."""
    text = str(getattr(err, "explanation", None) or err)
    found = re.findall(r"[^:(\"]*[ru]limit[^:)\"]*(?::\s*operation not permitted)?", text, re.I)
    return (found[-1] if found else text).strip()[:200]


def whole_lines(log: bytes, start: int, final: bool = False) -> tuple[str, int]:
    """``log[start:]`` up to its last newline (all of it when ``final``), and where the rest starts."""
    end = max(len(log) if final else log.rfind(b"\n", start) + 1, start)
    return log[start:end].decode(errors="replace"), end


def use_task_containers() -> None:
    """Make kfp.local's DockerRunner run tasks with :func:`run_task_container`."""
    from kfp.local import docker_task_handler

    if not callable(getattr(docker_task_handler, "run_docker_container", None)):  # kfp is pinned to 2.17.0
        raise RuntimeError("kfp.local no longer runs containers through run_docker_container; "
                           "pipelines/containers.py needs updating for this kfp version")
    docker_task_handler.run_docker_container = run_task_container
