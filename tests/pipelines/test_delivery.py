"""Upload and run against a fake KFP v2beta1 API: assert on what the real kfp.Client sent."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime

import pytest

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.errors import UserError
from pipelines import delivery
from pipelines.compile import compile_pipeline
from pipelines.pipeline import PIPELINE_NAME
from tests.conftest import REPO, free_port, run_module
from tests.pipelines.fake_kfp import API, FakeKFP


def git(repo, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                           *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def commit(repo) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "change")
    return git(repo, "rev-parse", "--short=12", "HEAD")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return compile_pipeline(["train.epochs=1"], tmp_path_factory.mktemp("package") / "p.yaml", gpu=False)


@pytest.fixture()
def kfp():
    with FakeKFP() as fake:
        yield fake


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    """A clean git checkout standing in for the project, so version names are predictable."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    (path / "tracked.txt").write_text("1\n")
    commit(path)
    monkeypatch.setattr(delivery, "REPO", path)
    return path


def test_first_upload_creates_the_pipeline_from_the_compiled_yaml(kfp, package, repo, capsys):
    result = delivery.upload(kfp.url, package)

    [req] = kfp.calls("POST", f"{API}/pipelines/upload")
    assert req.query["name"] == PIPELINE_NAME
    assert req.files["uploadfile"] == package.read_bytes()
    assert not kfp.calls("POST", f"{API}/pipelines/upload_version")
    [pipeline], [version] = kfp.pipelines.values(), kfp.versions.values()
    url = f"{kfp.url}/#/pipelines/details/{pipeline['pipeline_id']}/version/{version['pipeline_version_id']}"
    assert result == {"pipeline_id": pipeline["pipeline_id"], "version_id": version["pipeline_version_id"],
                      "version_name": PIPELINE_NAME, "url": url}
    out = capsys.readouterr().out
    assert pipeline["pipeline_id"] in out and version["pipeline_version_id"] in out and url in out


def test_next_upload_adds_a_version_named_after_the_commit_and_reuses_it_for_the_same_commit(
        kfp, package, repo, capsys):
    first = delivery.upload(kfp.url, package)
    second = delivery.upload(kfp.url, package)

    [req] = kfp.calls("POST", f"{API}/pipelines/upload_version")
    sha = git(repo, "rev-parse", "--short=12", "HEAD")
    assert req.query == {"name": sha, "pipelineid": first["pipeline_id"]}
    assert req.files["uploadfile"] == package.read_bytes()
    assert second["pipeline_id"] == first["pipeline_id"] and second["version_name"] == sha
    assert second["version_id"] not in (first["version_id"], None)

    capsys.readouterr()
    assert delivery.upload(kfp.url, package) == second
    assert len(kfp.calls("POST", f"{API}/pipelines/upload_version")) == 1
    assert f"version {sha} of {PIPELINE_NAME} already exists" in capsys.readouterr().out


def test_version_name_is_the_commit_plus_a_utc_timestamp_when_tracked_files_changed(repo):
    sha = git(repo, "rev-parse", "--short=12", "HEAD")
    assert len(sha) == 12 and delivery.version_name(repo) == sha
    (repo / "untracked.txt").write_text("not part of the build\n")
    assert delivery.version_name(repo) == sha
    (repo / "tracked.txt").write_text("2\n")
    now = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert delivery.version_name(repo, now) == f"{sha}-dirty-20250304T050607Z"


def test_version_name_defaults_to_this_checkout():
    assert delivery.version_name().startswith(git(REPO, "rev-parse", "--short=12", "HEAD"))


def test_run_sends_the_composed_config_to_the_latest_version_and_waits(kfp, package, repo, capsys):
    delivery.upload(kfp.url, package)
    (repo / "tracked.txt").write_text("2\n")
    commit(repo)
    latest = delivery.upload(kfp.url, package)
    overrides = ["train.epochs=7", "evaluate.mc_samples=3"]

    result = delivery.run(kfp.url, overrides)

    cfg = load_config(overrides)
    [req] = kfp.calls("POST", f"{API}/runs")
    assert req.json["runtime_config"]["parameters"] == {
        "models": list(cfg.pipeline.models), "epochs": 7, "learning_rate": cfg.train.lr, "mc_samples": 3,
        "seed": cfg.seed, "seeds": cfg.pipeline.seeds, "folds": cfg.pipeline.folds, "data_source": "digits", "experiment_name": cfg.experiment_name,
        "overrides": overrides}
    assert req.json["pipeline_version_reference"] == {"pipeline_id": latest["pipeline_id"],
                                                      "pipeline_version_id": latest["version_id"]}
    [experiment] = kfp.experiments.values()
    assert experiment["display_name"] == cfg.experiment_name
    assert req.json["experiment_id"] == experiment["experiment_id"]
    run_id = result["run_id"]
    assert result["state"] == "SUCCEEDED" and kfp.calls("GET", f"{API}/runs/{run_id}")
    assert f"{kfp.url}/#/runs/details/{run_id}" in capsys.readouterr().out


