"""The compiled YAML, loaded and checked: GPUs, images, secrets, defaults from configs/."""

import re

import pytest
import yaml

from dl_uncertainty.config.compose import load_config
from pipelines.compile import compile_pipeline
from tests.conftest import REPO, run_module

OVERRIDES = ["train.epochs=11", "model.dropout=0.3"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = compile_pipeline(OVERRIDES, tmp_path_factory.mktemp("yaml") / "p.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    return path.read_text(), docs[0], (docs[1] if len(docs) > 1 else {})


def _executors(spec):
    return spec["deploymentSpec"]["executors"]


def _train_executors(spec):
    return {k: v for k, v in _executors(spec).items() if k.startswith("exec-train")}


def test_training_tasks_request_a_gpu_and_resources(compiled):
    _, spec, _ = compiled
    cfg = load_config(OVERRIDES)
    trains = _train_executors(spec)
    assert trains
    for executor in trains.values():
        resources = executor["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert int(resources["accelerator"]["resourceCount"]) == cfg.pipeline.gpu_limit
        assert resources["memoryLimit"] > 0 and resources["cpuRequest"] > 0
        assert executor["container"]["image"].endswith("-cuda")


def test_every_image_is_the_configured_sha_tagged_one(compiled):
    from components.images import CPU_IMAGE, CUDA_IMAGE

    text, spec, _ = compiled
    images = {e["container"]["image"] for e in _executors(spec).values()}
    assert images == {CPU_IMAGE, CUDA_IMAGE}
    for image in images:
        assert not image.endswith(":latest") and ":" in image
        tag = image.split(":", 1)[1]
        assert re.fullmatch(r"([0-9a-f]{12}|nogit)(-dirty)?(-cuda)?", tag), tag
    assert "latest" not in re.findall(r"image: (\S+)", text)


def test_images_follow_the_environment_variables(tmp_path):
    proc = run_module("pipelines", "compile", "--output", str(tmp_path / "p.yaml"), cwd=REPO,
                      env={"DLU_IMAGE_REPO": "registry.example/dlu", "DLU_IMAGE_TAG": "0123456789ab"})
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "p.yaml").read_text()
    assert set(re.findall(r"image: (\S+)", text)) == {"registry.example/dlu:0123456789ab",
                                                       "registry.example/dlu:0123456789ab-cuda"}


def test_no_gpu_relaxes_the_request_and_uses_the_cpu_image(tmp_path):
    spec = next(yaml.safe_load_all(compile_pipeline([], tmp_path / "p.yaml", gpu=False).read_text()))
    for executor in _train_executors(spec).values():
        assert "accelerator" not in executor["container"].get("resources", {})
        assert not executor["container"]["image"].endswith("-cuda")


def test_s3_credentials_come_from_a_secret_and_no_credential_is_written(compiled):
    text, spec, platform = compiled
    cfg = load_config(OVERRIDES)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(_executors(spec))
    for executor in executors.values():
        (secret,) = executor["secretAsEnv"]
        assert secret["secretName"] == cfg.pipeline.s3_secret
        assert {m["envVar"] for m in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for env in (e["container"].get("env", []) for e in _executors(spec).values()):
        names = {v["name"] for v in env}
        assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"} <= names
        assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert not re.search(r"(?i)(minioadmin|aws_secret_access_key\s*[:=]\s*\S{8,}|password\s*[:=])", text)


def test_training_tasks_tolerate_gpu_nodes(compiled):
    _, _, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        has = any(t.get("key") == "nvidia.com/gpu" for t in executor.get("tolerations", []))
        assert has == name.startswith("exec-train"), name


def test_parameter_defaults_equal_the_composed_config(compiled):
    _, spec, _ = compiled
    cfg = load_config(OVERRIDES)
    params = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert params == {
        "models": list(cfg.pipeline.models), "epochs": 11, "learning_rate": cfg.train.lr,
        "mc_samples": cfg.evaluate.mc_samples, "seed": cfg.seed, "seeds": 1, "folds": 0, "data_source": "digits",
        "mlflow_tracking_uri": "", "experiment_name": cfg.experiment_name,
        "overrides": ["model.dropout=0.3"],  # train.epochs=11 is the typed epochs: in one place only
    }


def test_tasks_retry(compiled):
    _, spec, _ = compiled
    cfg = load_config(OVERRIDES)
    retries = [t.get("retryPolicy", {}).get("maxRetryCount") for t in spec["root"]["dag"]["tasks"].values()
               if "componentRef" in t and not t["componentRef"]["name"].startswith("comp-for-loop")]
    assert retries and set(retries) == {cfg.pipeline.retries}


def test_compile_cli_with_a_bad_override_is_one_line(tmp_path):
    proc = run_module("pipelines", "compile", "--output", str(tmp_path / "p.yaml"), "train.epochs=0", cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.epochs" in proc.stderr
    assert not (tmp_path / "p.yaml").exists()


def loop_names(spec) -> dict[str, str]:
    """Each ParallelFor task's key and its display name (``taskInfo``), in every DAG of the spec."""
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    return {key: task["taskInfo"]["name"] for dag in dags for key, task in dag["tasks"].items()
            if "parameterIterator" in task or "artifactIterator" in task}


def test_the_model_loop_keeps_the_name_its_collected_outputs_are_read_under(compiled):
    # a named ParallelFor compiles to taskInfo "<name>" while dsl.Collected reads producerTask
    # "for-loop-N", and the KFP backend then cannot find the loop's outputs (kubeflow/pipelines#13239)
    _, spec, _ = compiled
    loops = loop_names(spec)
    assert len(loops) == 1 and all(key == name for key, name in loops.items())
    collected = re.findall(r"producerTask: (for-loop-\d+)", yaml.safe_dump(spec["root"]))
    assert set(collected) == set(loops)


def test_every_task_has_a_plain_display_name(compiled):
    text, spec, _ = compiled
    names = re.findall(r"^\s*taskInfo:\s*\n\s*name: (.+)$", text, re.M)
    assert {"configure", "preprocess", "train", "evaluate", "compare"} <= set(names)
    assert not [n for n in names if "{{" in n]  # a loop item in a display name stays a raw placeholder


def test_seeds_make_the_parallel_for_cover_every_family_times_every_seed(tmp_path):
    """pipeline.seeds=3: the run parameter defaults to 3, the one loop iterates over configure's
    branches, whose items give train its model and seed, and configure lists every family x seed."""
    from kfp import dsl

    from components.configure import configure

    spec = next(yaml.safe_load_all(compile_pipeline(["pipeline.seeds=3"], tmp_path / "p.yaml").read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["seeds"]["defaultValue"] == 3
    loops = {name: task for name, task in spec["root"]["dag"]["tasks"].items() if "parameterIterator" in task}
    (loop,) = loops.values()
    channel = loop["parameterIterator"]["items"]["inputParameter"]
    assert loop["inputs"]["parameters"][channel]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "configure"}
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    item = loop["parameterIterator"]["itemInput"]
    params = body["train"]["inputs"]["parameters"]
    assert params["model_name"] == {"componentInputParameter": item,
                                    "parameterExpressionSelector": 'parseJson(string_value)["model"]'}
    assert params["seed"] == {"componentInputParameter": item,
                              "parameterExpressionSelector": 'parseJson(string_value)["seed"]'}
    assert "evaluate" in body and "compare" in spec["root"]["dag"]["tasks"]

    config = dsl.Artifact(name="config", uri=str(tmp_path / "config"), metadata={})
    found = configure.python_func(models=["bnn", "mc_dropout_dnn", "deep_ensemble"], overrides=[], epochs=1,
                                  learning_rate=0.001, mc_samples=4, seed=7, seeds=3, folds=0, data_source="digits",
                                  experiment_name="x", mlflow_tracking_uri="", config=config)
    assert sorted((b["model"], b["seed"]) for b in found) == [
        (m, s) for m in ("bnn", "deep_ensemble", "mc_dropout_dnn") for s in (7, 8, 9)]


def test_the_default_is_one_seed_per_family(compiled):
    _, spec, _ = compiled
    assert spec["root"]["inputDefinitions"]["parameters"]["seeds"]["defaultValue"] == 1


def test_the_data_recipe_sets_epochs_unless_the_compile_overrides_do(tmp_path):
    from dl_uncertainty.config.compose import with_typed
    from dl_uncertainty.config.parameters import TYPED, typed_overrides

    spec = next(yaml.safe_load_all(compile_pipeline(["data=mnist"], tmp_path / "p.yaml").read_text()))
    params = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    params.update({name: kind(params[name]) for name, _, kind in TYPED})  # the YAML writes integers as 50.0
    assert params["epochs"] == 0  # not digits' 60 baked in: the configs decide when the run composes them
    assert params["overrides"] == ["data=mnist"]
    run = load_config(with_typed(typed_overrides(params), params["overrides"]))  # what the configure step composes
    assert run.train.epochs == load_config(["data=mnist"]).data.recipe.train.epochs == 30
    assert load_config(with_typed(typed_overrides({**params, "epochs": 7}), params["overrides"])).train.epochs == 7
