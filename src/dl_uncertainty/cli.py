"""Command lines in Hydra's syntax: ``key=value`` overrides, ``--multirun`` sweeps, ``--cfg``, ``--help``.

Configs are composed with Hydra's compose API rather than ``@hydra.main`` so that every mistake
(an unknown key, a bad value, a missing file) is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from dl_uncertainty.config.compose import load_config, mapping_override
from dl_uncertainty.config.schema import config_dir
from dl_uncertainty.errors import UserError, exit_on_user_error

HELP = """usage: python -m dl_uncertainty.{command} [--multirun|-m] [--cfg] [key=value ...]

{doc}
Overrides use Hydra's syntax and are checked against the typed config:
  model=mc_dropout_dnn  data=csv data.path=s3://datasets/table.csv  train.epochs=20
--multirun sweeps comma-separated values one run after another:
  --multirun model=bnn,mc_dropout_dnn train.lr=0.001,0.0003
--cfg prints the composed config and exits.

config groups (in {configs}):
{groups}"""


class OneLineParser(argparse.ArgumentParser):
    """argparse that says a wrong flag as the project's one ``error:`` line, not its usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def _groups() -> str:
    root = config_dir()
    lines = []
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        options = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
        lines.append(f"  {group.name:9s} {options}")
    return "\n".join(lines)


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """``["model=a,b", "seed=1"]`` -> ``[["model=a", "seed=1"], ["model=b", "seed=1"]]``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise UserError(f"invalid override: {str(err).splitlines()[0]}") from None
    choices = []
    for override in parsed:
        if override.is_sweep_override():
            prefix = override.get_key_element()
            try:
                choices.append([f"{prefix}={value}" for value in override.sweep_string_iterator()])
            except HydraException:  # interval(): a range of values to sample, not a list to run
                raise UserError(f"{override.input_line}: --multirun runs lists (a,b,c) and range(start, stop); "
                                "interval() is sampled by python -m dl_uncertainty.tune") from None
        else:
            choices.append([override.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


@exit_on_user_error
def run(command: str, doc: str, task: Callable[[DictConfig], object], argv: list[str] | None = None) -> None:
    """Parse ``argv`` and run ``task`` once per composed config."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(HELP.format(command=command, doc=doc.strip(), configs=config_dir(), groups=_groups()))
        return
    multirun = bool({"--multirun", "-m"} & set(args))
    show = "--cfg" in args
    flags = [a for a in args if a.startswith("-")]
    unknown = set(flags) - {"--multirun", "-m", "--cfg"}
    if unknown:
        raise UserError(f"unknown option {sorted(unknown)[0]}; see --help")
    # before the sweep parser, which refuses the quoted keys a mapping may hold
    overrides = [mapping_override(a) for a in args if not a.startswith("-")]
    jobs = expand_sweeps(overrides) if multirun else [overrides]
    configs = [load_config(job) for job in jobs]  # every job checked before any work starts
    for index, (job, cfg) in enumerate(zip(jobs, configs, strict=True)):
        if show:
            print(OmegaConf.to_yaml(cfg))
            continue
        if multirun:
            print(f"[{index + 1}/{len(jobs)}] {' '.join(job)}", flush=True)
        task(cfg)
