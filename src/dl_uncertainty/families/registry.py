"""Which model families exist: one line per family. Importing this module imports no torch, so
configs, the pipeline's parameter lists and the CLIs can read the names cheaply."""

from __future__ import annotations

import importlib

from dl_uncertainty.errors import UserError

FAMILIES = {  # name (model=<name>, configs/model/<name>.yaml) -> the module that holds its FAMILY
    "bnn": "dl_uncertainty.families.bnn",
    "mc_dropout_dnn": "dl_uncertainty.families.mc_dropout_dnn",
    "deep_ensemble": "dl_uncertainty.families.deep_ensemble",
    "swag": "dl_uncertainty.families.swag",
    "laplace": "dl_uncertainty.families.laplace",
}
NAMES = tuple(FAMILIES)


def get_family(name: str):
    """The ``families.base.Family`` called ``name`` (its module is imported on first use)."""
    if name not in FAMILIES:
        raise UserError(f"unknown model {name!r}: use one of {', '.join(NAMES)}")
    return importlib.import_module(FAMILIES[name]).FAMILY
