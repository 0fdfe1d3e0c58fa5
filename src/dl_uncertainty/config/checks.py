"""Value checks on a composed config: one sentence naming the key for every mistake."""

from __future__ import annotations

import codecs
import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dl_uncertainty.config.schema import IMAGE_SOURCES, MODEL_NAMES, ModelConfig, family_defaults
from dl_uncertainty.errors import UserError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _mark(value: str) -> str:
    return {"comma": ",", "point": ".", "space": " ", "apostrophe": "'", "underscore": "_"}.get(value, value)


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
    _check(u.seeds >= 1, f"tune.seeds must be >= 1 (model seeds each trial trains), got {u.seeds}")
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
    for key, md5 in d.checksums.items():
        _check(str(key).split("/")[0] in IMAGE_SOURCES[1:] and "/" in str(key),
               f"data.checksums key {key!r} must be <benchmark>/<file>, e.g. mnist/train-images-idx3-ubyte.gz")
        _check(isinstance(md5, str) and re.fullmatch(r"[0-9a-fA-F]{32}", md5) is not None,
               f"data.checksums[{key!r}] must be an MD5 (32 hex digits), got {md5!r}")
    unknown = sorted(set(d.urls) - set(IMAGE_SOURCES[1:]))
    _check(not unknown, f"data.urls names {unknown}; its keys are benchmarks: mnist, fashion_mnist, cifar10")
    _check(d.far_ood is None or d.source in IMAGE_SOURCES[1:],
           "data.far_ood needs a benchmark as data.source (mnist, fashion_mnist or cifar10)")


_KINDS = ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "text"),
          (list, "a list"), (dict, "a mapping"))


def _kind(value: Any) -> tuple[type, str] | None:
    for kind in _KINDS:
        if isinstance(value, kind[0]):
            return kind
    return None


def model_types(m: DictConfig) -> None:
    """The shared model keys have ModelConfig's types; a family's own keys keep the type their
    configs/model/<name>.yaml default has (an integer is a number too)."""
    shared = {key: m[key] for key in ModelConfig.__dataclass_fields__ if key in m}
    try:
        OmegaConf.merge(OmegaConf.structured(ModelConfig), shared)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "?"
        raise UserError(f"invalid configuration: model.{key}: {str(err).splitlines()[0]}") from None
    for key, default in family_defaults(m.name).items():
        if key in ModelConfig.__dataclass_fields__ or default is None or key not in m:
            continue
        if isinstance(default, str) and default.startswith("${"):
            continue
        value = OmegaConf.to_container(m, resolve=True)[key]
        want, got = _kind(default), _kind(value)
        if want is None or got == want or (want[0] is float and got is not None and got[0] is int):
            continue
        raise UserError(f"model.{key} must be {want[1]} (as in configs/model/{m.name}.yaml), got {value!r}")


def _check_registered_name(name: str | None) -> None:
    """What MLflow's registry refuses (blank, "/", ":", a path-like name) and what would break the
    champion's models:/<name>@champion URI ("@"), refused before any training rather than at registration."""
    if name is None:
        return
    bad = [c for c in ("/", ":", "@", "\\") if c in name]
    _check(name.strip() != "" and name == name.strip() and not bad and ".." not in name,
           f"evaluate.registered_model_name={name!r} cannot name an MLflow registered model"
           f"{f' (it holds {bad[0]!r})' if bad else ''}; use letters, digits, '-', '_' and '.', or null for "
           "dl-uncertainty-<data>-<input shape>")


