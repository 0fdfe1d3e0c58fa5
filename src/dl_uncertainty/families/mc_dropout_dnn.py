"""``model=mc_dropout_dnn``: a deterministic network whose dropout stays on at test time (MC-Dropout).

MC samples are dropout masks, drawn by the engine; BatchNorm uses its running statistics.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import Family


class MCDropoutDNN(Family):
    name = "mc_dropout_dnn"

    def check(self, cfg: DictConfig) -> None:
        if cfg.dropout <= 0:
            raise UserError("model=mc_dropout_dnn needs model.dropout > 0")


FAMILY = MCDropoutDNN()
