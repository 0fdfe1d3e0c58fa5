"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore, plus value checks.

The YAML files under ``configs/`` are the single source of truth for values; these dataclasses
fix the keys and types, so a typo in an override fails before any work, naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from dl_uncertainty.errors import UserError
from dl_uncertainty.families.registry import NAMES

MODEL_NAMES = NAMES
IMAGE_SOURCES = ("image_folder", "mnist", "fashion_mnist", "cifar10")


@dataclass
class DataConfig:
    source: str = "digits"  # digits | csv | npz | image_folder | mnist | fashion_mnist | cifar10
    path: str | None = None  # csv/npz: a local path or s3://bucket/key; image_folder: a folder, s3:// prefix or CSV
    label_column: str = "label"
    encoding: str = "utf-8"  # csv: the file's text encoding, e.g. latin-1
    separator: str | None = None  # csv: comma | semicolon | tab | one character; null = sniffed from the header
    decimal: str = "point"  # csv: point | comma | one character: the decimal mark of the numbers
    thousands: str | None = None  # csv: null | comma | point | space | apostrophe | one character
    blank_labels: str = "error"  # csv/npz: error | drop (rows without a label: blank, NaN)
    non_finite: str = "error"  # error | drop (rows) | as_missing (handled by data.missing)
    ood_classes: list[str] = field(default_factory=lambda: ["8", "9"])
    image_shape: list[int] | None = None  # e.g. [1, 8, 8]; digits sets it, CSV may
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    calib_fraction: float = 0.15  # calibration split: temperature, conformal and abstain thresholds (not val, not test)
    missing: str = "median"  # drop | mean | median | ffill
    outliers: str = "iqr"  # none | iqr | zscore
    outlier_threshold: float = 1.5  # IQR multiplier, or z-score limit
    scaling: str = "standard"  # none | standard | minmax | global
    model_arch: str = "mlp"  # the model.arch the model configs use unless model.arch is given
    # defaults this data suggests for other keys: {model: {...}, train: {...}, <family>: {...}}; the
    # model and train configs read them (configs/model/shared/architecture.yaml); an override still wins
    recipe: dict[str, Any] = field(default_factory=dict)
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
    """The keys every family shares (configs/model/shared/architecture.yaml). A family's own keys live
    in its configs/model/<name>.yaml, whose values give their types (see ``checks.model_types``)."""

    name: str = "bnn"  # a family of dl_uncertainty.families.registry
    arch: str = "mlp"  # mlp | cnn | resnet
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    conv_channels: list[int] = field(default_factory=lambda: [16, 32])  # cnn: per conv; resnet: per stage
    res_blocks: int = 1  # resnet: residual blocks per stage
    activation: str = "relu"  # relu | gelu | tanh | silu
    dropout: float = 0.0
    conv_dropout: bool = True  # cnn/resnet: dropout in the conv layers too; false: only in the fully connected part
    spectral_norm: float | None = None  # spectral normalisation of the feature extractor with this coefficient; null = off
    outlier_exposure: float = 0.0  # images: weight of the uniform-prediction loss on synthetic outliers; 0 = off
    outlier_share: float = 0.5  # outlier exposure: outlier rows added per in-distribution row of a batch
    outlier_kinds: list[str] = field(default_factory=lambda: ["permuted", "jigsaw", "smeared"])  # outlier exposure: its generators


