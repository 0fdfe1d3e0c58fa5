"""After a sweep: the best trial as a Hydra config file, the figures, an HTML report, MLflow's parent run.

The best config is written as ``<dir>/tuned/<model>.yaml``, a ``@package _global_`` file that holds
what the best trial changed against the configured defaults, so ``+tuned=<model>`` re-trains it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from dl_uncertainty.config.checks import OBJECTIVES
from dl_uncertainty.config.compose import load_config
from dl_uncertainty.config.schema import config_dir
from dl_uncertainty.errors import UserError
from dl_uncertainty.reports import plots
from dl_uncertainty.reports.render import Section, html_report
from dl_uncertainty.training.tuning import Sweep, apply, load_study, search_space, shown_url

TUNED_KEYS = ("data", "model", "train", "seed")


@dataclass
class Summary:
    study_name: str
    model: str
    objectives: list[str]
    best_trial: int
    best: dict[str, float]
    baseline: dict[str, float] | None
    counts: dict[str, int]
    params: dict[str, Any]
    importances: dict[str, dict[str, float]] = field(default_factory=dict)
    tuned_yaml: str = ""
    tuned_path: Path | None = None
    html: str = ""


def retrain_command(model: str) -> str:
    return f"python -m dl_uncertainty.train +tuned={model}"


def best_trial(study: optuna.Study, objectives: list[str]) -> optuna.trial.FrozenTrial:
    """The best trial; with several objectives, the Pareto trial best on the first one."""
    if not study.best_trials:
        raise ValueError("no trial completed")
    pick = min if OBJECTIVES[objectives[0]] == "minimize" else max
    return pick(study.best_trials, key=lambda t: t.values[0])


def trial_config(cfg: DictConfig, trial: optuna.trial.FrozenTrial) -> DictConfig:
    space = search_space(cfg)
    values = {k: space[k].choices[v] if space[k].kind == "categorical" else v for k, v in trial.params.items()}
    return apply(cfg, values)


def tuned_yaml(cfg: DictConfig, trial: optuna.trial.FrozenTrial, headline: str, study_name: str) -> str:
    """What ``trial`` trained, as a Hydra config: the model group plus every value unlike the defaults,
    and the study's name (``tune.tuned_study``), which training tags its MLflow run with."""
    best = OmegaConf.to_container(trial_config(cfg, trial), resolve=True)
    default = OmegaConf.to_container(load_config([f"model={cfg.model.name}"]), resolve=True)
    body: dict[str, Any] = {"defaults": [{"override /model": cfg.model.name}]}
    for key in TUNED_KEYS:
        if isinstance(best[key], dict):
            changed = {k: v for k, v in best[key].items() if v != default[key][k]}
            if changed:
                body[key] = changed
        elif best[key] != default[key]:
            body[key] = best[key]
    body["tune"] = {"tuned_study": study_name}
    return f"# @package _global_\n{headline}" + OmegaConf.to_yaml(OmegaConf.create(body))


def save_tuned(summary: Summary) -> Path:
    """Write ``configs/tuned/<model>.yaml``, which ``+tuned=<model>`` loads on top of the defaults."""
    summary.tuned_path = config_dir() / "tuned" / f"{summary.model}.yaml"
    summary.tuned_path.parent.mkdir(parents=True, exist_ok=True)
    summary.tuned_path.write_text(summary.tuned_yaml)
    return summary.tuned_path


