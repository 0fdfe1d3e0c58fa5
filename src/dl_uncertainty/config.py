"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore, plus value checks.

The YAML files under ``configs/`` are the single source of truth for values; these dataclasses
fix the keys and types, so a typo in an override fails before any work, naming the key.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError

MODEL_NAMES = ("bnn", "mc_dropout_dnn", "deep_ensemble")
IMAGE_SOURCES = ("image_folder", "mnist", "fashion_mnist", "cifar10")


@dataclass
class DataConfig:
    source: str = "digits"  # digits | csv | npz | image_folder | mnist | fashion_mnist | cifar10
    path: str | None = None  # csv/npz: a local path or s3://bucket/key; image_folder: a folder, s3:// prefix or CSV
    label_column: str = "label"
    encoding: str = "utf-8"  # csv: the file's text encoding, e.g. latin-1
    separator: str | None = None  # csv: comma | semicolon | tab | one character; null = sniffed from the header
    blank_labels: str = "error"  # csv/npz: error | drop (rows without a label: blank, NaN)
    non_finite: str = "error"  # error | drop (rows) | as_missing (handled by data.missing)
    ood_classes: list[str] = field(default_factory=lambda: ["8", "9"])
    image_shape: list[int] | None = None  # e.g. [1, 8, 8]; digits sets it, CSV may
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    missing: str = "median"  # drop | mean | median | ffill
    outliers: str = "iqr"  # none | iqr | zscore
    outlier_threshold: float = 1.5  # IQR multiplier, or z-score limit
    scaling: str = "standard"  # none | standard | minmax | global
    model_arch: str = "mlp"  # the model.arch the model configs use unless model.arch is given
    # images (image_folder, mnist, fashion_mnist, cifar10)
    image_size: list[int] | None = None  # [H, W] to resize every image to; null = keep (all must match)
    channels: int | None = None  # 1 (grayscale) | 3 (RGB); null = as the first image
    mean: list[float] | None = None  # per channel, pixels in [0, 1]; null = fitted on train
    std: list[float] | None = None
    hflip: bool = False  # training only: random horizontal flips
    crop_padding: int = 0  # training only: random crops of the image zero-padded by this many pixels
    workers: int = 0  # DataLoader worker processes decoding images / reading a streamed split (0 = in process)
    stream: str = "auto"  # training reads the split from disk in batches: true | false | auto (above in_memory_max_mb)
    in_memory_max_mb: int = 2048  # stream: auto keeps a training split up to this size in (device) memory
    cache_dir: str = "~/.cache/dl-uncertainty"  # benchmarks: where downloaded files are kept
    urls: dict[str, str] = field(default_factory=dict)  # benchmark -> base URL of a mirror (file:// too); {} = official
    checksums: dict[str, str] = field(default_factory=dict)  # "<benchmark>/<file>" -> MD5 where a mirror's files differ
    far_ood: str | None = None  # benchmarks: another benchmark as far-OOD inputs; null = uniform noise


@dataclass
class ModelConfig:
    name: str = "bnn"  # bnn | mc_dropout_dnn | deep_ensemble
    arch: str = "mlp"  # mlp | cnn | resnet
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    conv_channels: list[int] = field(default_factory=lambda: [16, 32])  # cnn: per conv; resnet: per stage
    res_blocks: int = 1  # resnet: residual blocks per stage
    activation: str = "relu"  # relu | gelu | tanh | silu
    dropout: float = 0.0
    prior_mu: float = 0.0
    prior_sigma: float = 1.0
    posterior_log_sigma_init: float = -5.0
    kl_weight: float = 1.0  # multiplier on KL / N_train
    kl_anneal_epochs: int = 0  # linear warm-up of the KL weight from 0
    ensemble_size: int = 5


@dataclass
class TrainConfig:
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    batch_size: int = 64
    epochs: int = 60
    early_stopping_patience: int = 15  # epochs without val NLL improvement; 0 disables
    label_smoothing: float = 0.0
    loss: str = "ce"  # ce | focal
    focal_gamma: float = 2.0  # focal: down-weights examples the model already gets right
    focal_alpha: float = 1.0  # focal: weight of the whole loss
    mixup_prob: float = 0.0  # share of batches mixed up; 0 = off
    mixup_alpha: float = 0.2  # mixup: Beta(a, a) mixing weight of two examples
    cutmix_prob: float = 0.0  # share of batches cutmixed (images only), never the same as mixup's; 0 = off
    cutmix_alpha: float = 1.0  # cutmix: Beta(a, a) share of an image kept when pasting a box of another
    val_mc_samples: int = 10
    checkpoint_dir: str | None = None  # default: checkpoints/<model name>
    resume: bool = False
    checkpoint_every_s: float = 10.0  # at most one checkpoint per this many seconds, and the last epoch's
    amp: bool = True  # mixed precision, used on CUDA only


