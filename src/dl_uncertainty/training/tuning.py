"""Hyper-parameter search with Optuna: one study per model family in an RDB storage.

The search space is Hydra's sweep syntax per model family (``configs/tune/default.yaml``), turned
into Optuna distributions here. ``begin`` creates the study and the parent MLflow run, ``work`` runs
trials (one process, or many workers sharing the study's storage), ``finish`` (in ``sweep_report``)
picks the best trial and turns it into a Hydra config. A trial is ``train_model`` on the trial's
config, reporting the per-epoch validation NLL to the pruner through the loop's ``on_epoch`` hook;
with ``tune.seeds`` > 1, that many model seeds, whose objectives are averaged.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from dl_uncertainty.config.checks import OBJECTIVES, validate
from dl_uncertainty.config.compose import config_from_json, load_config, to_json
from dl_uncertainty.errors import UserError

SEARCHABLE = ("data.", "model.", "train.")
_ABSENT = object()


@dataclass
class Param:
    """One searched config key: a float/int range (maybe log-scaled or stepped) or a set of choices."""

    kind: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: dict[Any, Any] = field(default_factory=dict)  # Optuna-safe label -> config value

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.kind == "categorical":
            return self.choices[trial.suggest_categorical(name, list(self.choices))]
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def label(self, value: Any) -> Any:
        """The Optuna value that stands for config ``value``, or _ABSENT if it lies outside."""
        if self.kind == "categorical":
            return next((k for k, v in self.choices.items() if v == value), _ABSENT)
        return value if self.low <= value <= self.high else _ABSENT


def _label(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def parse_param(key: str, text: str, where: str = "tune.space") -> Param:
    """``interval(a, b)``, ``int(interval(a, b))``, ``range(a, b, step=s)``, ``choice(...)``, ``tag(log, ...)``."""
    try:
        (override,) = OverridesParser.create().parse_overrides([f"{key}={text}"])
    except HydraException as err:
        raise UserError(f"{where} {key}: cannot parse {text!r} ({str(err).splitlines()[0]})") from None
    sweep, name = override.value(), f"{where} {key}={text}"
    if isinstance(sweep, ChoiceSweep):
        return Param("categorical", choices={_label(v): v for v in sweep.list})
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        count = math.ceil((stop - start) / step) if step else 0
        if count <= 0:
            raise UserError(f"{name}: the range is empty (step {step} never gets from {start} to {stop})")
        whole = all(float(v).is_integer() for v in (start, stop, step))
        return Param("int" if whole else "float", start, start + step * (count - 1), step=step)
    if isinstance(sweep, IntervalSweep):
        low, high, log = sweep.start, sweep.end, "log" in sweep.tags
        if low >= high:
            raise UserError(f"{name}: {'empty' if low == high else 'inverted'} range, low must be < high")
        if log and low <= 0:
            raise UserError(f"{name}: a log range needs low > 0")
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
        return Param(kind, low, high, log=log)
    raise UserError(f"{name} is not a search range: use interval(a, b), range(a, b), choice(x, y) or tag(log, ...)")


def search_space(cfg: DictConfig) -> dict[str, Param]:
    """``cfg.tune.space`` for ``cfg.model.name``, parsed; every key and bound checked against the config."""
    family = cfg.model.name
    where = f"tune.space.{family}"
    entries = cfg.tune.space.get(family) or {}
    if not entries:
        raise UserError(f"{where} is empty: nothing to tune for model {family}")
    space = {}
    for key, text in entries.items():
        if not key.startswith(SEARCHABLE) or OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            raise UserError(f"{where}: {key!r} is not a data.*, model.* or train.* config key")
        param = space[key] = parse_param(key, text, where)
        ends = list(param.choices.values()) if param.kind == "categorical" else [param.low, param.high]
        for value in ends:  # every bound and choice must make a valid config
            try:
                apply(cfg, {key: value})
            except UserError as err:
                raise UserError(f"{where} {key}={text}: {err}") from None
    return space


def apply(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A validated copy of ``cfg`` with ``values`` (``{"train.lr": 0.01, ...}``) set."""
    out = copy.deepcopy(cfg)
    try:
        for key, value in values.items():
            OmegaConf.update(out, key, value, merge=False)
    except (OmegaConfBaseException, ValueError) as err:
        raise UserError(f"{key}={value!r}: {str(err).splitlines()[0]}") from None
    validate(out)
    return out


