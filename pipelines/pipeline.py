"""``uncertainty-pipeline``: preprocess -> ParallelFor(models x seeds or folds: train -> evaluate) -> compare.
kfp.local runs each branch's train and evaluate as one task (``train_evaluate``): same outputs, one
process start-up per branch instead of two.

Parameter defaults are composed from ``configs/`` with Hydra when the pipeline is built, so the
compiled YAML and the configs never drift.
"""

import inspect

from kfp import dsl, kubernetes
from omegaconf import DictConfig

from components.compare import compare
from components.configure import configure
from components.evaluate import evaluate
from components.images import CPU_IMAGE
from components.preprocess import preprocess
from components.train import train
from components.train_evaluate import train_evaluate
from dl_uncertainty.config.compose import without_keys
from dl_uncertainty.config.parameters import TYPED, TYPED_KEYS, typed_defaults

PIPELINE_NAME = "uncertainty-pipeline"


def _resources(task, cpu_request: str, cpu_limit: str, memory_request: str, memory_limit: str):
    return (task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
            .set_memory_request(memory_request).set_memory_limit(memory_limit))


def task_settings(task, p: DictConfig, kind: str = "step", *, cluster: bool, gpu: bool, tracking_uri: str,
                  image: "str | None" = None):
    """What a task needs: MLflow's address; on a cluster also resources, GPU (kind="train"), retries,
    the S3 endpoint and its credentials from a Secret. ``p`` is the ``pipeline`` config section;
    ``image`` puts the task in that image (kfp.local's DockerRunner, where no GPU is asked for)."""
    task.set_caching_options(False)
    if image:
        task.container_spec.image = image
    if not cluster:
        task.set_env_variable("MLFLOW_TRACKING_URI", tracking_uri)
        return task
    if kind == "train":
        _resources(task, p.train_cpu_request, p.train_cpu_limit, p.train_memory_request, p.train_memory_limit)
        if gpu:
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(p.gpu_limit)
            for key, value in p.gpu_node_selector.items():
                kubernetes.add_node_selector(task, key, value)
            if p.gpu_toleration_key:
                kubernetes.add_toleration(task, key=p.gpu_toleration_key, operator="Exists",
                                          effect="NoSchedule")
        else:
            task.container_spec.image = CPU_IMAGE  # no GPU: the CUDA image buys nothing
    else:
        _resources(task, p.step_cpu_request, p.step_cpu_limit, p.step_memory_request, p.step_memory_limit)
    task.set_retry(num_retries=p.retries, backoff_duration="30s", backoff_factor=2)
    task.set_env_variable("MLFLOW_TRACKING_URI", tracking_uri)
    task.set_env_variable("AWS_ENDPOINT_URL", p.s3_endpoint_url)
    task.set_env_variable("MLFLOW_S3_ENDPOINT_URL", p.s3_endpoint_url)
    kubernetes.use_secret_as_env(task, secret_name=p.s3_secret, secret_key_to_env={
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    return task


def build_pipeline(cfg: DictConfig, *, cluster: bool = True, gpu: "bool | None" = None,
                   mlflow_tracking_uri: "str | None" = None, default_overrides: "list[str] | None" = None,
                   image: "str | None" = None, one_task_per_branch: bool = False):
    """The pipeline function, with defaults from ``cfg``.

    ``cluster`` adds what only a Kubernetes cluster understands (resources, GPU, secrets, env);
    kfp.local runs the same graph without it. ``gpu=False`` relaxes the GPU request. ``image``
    puts every task in that one image (kfp.local's DockerRunner, where no GPU is asked for).
    ``one_task_per_branch`` runs each branch's train and evaluate as one ``train_evaluate`` task (for
    kfp.local; a cluster keeps two, so that only training holds a GPU).
    """
    p = cfg.pipeline
    gpu = p.gpu if gpu is None else gpu
    tracking_env = mlflow_tracking_uri or p.mlflow_tracking_uri

    other_overrides = without_keys(list(default_overrides or []), TYPED_KEYS)  # the typed parameters carry those

    def configure_task(task, kind: str = "step"):
        return task_settings(task, p, kind, cluster=cluster, gpu=gpu, tracking_uri=tracking_env, image=image)

    def uncertainty_pipeline(*args):
        params = dict(zip(signature.parameters, args, strict=True))  # KFP passes the parameters in order
        config = configure_task(configure(**params)).set_display_name("configure")
        data = configure_task(preprocess(config=config.outputs["config"])).set_display_name("preprocess")
        # One branch per (model family, model seed, fold): configure lists them, every model x pipeline.seeds
        # (seeds seed, seed+1, ...; one data split, made with seed), or every model x pipeline.folds (K-fold
        # cross-validation over train + val: each model early-stops on, and is validated on, its own fold,
        # which train hands evaluate as val_rows; calib and test stay fixed). Their tasks cannot be named after the
        # model: KFP leaves a loop item in a display name as its raw placeholder ("train {{channel:...}}");
        # the branch's inputs name it. Nor can the loop be named: its display name would no longer match
        # the key dsl.Collected reads its outputs under, and the KFP backend fails to find them
        # (kubeflow/pipelines#13239).
        with dsl.ParallelFor(config.outputs["Output"]) as branch:
            inputs = dict(config=config.outputs["config"], model_name=branch.model, seed=branch.seed, fold=branch.fold,
                          train=data.outputs["train"], val=data.outputs["val"], calib=data.outputs["calib"])
            if one_task_per_branch:
                evaluated = configure_task(train_evaluate(**inputs, test=data.outputs["test"], ood=data.outputs["ood"]),
                                           kind="train").set_display_name("train-evaluate")
            else:
                trained = configure_task(train(**inputs), kind="train").set_display_name("train")
                evaluated = configure_task(evaluate(
                    model=trained.outputs["model"], val=trained.outputs["val_rows"], calib=data.outputs["calib"],
                    test=data.outputs["test"],
                    ood=data.outputs["ood"])).set_display_name("evaluate")
        configure_task(compare(
            config=config.outputs["config"], metrics=dsl.Collected(evaluated.outputs["metrics"]),
            predictions=dsl.Collected(evaluated.outputs["predictions"]))).set_display_name("compare")

    # The signature KFP reads: the run's models, data and store, then one typed parameter per row of
    # dl_uncertainty.config.parameters.TYPED, each with its default from the configs (0 where they derive it
    # from the run's data: config.parameters.FROM_CONFIGS).
    param = inspect.Parameter
    signature = inspect.Signature([
        param("models", param.POSITIONAL_OR_KEYWORD, annotation=list, default=list(p.models)),
        *(param(name, param.POSITIONAL_OR_KEYWORD, annotation=kind, default=default)
          for (name, _, kind), default in zip(TYPED, typed_defaults(cfg).values(), strict=True)),
        param("data_source", param.POSITIONAL_OR_KEYWORD, annotation=str, default=str(cfg.data.path or cfg.data.source)),
        param("mlflow_tracking_uri", param.POSITIONAL_OR_KEYWORD, annotation=str, default=""),
        param("overrides", param.POSITIONAL_OR_KEYWORD, annotation=list, default=other_overrides),
    ])
    uncertainty_pipeline.__signature__ = signature
    return dsl.pipeline(name=PIPELINE_NAME,
                        description="Train every configured model family (pipeline.models), measure and compare "
                                    "their uncertainty, register the winner.")(uncertainty_pipeline)