@dataclass
class ChampionGate:
    """The winner becomes champion only if it passes these (null = not checked)."""

    max_ece: float | None = 0.05
    min_ood_auroc: float | None = 0.8
    coverage_slack: float | None = 0.05  # test coverage of the conformal sets must be >= 1 - alpha - this


@dataclass
class EvaluateConfig:
    mc_samples: int = 50
    strategy: str = "auto"  # auto | loop | repeat | lrt
    batch_size: int = 1024
    winner_metric: str = "nll"
    winner_mode: str = "min"  # min | max
    registered_model_name: str = "dl-uncertainty"
    calibration: str = "temperature"  # temperature | none
    alpha: float = 0.1  # conformal sets miss the true class at most this often
    conformal_method: str = "lac"  # lac | aps | raps: the sets the served model returns
    conformal_nonempty: bool = False  # always put the most likely class in the set
    raps_k_reg: int = 1  # RAPS: ranks up to this are not penalised
    raps_lambda: float = 0.01  # RAPS: penalty per rank beyond raps_k_reg
    target_risk: float = 0.01  # abstain above the entropy where validation error exceeds this
    champion_gate: ChampionGate = field(default_factory=lambda: ChampionGate())


@dataclass
class TuneConfig:
    n_trials: int = 10  # the study's budget: trials, across every worker
    objectives: list[str] = field(default_factory=lambda: ["val_nll"])  # two or more: multi-objective
    sampler: str = "tpe"  # tpe | random | nsga2
    startup_trials: int = 4  # random trials before TPE models the space, and before pruning starts
    pruner: str = "median"  # median | hyperband | none (single objective only)
    warmup_epochs: int = 10  # the first epochs of a trial, never pruned
    storage: str = "sqlite:///optuna.db"
    study_name: str | None = None  # null: a new study <model>-<date>; a name: create or continue it
    workers: int = 2  # tuning-pipeline: parallel trial workers
    tuned_study: str | None = None  # set by configs/tuned/<model>.yaml: the study it is the best trial of
    # model family -> {config key: Hydra sweep: interval(a, b), int(interval(a, b)), range(a, b, step=s),
    # choice(x, y, ...), tag(log, interval(a, b))}
    space: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    models: list[str] = field(default_factory=lambda: ["bnn", "mc_dropout_dnn", "deep_ensemble"])
    gpu: bool = True  # training tasks request nvidia.com/gpu
    gpu_limit: int = 1
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    gpu_toleration_key: str | None = "nvidia.com/gpu"
    train_cpu_request: str = "1"
    train_cpu_limit: str = "4"
    train_memory_request: str = "2G"
    train_memory_limit: str = "8G"
    step_cpu_request: str = "500m"
    step_cpu_limit: str = "2"
    step_memory_request: str = "1G"
    step_memory_limit: str = "4G"
    retries: int = 2
    mlflow_tracking_uri: str = "http://mlflow.dlu.svc.cluster.local:5000"
    s3_endpoint_url: str = "http://minio.dlu.svc.cluster.local:9000"
    s3_secret: str = "dlu-s3-credentials"
    tune_storage: str = "postgresql+psycopg2://optuna@mlflow-postgres.dlu.svc.cluster.local:5432/optuna"
    tune_secret: str = "optuna-postgres"  # Kubernetes Secret with PGPASSWORD for tune_storage


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    experiment_name: str = "dl-uncertainty"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 1  # torch CPU threads; 0 = torch's default (one per core)
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    run_id: str | None = None  # evaluate: the MLflow run whose model to load
    data_dir: str = "data/processed"  # preprocess: where the split files go


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


register_configs()