def validate(cfg: DictConfig, family_types: bool = True) -> None:
    """Value checks the type system cannot express; raise UserError naming the key."""
    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.evaluate
    _one_of(d.source, "data.source", ("digits", "csv", "npz", *IMAGE_SOURCES))
    _check(d.source not in ("csv", "npz", "image_folder") or bool(d.path),
           f"data.path is required for data.source={d.source}")
    _validate_images(d)
    _check_registered_name(e.get("registered_model_name"))
    _one_of(d.missing, "data.missing", ("drop", "mean", "median", "ffill"))
    _one_of(d.outliers, "data.outliers", ("none", "iqr", "zscore"))
    _one_of(d.scaling, "data.scaling", ("none", "standard", "minmax", "global"))
    _one_of(d.blank_labels, "data.blank_labels", ("error", "drop"))
    _one_of(d.non_finite, "data.non_finite", ("error", "drop", "as_missing"))
    _one_of(str(d.stream).lower(), "data.stream", ("auto", "true", "false"))
    _check(d.in_memory_max_mb >= 0, f"data.in_memory_max_mb must be >= 0, got {d.in_memory_max_mb}")
    _check(d.separator in (None, "comma", "semicolon", "tab") or len(d.separator) == 1,
           f"data.separator must be comma, semicolon, tab or one character, got {d.separator!r}")
    marks = ("comma", "point", "space", "apostrophe", "underscore")
    _check(d.decimal in marks or len(d.decimal) == 1,
           f"data.decimal must be point, comma or one character, got {d.decimal!r}")
    _check(d.thousands is None or d.thousands in marks or len(d.thousands) == 1,
           f"data.thousands must be null, comma, point, space, apostrophe or one character, got {d.thousands!r}")
    _check(d.thousands is None or _mark(d.thousands) != _mark(d.decimal),
           f"data.thousands and data.decimal must differ, both are {d.decimal!r}")
    try:
        codecs.lookup(d.encoding)
    except LookupError:
        raise UserError(f"data.encoding={d.encoding!r} is not a known text encoding, e.g. utf-8 or latin-1") from None
    _check(d.outlier_threshold > 0, "data.outlier_threshold must be > 0")
    for key in ("val_fraction", "test_fraction", "calib_fraction"):
        _check(0 < d[key] < 1, f"data.{key} must be in (0, 1), got {d[key]}")
    _check(d.val_fraction + d.test_fraction + d.calib_fraction < 1,
           "data.val_fraction + data.test_fraction + data.calib_fraction must be < 1 (the rest is the training split), "
           f"got {d.val_fraction} + {d.test_fraction} + {d.calib_fraction}")
    _one_of(m.name, "model.name", MODEL_NAMES)
    if family_types:  # needs configs/model/<name>.yaml: not where a logged model is rebuilt
        model_types(m)
    _one_of(m.arch, "model.arch", ("mlp", "cnn", "resnet"))
    _check(m.res_blocks >= 1, f"model.res_blocks must be >= 1, got {m.res_blocks}")
    _one_of(m.activation, "model.activation", ("relu", "gelu", "tanh", "silu"))
    _check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(all(h >= 1 for h in m.hidden_sizes), "model.hidden_sizes must all be >= 1")
    _check(all(c >= 1 for c in m.conv_channels), "model.conv_channels must all be >= 1")
    sn = m.get("spectral_norm")
    _check(sn is None or sn > 0, f"model.spectral_norm must be > 0 (a Lipschitz coefficient) or null, got {sn}")
    _one_of(t.lr_schedule, "train.lr_schedule", ("none", "cosine", "onecycle"))
    _check(0 <= t.warmup_fraction < 1, f"train.warmup_fraction must be in [0, 1), got {t.warmup_fraction}")
    _check(t.accumulate_grad_batches >= 1, f"train.accumulate_grad_batches must be >= 1, got {t.accumulate_grad_batches}")
    _one_of(t.optimizer, "train.optimizer", ("adam", "adamw", "sgd"))
    for key in ("lr", "weight_decay", "momentum", "focal_gamma", "focal_alpha", "mixup_alpha", "cutmix_alpha"):
        _check(math.isfinite(t[key]), f"train.{key} must be a finite number, got {t[key]}")
    _check(math.isfinite(d.outlier_threshold), f"data.outlier_threshold must be a finite number, got "
           f"{d.outlier_threshold} (data.outliers=none turns clipping off)")
    _check(0 <= cfg.seed < 2**32, f"seed must be in [0, 2**32), got {cfg.seed}")
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    _check(0 <= t.momentum < 1, f"train.momentum must be in [0, 1), got {t.momentum}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _check(t.early_stopping_patience >= 0, "train.early_stopping_patience must be >= 0")
    _one_of(t.keep_epoch, "train.keep_epoch", ("best", "last"))
    _check(t.keep_epoch == "best" or not t.early_stopping_patience,
           f"train.keep_epoch=last keeps the final epoch, which early stopping makes the one "
           f"{t.early_stopping_patience} epochs past the best (the image recipes keep the last epoch): set "
           f"train.keep_epoch=best to stop early, or train.early_stopping_patience=0")
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
    _check(t.val_mc_samples >= 0, f"train.val_mc_samples must be >= 0, got {t.val_mc_samples}")
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
    _one_of(e.abstain_on, "evaluate.abstain_on", ("entropy", "density"))
    _check(0 < e.density_target_rate <= 1, f"evaluate.density_target_rate must be in (0, 1], got {e.density_target_rate}")
    _one_of(e.density, "evaluate.density", ("gaussian", "knn", "auto"))
    _check(m.outlier_exposure >= 0, f"model.outlier_exposure must be >= 0, got {m.outlier_exposure}")
    _check(0 < m.outlier_share <= 1, f"model.outlier_share must be in (0, 1], got {m.outlier_share}")
    _check(len(m.outlier_kinds) > 0 and set(m.outlier_kinds) <= {"permuted", "jigsaw", "smeared"},
           f"model.outlier_kinds must be a non-empty list of permuted, jigsaw, smeared; got {list(m.outlier_kinds)}")
    _check(e.density_ridge >= 0, f"evaluate.density_ridge must be >= 0, got {e.density_ridge}")
    _check(0 <= e.target_risk < 1, f"evaluate.target_risk must be in [0, 1), got {e.target_risk}")
    _check(cfg.num_threads >= 0, f"num_threads must be >= 0, got {cfg.num_threads}")
    _check(len(cfg.pipeline.models) >= 1, "pipeline.models must name at least one model")
    twice = sorted({m for m in cfg.pipeline.models if list(cfg.pipeline.models).count(m) > 1})
    _check(not twice, f"pipeline.models names {', '.join(twice)} twice; each family trains once per seed "
                      "(pipeline.seeds=N trains N of each)")
    for name in cfg.pipeline.models:
        _one_of(name, "pipeline.models[]", MODEL_NAMES)
    _check(cfg.pipeline.seeds >= 1, f"pipeline.seeds must be >= 1 (model seeds per family), got {cfg.pipeline.seeds}")
    _check_folds(cfg.pipeline)
    _check(cfg.pipeline.retries >= 0, "pipeline.retries must be >= 0")
    _validate_tune(cfg.tune)
    _check(
        cfg.device in ("auto", "cpu", "cuda") or str(cfg.device).startswith("cuda:"),
        f"device={cfg.device!r} is not auto, cpu, cuda or cuda:N",
    )


def _check_folds(p) -> None:
    _check(p.folds == 0 or p.folds >= 2, f"pipeline.folds must be 0 (no cross-validation) or at least 2 "
           f"(K-fold cross-validation), got {p.folds}")
    _check(p.folds == 0 or p.seeds == 1, f"pipeline.folds={p.folds} with pipeline.seeds={p.seeds}: cross-validation "
           "trains one model seed per fold; set pipeline.seeds=1 or pipeline.folds=0")
    _check(p.fold == -1 or 0 <= p.fold < p.folds,
           f"pipeline.fold must be -1 (none) or a fold 0 .. pipeline.folds - 1 (pipeline.folds={p.folds}), got {p.fold}")