@dataclass
class TrainConfig:
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    batch_size: int = 64
    epochs: int = 60
    early_stopping_patience: int = 15  # epochs without val NLL improvement; 0 disables
    keep_epoch: str = "best"  # best: the weights of the epoch with the lowest val NLL | last: the final epoch's
    label_smoothing: float = 0.0
    loss: str = "ce"  # ce | focal
    focal_gamma: float = 2.0  # focal: down-weights examples the model already gets right
    focal_alpha: float = 1.0  # focal: weight of the whole loss
    mixup_prob: float = 0.0  # share of batches mixed up; 0 = off
    mixup_alpha: float = 0.2  # mixup: Beta(a, a) mixing weight of two examples
    cutmix_prob: float = 0.0  # share of batches cutmixed (images only), never the same as mixup's; 0 = off
    cutmix_alpha: float = 1.0  # cutmix: Beta(a, a) share of an image kept when pasting a box of another
    val_mc_samples: int = 0
    checkpoint_dir: str | None = None  # default: checkpoints/<model name>
    resume: bool = False
    checkpoint_every_s: float = 10.0  # at most one checkpoint per this many seconds, and the last epoch's
    amp: bool = True  # mixed precision, used on CUDA only
    lr_schedule: str = "none"  # none | cosine | onecycle, stepped once per optimizer step
    warmup_fraction: float = 0.0  # cosine: linear warm-up over this share of the optimizer steps
    accumulate_grad_batches: int = 1  # batches whose gradients add up before one optimizer step


@dataclass
class ChampionGate:
    """The winner becomes champion only if it passes these (null = not checked)."""

    max_ece: float | None = 0.05  # validation ECE of the served (calibrated) prediction
    min_ood_auroc: float | None = 0.8
    coverage_slack: float | None = 0.05  # validation coverage of the conformal sets must be >= 1 - alpha - this


@dataclass
class EvaluateConfig:
    mc_samples: int = 50
    strategy: str = "auto"  # auto | loop | repeat | lrt
    batch_size: int = 1024
    winner_metric: str = "nll"
    winner_mode: str = "min"  # min | max
    registered_model_name: str | None = None  # null: dl-uncertainty-<data>-<input shape> (tracking.compare.registered_name)
    calibration: str = "temperature"  # temperature | none
    alpha: float = 0.1  # conformal sets miss the true class at most this often
    conformal_method: str = "lac"  # lac | aps | raps: the sets the served model returns
    conformal_nonempty: bool = False  # always put the most likely class in the set
    raps_k_reg: int = 1  # RAPS: ranks up to this are not penalised
    raps_lambda: float = 0.01  # RAPS: penalty per rank beyond raps_k_reg
    target_risk: float = 0.01  # abstain above the entropy where validation error exceeds this
    abstain_on: str = "entropy"  # entropy | density: which score decides abstaining (besides set size)
    density_target_rate: float = 0.95  # the feature-density threshold keeps this share of held-out inputs
    density_ridge: float = 1e-3  # added to the feature covariance's diagonal (share of the mean variance)
    density: str = "gaussian"  # gaussian (class-conditional, shared covariance) | knn (k-th neighbour) | auto
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
    seeds: int = 1  # model seeds (seed, seed+1, ...) each trial trains; its objectives are their mean
    tuned_study: str | None = None  # set by configs/tuned/<model>.yaml: the study it is the best trial of
    # model family -> {config key: Hydra sweep: interval(a, b), int(interval(a, b)), range(a, b, step=s),
    # choice(x, y, ...), tag(log, interval(a, b))}
    space: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    models: list[str] = field(default_factory=lambda: ["bnn", "mc_dropout_dnn", "deep_ensemble"])
    seeds: int = 1  # model seeds per family: branches train with seed, seed+1, ...; the data split keeps `seed`
    folds: int = 0  # K-fold cross-validation over train+val (0: off, else >= 2): one branch per family x fold
    fold: int = -1  # the fold a model holds out (0 .. folds-1), set per branch by the pipeline; -1: none
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
    model: Any = MISSING  # a family's config: ModelConfig's keys plus its own (configs/model/<name>.yaml)
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


def config_dir() -> Path:
    """``configs/`` of this checkout, or ``$DLU_CONFIG_DIR`` (set in the container image)."""
    env = os.environ.get("DLU_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "configs"
    if not (path / "config.yaml").is_file():
        raise UserError(f"no config.yaml in {path}; set DLU_CONFIG_DIR to the project's configs/ folder")
    return path


def family_defaults(name: str) -> dict[str, Any]:
    """The keys and default values ``configs/model/<name>.yaml`` gives a family beyond the shared ones."""
    values = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / f"{name}.yaml"))
    values.pop("defaults", None)
    return values


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


register_configs()
