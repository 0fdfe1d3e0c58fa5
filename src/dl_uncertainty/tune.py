"""Tune a model's hyper-parameters with Optuna; each trial is a nested MLflow run under one parent.

    python -m dl_uncertainty.tune model=mc_dropout_dnn tune.n_trials=30
    python -m dl_uncertainty.tune model=bnn,mc_dropout_dnn        (one study each, in turn)
    python -m dl_uncertainty.tune model=bnn train.lr='tag(log, interval(1e-4, 1e-2))' train.batch_size=64
"""

from __future__ import annotations

import sys
from pathlib import Path

from dl_uncertainty.errors import UserError, exit_on_user_error

HELP = """usage: python -m dl_uncertainty.tune [--cfg] [key=value | key=<search range> ...]

{doc}
The search space per model family is tune.space in {configs}/tune/default.yaml, in Hydra's sweep
syntax; on the command line the same syntax adds or replaces a key, and a plain value fixes it:
  interval(a, b)  int(interval(a, b))  tag(log, interval(a, b))  range(a, b, step=s)  choice(x, y, ...)
Other keys: tune.n_trials (budget), tune.objectives ([val_nll] | [val_nll,val_acc] ...),
tune.sampler (tpe|random|nsga2), tune.pruner (median|hyperband|none), tune.storage (SQLAlchemy URL),
tune.study_name (continue a study).
The best trial is written as {configs}/tuned/<model>.yaml: re-train it with
  python -m dl_uncertainty.train +tuned=<model>
--cfg prints the composed config (with the search space) and exits."""


def _jobs(overrides: list[str]) -> list[list[str]]:
    """``model=a,b`` -> one job per model; everything else is passed on."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from dl_uncertainty.config.compose import mapping_override

    overrides = [mapping_override(o) for o in overrides]  # quoted mapping keys, which the parser refuses
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise UserError(f"invalid override: {str(err).splitlines()[0]}") from None
    models = [o for o in parsed if o.key_or_group == "model" and o.is_sweep_override()]
    if not models:
        return [overrides]
    rest = [o.input_line for o in parsed if o not in models]
    return [[*rest, f"model={name}"] for name in models[-1].sweep_string_iterator()]


def tune(cfg) -> object:
    """One study for ``cfg.model``: create it, run every trial here, summarise."""
    from dl_uncertainty.config.checks import OBJECTIVES
    from dl_uncertainty.training.tuning import begin, shown_url, work

    sweep = begin(cfg)  # a storage or MLflow problem shows up here, before the heavy imports
    from dl_uncertainty.reports.sweep import _values, finish, retrain_command, save_tuned

    u = cfg.tune
    goal = ", ".join(f"{o} ({OBJECTIVES[o]})" for o in u.objectives)
    print(f"tuning {cfg.model.name}: study {sweep.study_name} in {shown_url(u.storage)}, {sweep.trials} trials, "
          f"{goal}, sampler {u.sampler}, pruner {u.pruner if len(u.objectives) == 1 else 'none'}", flush=True)
    work(sweep)
    summary = finish(sweep)
    save_tuned(summary)
    report = Path("outputs") / "sweeps" / f"{sweep.study_name}.html"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(summary.html)
    best = _values(summary.best) + (f" (defaults: {_values(summary.baseline)})" if summary.baseline else "")
    print(f"{cfg.model.name}: best trial {summary.best_trial}: {best}\n"
          f"  best config {summary.tuned_path}\n  re-train it: {retrain_command(cfg.model.name)}\n"
          f"  report {report}  (MLflow parent run {sweep.parent_run_id})", flush=True)
    return summary


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    import logging

    from omegaconf import OmegaConf

    from dl_uncertainty.cli import _groups
    from dl_uncertainty.config.schema import config_dir

    logging.getLogger("alembic").setLevel(logging.WARNING)
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(HELP.format(doc=__doc__.strip(), configs=config_dir()) + f"\n\nconfig groups:\n{_groups()}")
        return
    unknown = {a for a in args if a.startswith("-")} - {"--cfg"}
    if unknown:
        raise UserError(f"unknown option {sorted(unknown)[0]}; see --help")
    from dl_uncertainty.training.tuning import compose

    configs = [compose(job) for job in _jobs([a for a in args if not a.startswith("-")])]
    for cfg in configs:
        if "--cfg" in args:
            print(OmegaConf.to_yaml(cfg))
        else:
            tune(cfg)


if __name__ == "__main__":
    main()
