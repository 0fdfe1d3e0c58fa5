"""What a user checks after running the pipeline in containers against the cluster's stack."""

from __future__ import annotations

import json
import os
import re
import urllib.request

import boto3
import mlflow
import numpy as np
import pytest

from dl_uncertainty.data.rows import unscaled
from dl_uncertainty.data.splits import load_split
from tests.conftest import model_server
from tests.e2e.conftest import MODELS, RUN_OVERRIDES, TINY, run_pipeline, sh

pytestmark = pytest.mark.e2e
TASKS = 1 + 1 + 2 * len(MODELS) + 1  # configure, preprocess, (train, evaluate) per model, compare


def _run_dir(root):
    return next(root.glob("uncertainty-pipeline-*"))


def test_every_task_succeeds_in_the_image(container_run, container_env):
    out, root = container_run
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    image = f"dl-uncertainty:{container_env['DLU_IMAGE_TAG']}"
    assert re.search(rf"running every task in \S*{re.escape(image)}", out.stdout)
    assert len(re.findall(rf"Found image '\S*{re.escape(image)}'", out.stdout)) == TASKS
    # kfp.local's own per-task lines can get lost when branches log at once; the executors' cannot
    assert len(set(re.findall(r"Wrote executor output file to (\S+)\.", out.stdout))) == TASKS
    assert re.search(r"Pipeline \S*'uncertainty-pipeline'\S* finished with status \S*SUCCESS", out.stdout)
    assert "Failed to import Git" not in out.stdout + out.stderr
    times = re.search(r"^task wall times \(s\): (.*)$", out.stdout, re.M)[1]
    assert [name.split()[0] for name in times.split(" | ")] == ["configure", "preprocess", "train", "evaluate",
                                                                "compare"]
    run_dir = _run_dir(root)
    for name in ("compare", "preprocess", *(f"evaluate-{m}" for m in MODELS)):
        assert "<img" in (run_dir / "reports" / f"{name}.html").read_text()


def _runs(env):
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("e2e")
    return client, experiment, client.search_runs([experiment.experiment_id])


def test_each_model_has_its_run_metrics_and_figures_in_mlflow(container_run, container_env):
    client, _, runs = _runs(container_env)
    assert sorted(r.data.tags["model_type"] for r in runs) == sorted(MODELS)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"test_accuracy", "avg_test_uncertainty", "nll", "ece", "auroc_entropy"} <= set(run.data.metrics)
        assert run.data.tags["git_sha"]  # from the image's DLU_GIT_SHA: no git inside
        assert len(client.get_metric_history(run.info.run_id, "val_nll")) >= 1
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert {"figures/reliability.png", "figures/training_curves.png"} <= figures


def test_mlflow_artifacts_live_in_the_s3_bucket(container_run, container_env):
    _, experiment, runs = _runs(container_env)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    s3 = boto3.client("s3", endpoint_url=container_env["AWS_ENDPOINT_URL"],
                      aws_access_key_id=container_env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=container_env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for o in page.get("Contents", [])]
    for run in runs:
        prefix = f"{experiment.experiment_id}/{run.info.run_id}/artifacts/"
        mine = [k for k in keys if k.startswith(prefix)]
        assert f"{prefix}figures/reliability.png" in mine
        assert any(k.endswith("predictions.npz") for k in mine)
    assert any("/models/" in k and k.endswith("MLmodel") for k in keys)  # the logged pyfunc models


def test_champion_alias_points_at_the_winner(container_run, container_env):
    out, _ = container_run
    winner = re.search(r"\*\*Winner: (\w+)\*\*", out.stdout)[1]
    client, _, runs = _runs(container_env)
    champion = client.get_model_version_by_alias("dl-uncertainty-digits-1x8x8", "champion")  # the data's own name
    assert client.get_run(champion.run_id).data.tags["model_type"] == winner
    assert champion.run_id == min(runs, key=lambda r: r.data.metrics["val_nll"]).info.run_id  # chosen on validation


