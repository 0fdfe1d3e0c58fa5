"""Clean and split the configured data into ``<data_dir>/{train,val,test,ood}.npz``.


    python -m dl_uncertainty.preprocess data_dir=data/processed data=csv data.path=table.csv
"""

from __future__ import annotations

from omegaconf import DictConfig

from .data import dropped_rows_line, prepare, save_splits
from .errors import check_writable


def _task(cfg: DictConfig) -> None:
    check_writable(cfg.data_dir, "data_dir")  # before any work
    splits = prepare(cfg.data, cfg.seed)
    if dropped := dropped_rows_line(splits["train"].schema):
        print(dropped)
    for name, path in save_splits(splits, cfg.data_dir).items():
        print(f"{name:5s} {len(splits[name].y):6d} examples -> {path}")


if __name__ == "__main__":
    from .cli import run

    run("preprocess", __doc__, _task)