def test_run_passes_group_switches_and_reuses_the_named_experiment(kfp, package, repo):
    delivery.upload(kfp.url, package)
    overrides = ["data=csv", "data.path=s3://datasets/table.csv"]

    first = delivery.run(kfp.url, overrides, experiment="nightly", wait=False)
    delivery.run(kfp.url, overrides, experiment="nightly", wait=False)

    params = kfp.calls("POST", f"{API}/runs")[0].json["runtime_config"]["parameters"]
    assert params["data_source"] == "s3://datasets/table.csv" and params["overrides"] == overrides
    assert [e["display_name"] for e in kfp.experiments.values()] == ["nightly"]
    assert len(kfp.calls("POST", f"{API}/experiments")) == 1
    assert first["state"] == "PENDING" and not kfp.calls("GET", f"{API}/runs/{first['run_id']}")


@pytest.mark.parametrize("state", ["FAILED", "CANCELED"])
def test_run_that_does_not_succeed_raises_naming_the_run_and_its_state(kfp, package, repo, monkeypatch, state):
    monkeypatch.setattr(delivery, "POLL_SECONDS", 0.01)
    delivery.upload(kfp.url, package)
    kfp.run_states = ["PENDING", "RUNNING", state]

    with pytest.raises(UserError, match=f"ended {state}") as err:
        delivery.run(kfp.url, ["train.epochs=1"])

    [run_id] = kfp.runs
    assert run_id in str(err.value)
    assert len(kfp.calls("GET", f"{API}/runs/{run_id}")) == 3


def test_run_that_outlasts_the_timeout_raises(kfp, package, repo):
    delivery.upload(kfp.url, package)
    kfp.run_states = ["RUNNING"]
    with pytest.raises(UserError, match="still RUNNING after 0 s"):
        delivery.run(kfp.url, [], timeout=0)


def test_run_before_any_upload_says_to_upload_first(kfp):
    with pytest.raises(UserError, match="make pipeline-upload"):
        delivery.run(kfp.url, [])
    assert not kfp.calls("POST", f"{API}/runs")


@pytest.mark.parametrize("action", ["upload", "run"])
def test_unreachable_host_is_one_clear_error(package, action):
    host = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"cannot reach Kubeflow Pipelines at {host} .*make kfp-ui"):
        delivery.upload(host, package) if action == "upload" else delivery.run(host, [])


def test_host_without_a_scheme_is_one_clear_error(package):
    with pytest.raises(UserError, match="is not a URL"):
        delivery.upload("localhost:8080", package)


def test_unhealthy_api_is_one_clear_error(kfp, package):
    kfp.failures[("GET", f"{API}/healthz")] = (503, "starting")
    with pytest.raises(UserError, match="healthz answered HTTP 503"):
        delivery.upload(kfp.url, package)


@pytest.mark.parametrize(("method", "path", "action"), [
    ("POST", f"{API}/pipelines/upload", "upload"),  # upload server's {"error_message": ...}
    ("POST", f"{API}/runs", "run"),  # gRPC-gateway's {"message": ...}
])
def test_api_errors_become_one_sentence_with_the_server_message(kfp, package, repo, method, path, action):
    if action == "run":
        delivery.upload(kfp.url, package)
    kfp.failures[(method, path)] = (500, "database is down")
    with pytest.raises(UserError, match=f"at {kfp.url} answered HTTP 500 .*: database is down$"):
        delivery.upload(kfp.url, package) if action == "upload" else delivery.run(kfp.url, [])


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_cli_upload_prints_the_ids(kfp, tmp_path):
    output = tmp_path / "p.yaml"
    proc = run_module("pipelines", "upload", "--host", kfp.url, "--no-gpu", "--output", str(output),
                      "train.epochs=1", cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [pipeline], [version] = kfp.pipelines.values(), kfp.versions.values()
    assert pipeline["pipeline_id"] in proc.stdout and version["pipeline_version_id"] in proc.stdout
    assert kfp.calls("POST", f"{API}/pipelines/upload")[0].files["uploadfile"] == output.read_bytes()


def test_cli_upload_to_an_unreachable_host_exits_2_with_one_line(tmp_path):
    proc = run_module("pipelines", "upload", "--host", f"http://127.0.0.1:{free_port()}", "--no-gpu",
                      "--output", str(tmp_path / "p.yaml"), "train.epochs=1", cwd=REPO, timeout=120)
    assert "cannot reach Kubeflow Pipelines" in _one_line_error(proc)


def test_cli_run_exits_2_when_the_run_fails(kfp, package, repo):
    delivery.upload(kfp.url, package)
    kfp.run_states = ["FAILED"]
    proc = run_module("pipelines", "run", "--host", kfp.url, "--no-gpu", "train.epochs=1", cwd=REPO, timeout=120)
    [run_id] = kfp.runs
    assert f"run {run_id} ended FAILED" in _one_line_error(proc)
