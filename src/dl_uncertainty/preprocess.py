"""Clean and split the configured data into ``<data_dir>/{train,val,calib,test,ood}.npz``.


    python -m dl_uncertainty.preprocess data_dir=data/processed data=csv data.path=table.csv
"""

from __future__ import annotations

from omegaconf import DictConfig

from dl_uncertainty.data.splits import save_splits
from dl_uncertainty.errors import UserError, check_writable


def _task(cfg: DictConfig) -> None:
    from dl_uncertainty.steps import prepared_splits  # torch loads only when there is work

    if not str(cfg.data_dir or "").strip():
        raise UserError("data_dir is empty; set it to the folder the split files go to, e.g. data_dir=data/processed")
    check_writable(cfg.data_dir, "data_dir")  # before any work
    splits = prepared_splits(cfg)
    for name, path in save_splits(splits, cfg.data_dir).items():
        print(f"{name:5s} {len(splits[name].y):6d} examples -> {path}")


if __name__ == "__main__":
    from dl_uncertainty.cli import run

    run("preprocess", __doc__, _task)