def config_dir() -> Path:
    """``configs/`` of this checkout, or ``$DLU_CONFIG_DIR`` (set in the container image)."""
    env = os.environ.get("DLU_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "config.yaml").is_file():
        raise UserError(f"no config.yaml in {path}; set DLU_CONFIG_DIR to the project's configs/ folder")
    return path


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/`` with Hydra overrides (outside ``@hydra.main``) and validate it."""
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(f"invalid configuration: {_first_line(err)}") from None
    validate(cfg)
    return cfg


def data_source_overrides(source: str) -> list[str]:
    """The pipeline's ``data_source`` -> data overrides: ``digits``, a benchmark's name, a ``.csv`` /
    ``.npz`` path or ``s3://`` URI, else a folder (or ``s3://`` prefix) of class sub-folders of images."""
    if not source or source == "digits":
        return []
    if source in IMAGE_SOURCES[1:]:
        return [f"data={source}"]
    for suffix in ("csv", "npz"):
        if source.lower().endswith(f".{suffix}"):
            return [f"data={suffix}", f"data.path={source}"]
    return ["data=image_folder", f"data.path={source}"]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def without_keys(overrides: list[str], keys: list[str]) -> list[str]:
    """``overrides`` minus those that set one of ``keys``: a pipeline's default overrides, minus the
    keys whose values its typed parameters already carry."""
    return [o for o in overrides if _override_key(o) not in keys]


def with_typed(typed: list[str], overrides: list[str]) -> list[str]:
    """A pipeline's typed parameters (as overrides) followed by its free-form ``overrides``; a key set
    by both to different values is an error, so neither silently beats the other."""
    values = {_override_key(t): t.split("=", 1)[1] for t in typed}
    for override in overrides:
        key, _, value = override.partition("=")
        key = _override_key(key)
        if key in values and not _same_value(value, values[key]):
            raise UserError(f"the overrides parameter sets {key}={value} but its typed pipeline parameter sets "
                            f"{key}={values[key]}; set it once, with the typed parameter")
    return [*typed, *overrides]


def _same_value(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip() == b.strip()


def model_configs(models: list[str], overrides: list[str]) -> str:
    """JSON ``{model name: config}``, each validated: what each pipeline branch trains and evaluates."""
    configs = {name: load_config([*overrides, f"model={name}"]) for name in models}
    return json.dumps({name: OmegaConf.to_container(cfg, resolve=True) for name, cfg in configs.items()})


def pick_config(model_configs_json: str, model_name: str | None = None) -> DictConfig:
    """One model's config from ``model_configs`` output (the first one when no name is given)."""
    configs = json.loads(model_configs_json)
    if model_name is not None and model_name not in configs:
        raise UserError(f"no config for model {model_name!r}; configured models: {', '.join(configs)}")
    return config_from_json(json.dumps(configs[model_name or next(iter(configs))]))


def config_from_json(text: str) -> DictConfig:
    """Rebuild a validated config from ``to_json`` output (how pipeline steps pass it on)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), json.loads(text))
    except (ValueError, OmegaConfBaseException) as err:
        raise UserError(f"invalid configuration JSON: {_first_line(err)}") from None
    validate(cfg)
    return cfg


def to_json(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """``{"model.name": "bnn", ...}`` for MLflow params (without the search space of ``tune``)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "tune"}, "")
    return out