def compose(overrides: list[str]) -> DictConfig:
    """Compose the config; sweep overrides (``train.lr='interval(1e-4, 1e-2)'``) join the model's space.

    A plain override of a searched key fixes it and takes it out of the search.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise UserError(f"invalid override: {str(err).splitlines()[0]}") from None
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = {o.key_or_group: o.input_line.split("=", 1)[1] for o in parsed if o.is_sweep_override()}
    cfg = load_config(plain)
    family = cfg.model.name
    space = dict(cfg.tune.space.get(family) or {})
    for o in parsed:
        if not o.is_sweep_override():
            space.pop(o.key_or_group.lstrip("+~"), None)
    space.update(sweeps)
    with open_dict(cfg.tune.space):  # ~tune.space.<model> removed the key: put back what is left
        cfg.tune.space[family] = space
    search_space(cfg)  # fail on a bad space before any work
    return cfg


# ---------------------------------------------------------------- the study


def storage(url: str) -> optuna.storages.RDBStorage:
    """Open (and on first use create) the study database; UserError when it cannot be reached."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        shown = shown_url(url)
    except ArgumentError:
        raise UserError(f"tune.storage {url!r} is not a database URL (e.g. sqlite:///optuna.db)") from None
    engine = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except (SQLAlchemyError, ImportError, OSError, ValueError) as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise UserError(f"cannot open the Optuna storage {shown}: {reason}") from None


def _sampler(cfg: DictConfig, worker: int) -> optuna.samplers.BaseSampler:
    seed, u = cfg.seed + worker, cfg.tune  # one seed per worker: parallel workers must not repeat
    if u.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if u.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=u.startup_trials, multivariate=True,
                                          constant_liar=True)


def _pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    u = cfg.tune
    if u.pruner == "none" or len(u.objectives) > 1:  # Optuna prunes single-objective studies only
        return optuna.pruners.NopPruner()
    if u.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=u.warmup_epochs + 1)
    # steps are epochs, from 1; Optuna prunes from step n_warmup_steps on
    return optuna.pruners.MedianPruner(n_startup_trials=u.startup_trials, n_warmup_steps=u.warmup_epochs + 1)


def load_study(cfg: DictConfig, study_name: str, worker: int = 0) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=storage(cfg.tune.storage),
                                 sampler=_sampler(cfg, worker), pruner=_pruner(cfg))
    except KeyError:
        raise UserError(f"no Optuna study {study_name!r} in {cfg.tune.storage}") from None


@dataclass
class Sweep:
    """What every worker needs: the config (with its search space), the study and the parent run."""

    cfg: DictConfig
    study_name: str
    parent_run_id: str
    trials: int  # trials still to run

    def to_json(self) -> str:
        return json.dumps({"config": json.loads(to_json(self.cfg)), "study_name": self.study_name,
                           "parent_run_id": self.parent_run_id, "trials": self.trials})

    @classmethod
    def from_json(cls, text: str) -> Sweep:
        data = json.loads(text)
        return cls(config_from_json(json.dumps(data["config"])), data["study_name"], data["parent_run_id"],
                   data["trials"])

    def share(self, worker: int, workers: int) -> int:
        """Worker ``worker``'s part of the remaining budget (the parts add up to it exactly)."""
        return self.trials // workers + (1 if worker < self.trials % workers else 0)


def begin(cfg: DictConfig) -> Sweep:
    """Create (or continue) the study and open the parent MLflow run. Run once, before any worker."""
    space = search_space(cfg)
    name = cfg.tune.study_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    directions = [OBJECTIVES[o] for o in cfg.tune.objectives]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage(cfg.tune.storage), study_name=name, load_if_exists=True,
                                directions=directions)
    for key, value in (("objectives", list(cfg.tune.objectives)), ("model", cfg.model.name)):
        if study.user_attrs.get(key, value) != value:
            raise UserError(f"study {name!r} exists for other {key} ({study.user_attrs[key]}); "
                            "pick another tune.study_name")
    study.set_user_attr("objectives", list(cfg.tune.objectives))
    study.set_user_attr("model", cfg.model.name)
    started = [t for t in study.trials if t.state != optuna.trial.TrialState.WAITING]
    if not study.trials:  # the first trial trains the configured defaults: the baseline
        baseline = {k: p.label(OmegaConf.select(cfg, k)) for k, p in space.items()}
        if _ABSENT not in baseline.values():
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
    import mlflow

    from dl_uncertainty.tracking import store

    store.setup(cfg)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent is None:
        with mlflow.start_run(run_name=f"tune-{cfg.model.name}") as run:
            mlflow.set_tags({"model_type": cfg.model.name, "optuna_study": name, "sweep": "parent"})
            mlflow.log_params({"tune.study_name": name, "tune.storage": shown_url(cfg.tune.storage),
                               **{f"tune.{k}": v for k, v in _tune_params(cfg).items()}})
        parent = run.info.run_id
        study.set_user_attr("mlflow_parent_run_id", parent)
    return Sweep(cfg, name, parent, max(0, cfg.tune.n_trials - len(started)))


