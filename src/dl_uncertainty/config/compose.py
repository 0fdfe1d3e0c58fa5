"""Compose configs with Hydra's compose API, and the override helpers the CLIs and the pipeline share."""

from __future__ import annotations

import difflib
import json
import os
import re
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dl_uncertainty.config.checks import validate
from dl_uncertainty.config.schema import (
    IMAGE_SOURCES,
    MODEL_NAMES,
    Config,
    ModelConfig,
    config_dir,
    family_defaults,
)
from dl_uncertainty.errors import UserError


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/`` with Hydra overrides (outside ``@hydra.main``) and validate it.

    An override of a key that only other families have (``model.ensemble_size=10`` while composing
    the BNN) is dropped: one list of overrides reaches every family of a pipeline or a sweep.
    """
    overrides = [mapping_override(o) for o in overrides or []]
    while True:
        try:
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose(config_name="config", overrides=overrides)
            break
        except (HydraException, OmegaConfBaseException) as err:
            key = _other_family_key(str(err), overrides)
            if key is None:
                raise UserError(f"invalid configuration: {_first_line(err)}{_hint(_first_line(err), overrides)}") from None
            overrides = [o for o in overrides if _override_key(o) != key]
    _check_added_keys(overrides, cfg)
    for key in ("data.path", "data_dir", "train.checkpoint_dir"):  # ~ quoted, so no shell expanded it
        if str(OmegaConf.select(cfg, key) or "").startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(OmegaConf.select(cfg, key)))
    try:
        validate(cfg)
    except OmegaConfBaseException as err:  # e.g. ${nope}: an interpolation of no key, found when read
        raise UserError(f"invalid configuration: {_first_line(err)}") from None
    return cfg


MAPPINGS = ("data.checksums", "data.urls")  # free-form keys: "mnist/train-images-idx3-ubyte.gz"


def mapping_override(override: str) -> str:
    """``data.checksums={mnist/a.gz:<md5>}`` as ``++data.checksums={mnist/a.gz:'<md5>'}``: a plain override
    would merge into the typed empty mapping, which refuses new keys. Keys hold "/" and ".", so they cannot
    be set one by one; Hydra's grammar refuses quoted keys, so quotes around keys are dropped. Checksums may
    also be given as a list, ``[mnist/a.gz:<md5>,...]``, or one ``file:<md5>`` pair; their values are
    quoted, so an MD5 that reads as a number (all digits, or digits around one ``e``) stays text."""
    key, sep, value = override.partition("=")
    name = key.lstrip("+")
    if sep and re.search(r"(path|_dir)$", name) and value != "null" and re.fullmatch(r"[^'\"${}\[\](),\s]+", value):
        return f"{key}='{value}'"  # a path as it is: ~/data, café.csv, a&b.csv (Hydra's grammar refuses ~ é &)
    if not sep or key.startswith("~") or name not in MAPPINGS:
        return override
    value = re.sub(r"""(["'])([^"'{}:,\s]+)\1(\s*:)""", r"\2\3", value.strip())
    if name == "data.checksums":
        if value.startswith("[") and value.endswith("]"):
            value = "{" + value[1:-1] + "}"
        elif value and not value.startswith("{"):
            value = "{" + value + "}"
        value = re.sub(r"""([{,]\s*[^"'{}:,\s]+\s*:\s*)(["']?)([^"'{}:,\s]*)\2(?=\s*[,}])""", r"\1'\3'", value)
    return f"++{name}={value}"


def _check_added_keys(overrides: list[str], cfg: DictConfig) -> None:
    """``+trian.epochs=3`` adds a key nothing reads: refused, naming the key, as a typo without ``+`` is."""
    groups = {p.name for p in config_dir().iterdir() if p.is_dir()}
    for override in (o for o in overrides if o.startswith("+")):
        key = _override_key(override)
        if key in groups or _is_schema_key(key, cfg):
            continue
        if key == "tuned":
            raise UserError(f"{override}: there is no {config_dir() / 'tuned'} folder yet; "
                            "`make tune` (python -m dl_uncertainty.tune) writes the tuned configs there")
        parent, _, leaf = key.rpartition(".")
        if key.split(".")[0] not in Config.__dataclass_fields__:  # a typo in the first part: compare it there
            parent, leaf = "", key.split(".")[0]
        node = OmegaConf.select(cfg, parent) if parent else OmegaConf.structured(Config)
        known = [k for k in node if k != leaf] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.7)
        hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        raise UserError(f"{override} adds {key}, which is not a config key{hint}; --cfg prints every key")


def _hint(error: str, overrides: list[str]) -> str:
    """What to type instead, for the Hydra errors a new user meets first."""
    missing = re.search(r"Could not find '([\w.]+)/([^']+)'\s+Available options in '[^']+':\s*(.*)", error)
    if missing:
        group, given, options = missing.group(1), missing.group(2), missing.group(3).split()
        close = difflib.get_close_matches(given, options, n=1, cutoff=0.6)
        return f" (did you mean {group}={close[0]}?)" if close else ""
    scalar = re.search(r"Error merging override ([\w.]+)=(\S+) Invalid value assigned: \w+ is not a ListConfig", error)
    if scalar:
        key, value = scalar.groups()
        return f" ({key} is a list: write {key}=[{value}])"
    token = re.search(r"LexerNoViableAltException: ([\w.+]+)=(\S+) .*token recognition error at: '(.)'", error)
    if token:
        return f" (a value holding {token.group(3)} must be quoted: {token.group(1)}='{token.group(2)}')"
    bare = re.search(r"Error parsing override '([^'=]+)' missing EQUAL", error)
    if bare and bare.group(1) in overrides:
        return f" (an override is key=value: write {bare.group(1)}=<value>)"
    return ""


def _is_schema_key(key: str, cfg: DictConfig) -> bool:
    """A key the typed config or the model family declares (or one inside a free-form mapping)."""
    first, _, rest = key.partition(".")
    if key in MAPPINGS or any(key.startswith(f"{m}.") for m in MAPPINGS) or first == "tune":
        return True
    if first == "model":
        return rest.split(".")[0] in {*ModelConfig.__dataclass_fields__, *family_defaults(cfg.model.name)}
    return OmegaConf.select(OmegaConf.structured(Config), key, default="<absent>") != "<absent>"


def _other_family_key(error: str, overrides: list[str]) -> str | None:
    match = re.search(r"Could not override '(model\.(\w+))'", error)
    if match is None or match.group(1) not in [_override_key(o) for o in overrides]:
        return None
    declared = {key for name in MODEL_NAMES for key in family_defaults(name)}
    return match.group(1) if match.group(2) in declared else None


def data_source_overrides(source: str) -> list[str]:
    """The pipeline's ``data_source`` -> data overrides: ``digits``, a benchmark's name, a ``.csv`` /
    ``.parquet`` / ``.npz`` path or ``s3://`` URI, else a folder (or ``s3://`` prefix) of class sub-folders of images."""
    if not source or source == "digits":
        return []
    if source in IMAGE_SOURCES[1:]:
        return [f"data={source}"]
    if source.lower().endswith((".parquet", ".pq")):  # a table, read by the csv source
        return ["data=csv", f"data.path={source}"]
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


def branches(models: list[str], seeds: int, seed: int, folds: int = 0) -> list[dict[str, Any]]:
    """The pipeline's (family, model seed, fold) branches: every family with seeds ``seed`` .. ``seed + seeds - 1``,
    or, with ``folds`` (K-fold cross-validation, one seed), every family x fold 0 .. folds - 1 (fold -1: none).
    The data split is made once, with ``seed``, so the families' k-th seeds (or folds) are paired on the same data."""
    if seeds < 1:
        raise UserError(f"pipeline.seeds must be >= 1 (model seeds per family), got {seeds}")
    if folds:
        return [{"model": name, "seed": seed, "fold": k} for name in models for k in range(folds)]
    return [{"model": name, "seed": seed + i, "fold": -1} for name in models for i in range(seeds)]


def branch_label(model: str, seed: int, seeds: int, fold: int = -1) -> str:
    """How a branch is named in progress lines and report files: the family, plus its seed when there are
    several, or its fold."""
    if fold >= 0:
        return f"{model}-fold{fold}"
    return model if seeds == 1 else f"{model}-seed{seed}"


def pick_config(model_configs_json: str, model_name: str | None = None, seed: int | None = None,
                fold: int | None = None) -> DictConfig:
    """One model's config from ``model_configs`` output (the first one when no name is given), with
    ``seed`` as its seed and ``fold`` as the fold it holds out when given (a pipeline branch's)."""
    configs = json.loads(model_configs_json)
    if model_name is not None and model_name not in configs:
        raise UserError(f"no config for model {model_name!r}; configured models: {', '.join(configs)}")
    cfg = config_from_json(json.dumps(configs[model_name or next(iter(configs))]))
    if seed is not None:
        cfg.seed = int(seed)
    if fold is not None:
        cfg.pipeline.fold = int(fold)
    return cfg


def config_from_json(text: str) -> DictConfig:
    """Rebuild a validated config from ``to_json`` output (how pipeline steps pass it on)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), json.loads(text))
    except (ValueError, OmegaConfBaseException) as err:
        raise UserError(f"invalid configuration JSON: {_first_line(err)}") from None
    validate(cfg, family_types=False)  # its types were checked when it was composed
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
