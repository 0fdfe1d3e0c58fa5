"""Hydra entry points shared by ``python -m dl_uncertainty.<command>``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from omegaconf import DictConfig

from .config import config_dir, validate
from .errors import UserError, exit_on_user_error


def hydra_main(task: Callable[[DictConfig], object]) -> None:
    """Run ``task`` under ``@hydra.main`` on ``configs/`` (overrides, --multirun, --help, --cfg)."""
    import hydra

    logging.getLogger("alembic").setLevel(logging.WARNING)

    @exit_on_user_error
    def checked(cfg: DictConfig) -> None:
        validate(cfg)
        task(cfg)

    try:
        path = str(config_dir())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra.main(config_path=path, config_name="config", version_base="1.3")(checked)()