def importances(study: optuna.Study, objectives: list[str], seed: int) -> dict[str, dict[str, float]]:
    """fANOVA importance of each parameter per objective ({} with fewer than two completed trials)."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    out = {}
    for index, name in enumerate(objectives):
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        try:
            out[name] = optuna.importance.get_param_importances(
                study, evaluator=evaluator, target=lambda t, i=index: t.values[i])
        except (ValueError, RuntimeError):  # e.g. no parameter varied among the completed trials
            return {}
    return out


def _rows(study: optuna.Study, objectives: list[str]) -> list[dict[str, Any]]:
    rows = []
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            values = dict(zip(objectives, t.values, strict=True))
        elif t.intermediate_values and len(objectives) == 1:  # pruned: the last reported value
            values = {objectives[0]: t.intermediate_values[max(t.intermediate_values)]}
        else:
            values = {}
        rows.append({"number": t.number, "state": t.state.name.lower(), "values": values, "params": t.params,
                     "epochs": t.user_attrs.get("epochs_run", t.user_attrs.get("pruned_at_epoch"))})
    return rows


def _values(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


def _headline(summary: Summary, n_trials: int, baseline: optuna.trial.FrozenTrial | None) -> str:
    versus = f"; the defaults (trial {baseline.number}): {_values(summary.baseline)}" if baseline else ""
    name = summary.model
    return (f"# Best of Optuna study {summary.study_name}: trial {summary.best_trial} of {n_trials}, "
            f"{_values(summary.best)}{versus}.\n"
            f"# Re-train it from configs/tuned/{name}.yaml: {retrain_command(name)}\n")


def finish(sweep: Sweep) -> Summary:
    """Summarise the study and its best config; log both, the figures and the report to the parent run."""
    import mlflow

    from dl_uncertainty.tracking import store

    cfg, objectives = sweep.cfg, list(sweep.cfg.tune.objectives)
    study = load_study(cfg, sweep.study_name)
    try:
        best = best_trial(study, objectives)
    except ValueError:
        raise UserError(f"no trial of study {sweep.study_name!r} completed; see the trials' logs") from None
    baseline = next((t for t in study.trials if t.user_attrs.get("baseline") and t.values), None)
    summary = Summary(
        study_name=sweep.study_name, model=cfg.model.name, objectives=objectives, best_trial=best.number,
        best=dict(zip(objectives, best.values, strict=True)),
        baseline=dict(zip(objectives, baseline.values, strict=True)) if baseline else None,
        counts={s.name.lower(): n for s in optuna.trial.TrialState
                if (n := sum(t.state == s for t in study.trials))},
        params=dict(best.params), importances=importances(study, objectives, cfg.seed))
    summary.tuned_yaml = tuned_yaml(cfg, best, _headline(summary, len(study.trials), baseline),
                                     sweep.study_name)
    rows = _rows(study, objectives)
    figures = {"optimization_history": plots.optimization_history(
        rows, {o: OBJECTIVES[o] for o in objectives}, title=f"{sweep.study_name}: optimisation history")}
    if summary.importances:
        figures["param_importances"] = plots.param_importances(summary.importances)
    summary.html = html(summary, rows, figures, shown_url(cfg.tune.storage))

    store.setup(cfg)
    with mlflow.start_run(run_id=sweep.parent_run_id):
        mlflow.log_metrics({f"best_{k}": v for k, v in summary.best.items()}
                           | {f"baseline_{k}": v for k, v in (summary.baseline or {}).items()}
                           | {f"trials_{k}": v for k, v in summary.counts.items()})
        mlflow.set_tags({"best_trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}})
        for name, values in summary.importances.items():
            mlflow.log_metrics({f"importance_{name}.{k}": v for k, v in values.items()})
        mlflow.log_text(summary.tuned_yaml, f"tuned/{cfg.model.name}.yaml")
        mlflow.log_text(summary.html, "reports/sweep.html")
        for name, figure in figures.items():
            mlflow.log_figure(figure, f"figures/{name}.png")
    return summary


def html(summary: Summary, rows: list[dict], figures: dict, storage: str) -> str:
    """A self-contained page: best vs defaults, the best parameters, figures, every trial."""
    compare = [{"": "best", "trial": summary.best_trial, **summary.best}]
    if summary.baseline:
        compare.append({"": "defaults", **summary.baseline})
    trials = [{"trial": r["number"], "state": r["state"], **r["values"], "epochs": r["epochs"],
               **{k: str(v) for k, v in r["params"].items()}} for r in rows]
    counts = ", ".join(f"{n} {s}" for s, n in summary.counts.items())
    sections = [
        Section("Best trial", text=[f"Study {summary.study_name} in {storage}: {counts}.",
                                    f"Re-train it from configs/tuned/{summary.model}.yaml: "
                                    f"{retrain_command(summary.model)}"], table=compare),
        Section("Best parameters", table={k: v for k, v in summary.params.items()}),
        Section("Optimisation history", figures={"Each trial and the best so far": figures["optimization_history"]}),
    ]
    if "param_importances" in figures:
        sections.append(Section("Parameter importance", figures={"fANOVA": figures["param_importances"]},
                                table=[{"objective": o, **v} for o, v in summary.importances.items()]))
    sections.append(Section("Trials", table=trials))
    return html_report(f"Sweep: {summary.model}", sections)
