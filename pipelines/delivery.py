"""Upload the compiled pipeline to Kubeflow Pipelines and start runs of its latest version."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from datetime import UTC, datetime
from pathlib import Path

import kfp
import kfp_server_api
import urllib3
from omegaconf import DictConfig

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.config.parameters import typed_values
from dl_uncertainty.errors import UserError
from pipelines.pipeline import PIPELINE_NAME

REPO = Path(__file__).resolve().parents[1]
POLL_SECONDS = 10.0
# kfp's wait_for_run_completion does not treat CANCELED as final and would wait for the whole
# timeout (kubeflow/pipelines#14473), so we poll ourselves.
FINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}


def version_name(repo: Path | None = None, now: datetime | None = None) -> str:
    """The commit's 12-character SHA, plus a UTC timestamp if tracked files have uncommitted changes."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo or REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return f"untracked-{stamp}"  # not a git checkout (e.g. an unpacked sdist)
    return f"{sha}-dirty-{stamp}" if dirty else sha


def run_parameters(cfg: DictConfig, overrides: list[str]) -> dict:
    """The pipeline's typed parameters from a composed config; overrides carry group switches (data=csv)."""
    return {"models": list(cfg.pipeline.models), **typed_values(cfg), "data_source": str(cfg.data.path or cfg.data.source),
            "overrides": list(overrides)}


def upload(host: str, package_path: Path, name: str = PIPELINE_NAME) -> dict:
    """Create the pipeline, or add a version named after the commit; print and return the ids and UI URL."""
    host = host.rstrip("/")
    client = _client(host)
    with _kfp_errors(host):
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:
            pipeline_id = client.upload_pipeline(str(package_path), pipeline_name=name).pipeline_id
            version = _latest_version(client, pipeline_id)
            print(f"created pipeline {name}")
        else:
            tag = version_name()
            version = _latest_version(client, pipeline_id, tag)
            if version:
                print(f"version {tag} of {name} already exists (same commit); not uploading it again")
            else:
                version = client.upload_pipeline_version(str(package_path), tag, pipeline_id=pipeline_id)
                print(f"uploaded version {tag} of {name}")
    url = f"{host}/#/pipelines/details/{pipeline_id}/version/{version.pipeline_version_id}"
    print(f"pipeline id: {pipeline_id}\nversion id:  {version.pipeline_version_id} ({version.display_name})\n{url}")
    return {"pipeline_id": pipeline_id, "version_id": version.pipeline_version_id,
            "version_name": version.display_name, "url": url}


def run(host: str, overrides: list[str], *, experiment: str | None = None, wait: bool = True,
        timeout: int = 3600) -> dict:
    """Run the latest uploaded version with parameters composed from configs/ + overrides.

    With ``wait``, block until the run ends and raise UserError unless it SUCCEEDED.
    """
    host = host.rstrip("/")
    cfg = load_config(overrides)
    params = run_parameters(cfg, overrides)
    client = _client(host)
    with _kfp_errors(host):
        pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
        version = _latest_version(client, pipeline_id) if pipeline_id else None
        if version is None:
            raise UserError(f"no pipeline {PIPELINE_NAME!r} at {host}; upload it first with `make pipeline-upload`")
        experiment_id = client.create_experiment(experiment or cfg.experiment_name).experiment_id
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        created = client.run_pipeline(experiment_id, f"{PIPELINE_NAME} {version.display_name} {stamp}",
                                      params=params, pipeline_id=pipeline_id,
                                      version_id=version.pipeline_version_id)
        url = f"{host}/#/runs/details/{created.run_id}"
        print(f"run id: {created.run_id} (version {version.display_name})\n{url}", flush=True)
        state = _wait(client, created.run_id, timeout, url) if wait else created.state
    if wait and state != "SUCCEEDED":
        raise UserError(f"run {created.run_id} ended {state}; see {url}")
    return {"run_id": created.run_id, "state": state, "url": url, "pipeline_id": pipeline_id,
            "version_id": version.pipeline_version_id, "experiment_id": experiment_id, "parameters": params}


def _client(host: str) -> kfp.Client:
    if not host.startswith(("http://", "https://")):
        raise UserError(f"KFP host {host!r} is not a URL; use e.g. --host http://localhost:8080 or KFP_HOST=...")
    # kfp.Client retries healthz 5 x 5 s with tracebacks in the log; one short request fails fast instead.
    try:
        with urllib.request.urlopen(f"{host}/apis/v2beta1/healthz", timeout=5) as response:
            response.read()
    except urllib.error.HTTPError as err:
        raise UserError(f"no healthy Kubeflow Pipelines API at {host}: GET /apis/v2beta1/healthz answered "
                        f"HTTP {err.code}; check KFP_HOST") from None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"cannot reach Kubeflow Pipelines at {host} ({reason}); "
                        "start `make kfp-ui` or set KFP_HOST") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        with _kfp_errors(host):
            return kfp.Client(host=host)


@contextlib.contextmanager
def _kfp_errors(host: str):
    """Turn the KFP client's HTTP and connection errors into one-sentence UserErrors."""
    try:
        yield
    except kfp_server_api.ApiException as err:
        raise UserError(f"Kubeflow Pipelines at {host} answered HTTP {err.status} {err.reason}: "
                        f"{_message(err.body)}") from None
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise UserError(f"lost the connection to Kubeflow Pipelines at {host} ({err})") from None
    except ValueError as err:  # kfp's own checks, e.g. two pipelines with the same name
        raise UserError(f"Kubeflow Pipelines at {host}: {err}") from None


def _message(body: bytes | str | None) -> str:
    """The error text of a KFP error body: gRPC-gateway's ``message`` or the upload server's ``error_message``."""
    text = (body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")).strip()
    try:
        data = json.loads(text)
        return data.get("message") or data.get("error_message") or text
    except (ValueError, AttributeError):
        return text


def _latest_version(client: kfp.Client, pipeline_id: str, name: str | None = None):
    """The pipeline's newest version (called ``name`` if given), or None."""
    filter_ = name and json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS",
                                                   "stringValue": name}]})
    response = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc", filter=filter_)
    return (response.pipeline_versions or [None])[0]


def _wait(client: kfp.Client, run_id: str, timeout: int, url: str) -> str:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        state = client.get_run(run_id).state
        if state != last:
            print(f"run {run_id}: {state}", flush=True)
            last = state
        if state in FINAL_STATES:
            return state
        if time.monotonic() >= deadline:
            raise UserError(f"run {run_id} is still {state} after {timeout} s; see {url}")
        time.sleep(POLL_SECONDS)