def shown_url(url: str) -> str:
    """A database URL with its password masked, for screens, logs and MLflow params."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _tune_params(cfg: DictConfig) -> dict[str, Any]:
    u = cfg.tune
    return {"n_trials": u.n_trials, "objectives": ",".join(u.objectives), "sampler": u.sampler,
            "pruner": u.pruner, **{f"space.{k}": v for k, v in u.space[cfg.model.name].items()}}


# ---------------------------------------------------------------- trials


@functools.lru_cache(maxsize=4)
def _splits(data_json: str, seed: int):
    from dl_uncertainty.data.tables import prepare

    splits = prepare(OmegaConf.create(json.loads(data_json)), seed)
    return splits["train"], splits["val"]


def objective_values(cfg: DictConfig, result, val) -> dict[str, float]:
    """Every objective of a trained trial: the best epoch's val NLL/accuracy, the best model's val ECE."""
    values = {"val_nll": result.best["val_nll"], "val_acc": result.best["val_acc"]}
    if "val_ece" in cfg.tune.objectives:
        from dl_uncertainty.training.loop import val_log_probs
        from dl_uncertainty.uncertainty import metrics

        values["val_ece"] = metrics.ece(val_log_probs(result.model, val.x, cfg.train.val_mc_samples), val.y)
    return values


def run_trial(trial: optuna.Trial, sweep: Sweep, space: dict[str, Param], worker: int = 0) -> list[float]:
    """Train one suggested config inside a nested MLflow run; prune on the per-epoch objective."""
    import mlflow

    from dl_uncertainty.training.loop import train_model

    values = {key: param.suggest(trial, key) for key, param in space.items()}
    cfg = apply(sweep.cfg, values)
    train, val = _splits(json.dumps(OmegaConf.to_container(cfg.data, resolve=True)), cfg.seed)
    objectives = list(cfg.tune.objectives)
    watched = objectives[0] if len(objectives) == 1 and objectives[0] in ("val_nll", "val_acc") else None

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=epoch)
        if watched:
            trial.report(metrics[watched], epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", epoch)
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    tags = {"model_type": cfg.model.name, "optuna_study": sweep.study_name, "optuna_trial": str(trial.number)}
    with mlflow.start_run(run_name=f"{cfg.model.name}-trial-{trial.number}", parent_run_id=sweep.parent_run_id,
                          tags=tags) as run:
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        trial.set_user_attr("worker", worker)
        mlflow.log_params({key: _label(value) for key, value in values.items()})
        try:  # tune.seeds model seeds on one split; the pruner watches the first one's curve
            results = [train_model(apply(cfg, {"seed": cfg.seed + i}), train, val, on_epoch=None if i else on_epoch,
                                   quiet=True) for i in range(cfg.tune.seeds)]
        except optuna.TrialPruned:
            mlflow.set_tag("optuna_state", "PRUNED")
            mlflow.end_run("KILLED")
            raise
        result, per_seed = results[0], [objective_values(cfg, r, val) for r in results]
        scores = {k: math.fsum(s[k] for s in per_seed) / len(per_seed) for k in per_seed[0]}
        mlflow.log_metrics({**{f"best_{k}": v for k, v in scores.items()}, "best_epoch": result.best_epoch,
                            "epochs_run": result.epochs_run})
        mlflow.set_tag("optuna_state", "COMPLETE")
    trial.set_user_attr("epochs_run", result.epochs_run)
    return [scores[name] for name in objectives]


def progress_line(study: optuna.Study, trial: optuna.trial.FrozenTrial, done: int, budget: int) -> str:
    """``trial 3 [4/10]  val_nll 0.0213  best 0.0190 (trial 1)  train.lr=0.0031 ...``"""
    names = list(study.user_attrs.get("objectives") or [])
    head = f"trial {trial.number} [{done}/{budget}]"
    params = "  ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    if trial.state == optuna.trial.TrialState.PRUNED:
        return f"{head}  pruned at epoch {trial.user_attrs.get('pruned_at_epoch', '?')}  {params}"
    if trial.state != optuna.trial.TrialState.COMPLETE:
        return f"{head}  {trial.state.name.lower()}  {params}"
    values = "  ".join(f"{n} {v:.4f}" for n, v in zip(names, trial.values, strict=False))
    if len(study.directions) > 1:
        best = f"Pareto front: {len(study.best_trials)} trials"
    else:
        best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
    return f"{head}  {values}  {best}  {params}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def work(sweep: Sweep, worker: int = 0, workers: int = 1) -> int:
    """Run this worker's share of the budget in the shared study; return how many trials it ran."""
    from dl_uncertainty.tracking import store
    from dl_uncertainty.training.loop import set_threads

    cfg = sweep.cfg
    set_threads(cfg.num_threads)
    store.setup(cfg)
    space = search_space(cfg)
    study = load_study(cfg, sweep.study_name, worker)
    n = sweep.share(worker, workers)
    done = []

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done.append(trial.number)
        finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        print(progress_line(study, trial, finished, cfg.tune.n_trials), flush=True)

    if worker > 0:
        _leave_the_queue_to_worker_zero(study)
    if n:
        study.optimize(lambda trial: run_trial(trial, sweep, space, worker), n_trials=n, callbacks=[report])
    return len(done)


def _leave_the_queue_to_worker_zero(study: optuna.Study, timeout: float = 120.0) -> None:
    """Wait until the queued (baseline) trial is taken: SQLite cannot lock the row, and two workers
    could otherwise both take it and both train it."""
    deadline = time.monotonic() + timeout
    while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