def _first_line(err: BaseException) -> str:
    """The informative part of a Hydra/OmegaConf message (and its cause), on one line."""
    noise = ("full_key:", "object_type", "reference_type", "To append", "Set the environment")
    cause = err.__cause__ or err.__context__
    text = str(err).split("Config search path")[0] + "\n" + (str(cause) if cause else "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(ln for ln in lines if not ln.startswith(noise))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _one_of(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


OBJECTIVES = {"val_nll": "minimize", "val_acc": "maximize", "val_ece": "minimize"}


def _validate_tune(u: DictConfig) -> None:
    _check(u.n_trials >= 1, f"tune.n_trials must be >= 1, got {u.n_trials}")
    _check(len(u.objectives) >= 1, "tune.objectives must name at least one metric")
    _check(len(set(u.objectives)) == len(u.objectives), "tune.objectives must not repeat a metric")
    for name in u.objectives:
        _one_of(name, "tune.objectives[]", tuple(OBJECTIVES))
    _one_of(u.sampler, "tune.sampler", ("tpe", "random", "nsga2"))
    _one_of(u.pruner, "tune.pruner", ("median", "hyperband", "none"))
    _check(u.startup_trials >= 0, "tune.startup_trials must be >= 0")
    _check(u.warmup_epochs >= 0, "tune.warmup_epochs must be >= 0")
    _check(u.workers >= 1, f"tune.workers must be >= 1, got {u.workers}")
    _check(bool(u.storage), "tune.storage must be a database URL, e.g. sqlite:///optuna.db")


def _validate_images(d: DictConfig) -> None:
    _one_of(d.model_arch, "data.model_arch", ("mlp", "cnn", "resnet"))
    _check(d.image_size is None or (len(d.image_size) == 2 and min(d.image_size) >= 1),
           f"data.image_size must be [height, width], got {d.image_size}")
    _check(d.channels in (None, 1, 3), f"data.channels must be 1, 3 or null, got {d.channels}")
    _check((d.mean is None) == (d.std is None), "data.mean and data.std go together: set both or neither")
    _check(d.std is None or min(d.std) > 0, "data.std values must be > 0")
    _check(d.crop_padding >= 0, f"data.crop_padding must be >= 0, got {d.crop_padding}")
    _check(d.workers >= 0, f"data.workers must be >= 0, got {d.workers}")
    _check(d.far_ood in (None, "mnist", "fashion_mnist", "cifar10"),
           f"data.far_ood={d.far_ood!r} is not mnist, fashion_mnist, cifar10 or null (uniform noise)")
    unknown = sorted(set(d.urls) - set(IMAGE_SOURCES[1:]))
    _check(not unknown, f"data.urls names {unknown}; its keys are benchmarks: mnist, fashion_mnist, cifar10")
    _check(d.far_ood is None or d.source in IMAGE_SOURCES[1:],
           "data.far_ood needs a benchmark as data.source (mnist, fashion_mnist or cifar10)")


def validate(cfg: DictConfig) -> None:
    """Value checks the type system cannot express; raise UserError naming the key."""
    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.evaluate
    _one_of(d.source, "data.source", ("digits", "csv", "npz", *IMAGE_SOURCES))
    _check(d.source not in ("csv", "npz", "image_folder") or bool(d.path),
           f"data.path is required for data.source={d.source}")
    _validate_images(d)
    _one_of(d.missing, "data.missing", ("drop", "mean", "median", "ffill"))
    _one_of(d.outliers, "data.outliers", ("none", "iqr", "zscore"))
    _one_of(d.scaling, "data.scaling", ("none", "standard", "minmax", "global"))
    _one_of(d.blank_labels, "data.blank_labels", ("error", "drop"))
    _one_of(d.non_finite, "data.non_finite", ("error", "drop", "as_missing"))
    _one_of(str(d.stream).lower(), "data.stream", ("auto", "true", "false"))
    _check(d.in_memory_max_mb >= 0, f"data.in_memory_max_mb must be >= 0, got {d.in_memory_max_mb}")
    _check(d.separator in (None, "comma", "semicolon", "tab") or len(d.separator) == 1,
           f"data.separator must be comma, semicolon, tab or one character, got {d.separator!r}")
    try:
        codecs.lookup(d.encoding)
    except LookupError:
        raise UserError(f"data.encoding={d.encoding!r} is not a known text encoding, e.g. utf-8 or latin-1") from None
    _check(d.outlier_threshold > 0, "data.outlier_threshold must be > 0")
    for key in ("val_fraction", "test_fraction"):
        _check(0 < d[key] < 1, f"data.{key} must be in (0, 1), got {d[key]}")
    _check(d.val_fraction + d.test_fraction < 1, "data.val_fraction + data.test_fraction must be < 1")
    _one_of(m.name, "model.name", MODEL_NAMES)
    _one_of(m.arch, "model.arch", ("mlp", "cnn", "resnet"))
    _check(m.res_blocks >= 1, f"model.res_blocks must be >= 1, got {m.res_blocks}")
    _one_of(m.activation, "model.activation", ("relu", "gelu", "tanh", "silu"))
    _check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(all(h >= 1 for h in m.hidden_sizes), "model.hidden_sizes must all be >= 1")
    _check(all(c >= 1 for c in m.conv_channels), "model.conv_channels must all be >= 1")
    _check(m.prior_sigma > 0, f"model.prior_sigma must be > 0, got {m.prior_sigma}")
    _check(m.kl_weight >= 0, f"model.kl_weight must be >= 0, got {m.kl_weight}")
    _check(m.kl_anneal_epochs >= 0, "model.kl_anneal_epochs must be >= 0")
    _check(m.ensemble_size >= 1, f"model.ensemble_size must be >= 1, got {m.ensemble_size}")
    _one_of(t.optimizer, "train.optimizer", ("adam", "adamw", "sgd"))
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _check(t.early_stopping_patience >= 0, "train.early_stopping_patience must be >= 0")
    _check(t.checkpoint_every_s >= 0, f"train.checkpoint_every_s must be >= 0 (0 = every epoch), got {t.checkpoint_every_s}")
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
    _one_of(t.loss, "train.loss", ("ce", "focal"))
    _check(t.focal_gamma >= 0, f"train.focal_gamma must be >= 0, got {t.focal_gamma}")
    _check(t.focal_alpha > 0, f"train.focal_alpha must be > 0, got {t.focal_alpha}")
    _check(t.mixup_alpha > 0, f"train.mixup_alpha must be > 0 (train.mixup_prob=0 turns mixup off), got {t.mixup_alpha}")
    _check(t.cutmix_alpha > 0, f"train.cutmix_alpha must be > 0 (train.cutmix_prob=0 turns cutmix off), got {t.cutmix_alpha}")
    _check(0 <= t.mixup_prob <= 1, f"train.mixup_prob must be in [0, 1], got {t.mixup_prob}")
    _check(0 <= t.cutmix_prob <= 1, f"train.cutmix_prob must be in [0, 1], got {t.cutmix_prob}")
    _check(t.mixup_prob + t.cutmix_prob <= 1, "train.mixup_prob + train.cutmix_prob must be <= 1 (a batch gets one "
           f"or the other, never both), got {t.mixup_prob} + {t.cutmix_prob}")
    _check(t.cutmix_prob == 0 or bool(d.image_shape) or d.source in IMAGE_SOURCES or m.arch != "mlp",
           "train.cutmix_prob > 0 needs image data: set data.image_shape (or model.arch=cnn on images), "
           "or use train.mixup_prob")
    _check(t.val_mc_samples >= 1, f"train.val_mc_samples must be >= 1, got {t.val_mc_samples}")
    _check(e.mc_samples >= 1, f"evaluate.mc_samples must be >= 1, got {e.mc_samples}")
    _one_of(e.strategy, "evaluate.strategy", ("auto", "loop", "repeat", "lrt"))
    _one_of(e.winner_mode, "evaluate.winner_mode", ("min", "max"))
    _check(e.batch_size >= 1, "evaluate.batch_size must be >= 1")
    _one_of(e.calibration, "evaluate.calibration", ("temperature", "none"))
    _one_of(e.conformal_method, "evaluate.conformal_method", ("lac", "aps", "raps"))
    _check(e.raps_k_reg >= 0 and e.raps_lambda >= 0, "evaluate.raps_k_reg and evaluate.raps_lambda must be >= 0, "
           f"got {e.raps_k_reg} and {e.raps_lambda}")
    _check(0 < e.alpha < 1, f"evaluate.alpha must be in (0, 1), got {e.alpha}")
    slack = e.champion_gate.coverage_slack
    _check(slack is None or 0 <= slack < 1 - e.alpha, "evaluate.champion_gate.coverage_slack must be in "
           f"[0, 1 - alpha = {1 - e.alpha:g}) (the gate needs coverage >= 1 - alpha - slack), or null, got {slack}")
    _check(0 <= e.target_risk < 1, f"evaluate.target_risk must be in [0, 1), got {e.target_risk}")
    _check(cfg.num_threads >= 0, f"num_threads must be >= 0, got {cfg.num_threads}")
    _check(len(cfg.pipeline.models) >= 1, "pipeline.models must name at least one model")
    for name in cfg.pipeline.models:
        _one_of(name, "pipeline.models[]", MODEL_NAMES)
    _check(cfg.pipeline.retries >= 0, "pipeline.retries must be >= 0")
    _validate_tune(cfg.tune)
    _check(
        cfg.device in ("auto", "cpu", "cuda") or str(cfg.device).startswith("cuda:"),
        f"device={cfg.device!r} is not auto, cpu, cuda or cuda:N",
    )