def test_registered_champion_is_served_on_raw_inputs_from_a_fresh_process(container_run, container_env):
    """What a user does next: `make serve` against the stack, then POST the test images' raw pixels."""
    _, root = container_run
    split = load_split(next(_run_dir(root).rglob("preprocess/test")))
    env = {key: container_env[key] for key in container_env if key.startswith(("MLFLOW", "AWS"))}
    with model_server({"PATH": "/usr/bin:/bin", **env}) as url:
        raw = np.rint(unscaled(split.x, split.schema)).tolist()
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": raw}).encode(),
                                         headers={"Content-Type": "application/json"})
        rows = json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"]
    names = np.array(split.schema.class_names)
    probs = np.array([[r[f"prob_{c}"] for c in names] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert np.mean([r["predicted_class"] for r in rows] == names[split.y]) > 0.5  # 8 classes: chance is 0.125
    assert all(isinstance(r["prediction_set"], list) and isinstance(r["abstain"], bool) for r in rows)


def test_missing_image_is_one_line_naming_the_fix(container_env, tmp_path):
    out = run_pipeline(*TINY, env={**container_env, "DLU_IMAGE_TAG": "no-such-tag"}, root=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "image dl-uncertainty:no-such-tag is not in the container engine" in out.stderr
    assert "make image-cpu" in out.stderr and "Traceback" not in out.stdout + out.stderr


def test_a_task_dying_in_its_container_is_one_line_naming_task_and_cause(container_env, tmp_path):
    # passes run-local's checks, but every row misses a value and data.missing=drop: preprocess fails
    # in its container; the file is under the pipeline root, which the containers mount
    table = tmp_path / "t.csv"
    table.write_text("a,b,label\n" + "".join(f"{i},,{i % 2}\n" if i % 2 else f",{i},{i % 2}\n" for i in range(40)))
    out = run_pipeline(*RUN_OVERRIDES, "data=csv", f"data.path={table}", "data.missing=drop",
                       env=container_env, root=tmp_path)
    assert out.returncode == 2
    error = out.stderr.strip()
    assert error.count("\n") == 0 and "preprocess" in error
    assert "data.missing=drop leaves none" in error
    assert not list(tmp_path.rglob("model"))  # nothing downstream ran


def test_image_loads_into_kind_under_the_name_pods_ask_for(engine, container_env, tmp_path):
    """kind-load from podman: the archive must carry docker.io/library/<name>, which a pod's
    `dl-uncertainty:<tag>` means, not podman's localhost/ name."""
    fake_kind = tmp_path / "kind"
    fake_kind.write_text('#!/bin/sh\nfor a; do last=$a; done\ntar -xOf "$last" manifest.json\n')
    fake_kind.chmod(0o755)
    out = sh(["make", "--no-print-directory", "kind-load", f"CONTAINER_ENGINE={engine}", f"KIND={fake_kind}",
              "IMAGE_VARIANTS=cpu", f"IMAGE_TAG={container_env['DLU_IMAGE_TAG']}"])
    manifest = json.loads(out.stdout[out.stdout.index("["):].splitlines()[0])
    assert manifest[0]["RepoTags"] == [f"docker.io/library/dl-uncertainty:{container_env['DLU_IMAGE_TAG']}"]


def test_without_a_stack_the_local_store_is_served_to_the_containers(image, docker_host, tmp_path):
    """`make run RUNNER=docker` on a laptop: no server, just ./mlflow.db; the run still lands there."""
    env = {**image, "DOCKER_HOST": docker_host, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = run_pipeline(*RUN_OVERRIDES, "pipeline.models=[mc_dropout_dnn]", env=env, root=tmp_path / "out")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert re.search(r"running every task in \S+ \(.+\), MLflow at http://127\.0\.0\.1:\d+", out.stdout)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert [r.data.tags["model_type"] for r in runs] == ["mc_dropout_dnn"]
    figures = tmp_path / "mlartifacts"
    assert list(figures.rglob("reliability.png")) and list(figures.rglob("MLmodel"))
    assert all(path.stat().st_uid == os.getuid() for path in (tmp_path / "out").rglob("*"))  # ours, not the image's
