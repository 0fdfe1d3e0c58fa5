"""Checkpoints that let ``train.resume=true`` continue exactly where a run stopped, Ctrl-C included."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from dl_uncertainty.errors import UserError, check_writable


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training. ``epoch``: the last finished epoch, whose checkpoint is at ``path``
    (0: none); ``written``: whether this run wrote it (False: the checkpoint it resumed from)."""

    def __init__(self, path: Path | None, epoch: int, written: bool):
        super().__init__()
        self.path, self.epoch, self.written = path, epoch, written


class Checkpointer:
    """``last.pt``: weights, optimizer, RNG states, history, best-so-far, at most once per
    ``every_s`` seconds (writing one costs a tenth of a small epoch), always for the last epoch,
    and on Ctrl-C for the last finished epoch (kept in memory until then)."""

    def __init__(self, folder: str | Path, every_s: float = 0.0):
        self.path = check_writable(folder, "train.checkpoint_dir") / "last.pt"
        self.every_s, self.saved_at = every_s, time.monotonic()
        self.first_epoch, self.saved_epoch, self.unsaved = 1, 0, None
        self.meta: dict = {}  # saved in every checkpoint

    def due(self, last_epoch: bool) -> bool:
        return last_epoch or time.monotonic() - self.saved_at >= self.every_s

    def epoch_done(self, state: dict, last_epoch: bool) -> None:
        """Save ``state`` if due, else keep a copy of what changes in place for a Ctrl-C."""
        if self.due(last_epoch):
            self.save(state)
            self.saved_epoch, self.unsaved = state["epoch"], None
        else:
            self.unsaved = {**state, "model": copy.deepcopy(state["model"]),
                            "optimizer": copy.deepcopy(state["optimizer"]),
                            "history": {k: list(v) for k, v in state["history"].items()}}

    def interrupted(self) -> TrainingInterrupted:
        """Save the last finished epoch if it is not on disk yet; say which checkpoint is whose."""
        if self.unsaved is not None:
            self.save(self.unsaved)
            self.saved_epoch, self.unsaved = self.unsaved["epoch"], None
        return TrainingInterrupted(self.path, self.saved_epoch, written=self.saved_epoch >= self.first_epoch)

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, **self.meta}, tmp)
        os.replace(tmp, self.path)  # never leave a half-written checkpoint behind
        self.saved_at = time.monotonic()

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user problem
            raise UserError(f"cannot read checkpoint {self.path}: damaged, or not written by dl_uncertainty "
                            f"({type(err).__name__}); delete it or set train.resume=false") from None


def data_meta(schema) -> dict:
    """What a checkpoint records of the data it was trained on, so a resume can be refused early."""
    return {"feature_shape": [int(n) for n in schema.feature_shape], "class_names": [str(c) for c in schema.class_names]}


def check_resumable(state: dict, path: Path, cfg, schema) -> None:
    """Refuse, before anything else is touched (the MLflow run it continues above all), a checkpoint
    written for another model config, other features or other classes."""
    from omegaconf import OmegaConf

    from dl_uncertainty.families.base import build_model

    fix = f"delete {path}, set train.checkpoint_dir to another folder, or set train.resume=false"
    if state.get("model_config") != OmegaConf.to_container(cfg.model, resolve=True):
        raise UserError(f"checkpoint {path} was written for a different model config; {fix}")
    check_same_optimizer(state, path, cfg.train)
    was = {k: state[k] for k in ("feature_shape", "class_names") if k in state}
    now = data_meta(schema)
    if was and was != {k: now[k] for k in was}:
        raise UserError(f"checkpoint {path} was written for data with features {was.get('feature_shape')} and "
                        f"classes {was.get('class_names')}, this data has {now['feature_shape']} and "
                        f"{now['class_names']}; {fix}")
    model = build_model(cfg.model, schema.feature_shape, len(schema.class_names))
    try:  # a checkpoint from before the data was recorded: its weights must fit this data's model
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError):
        raise UserError(f"checkpoint {path} was written for data with other features or classes; {fix}") from None


def optimizer_name(state: dict) -> str:
    """adam, adamw or sgd: which optimizer wrote a checkpoint's optimizer state (read from its settings)."""
    group = state["optimizer"]["param_groups"][0]
    if "momentum" in group:
        return "sgd"
    return "adamw" if group.get("decoupled_weight_decay") else "adam"


def check_same_optimizer(state: dict, path: Path, train_cfg) -> None:
    """A checkpoint's optimizer moments only mean something to the optimizer that wrote them."""
    was = optimizer_name(state)
    if was != train_cfg.optimizer:
        raise UserError(f"checkpoint {path} was written with train.optimizer={was}, this run sets "
                        f"train.optimizer={train_cfg.optimizer}; set train.optimizer={was} to resume it, "
                        "or set train.resume=false to start over")


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's settings (lr, weight decay, ...) as the config made them, before a resume."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def apply_settings(optimizer: torch.optim.Optimizer, scheduler, settings: list[dict]) -> list[str]:
    """After a resume restored the optimizer's state: the config's settings apply, not the checkpoint's
    (a resume with another train.lr trains on with it; with a schedule, from the schedule's current
    step). Returns what changed, e.g. ``['lr 0.001 -> 0.0005']``."""
    changed = []
    for group, wanted in zip(optimizer.param_groups, settings, strict=True):
        base = "initial_lr" if scheduler is not None else "lr"
        for key, value in wanted.items():
            if key in ("lr", "initial_lr") and key != base:
                continue
            if group.get(key) != value:
                changed.append(f"{'lr' if key == base else key} {group.get(key)} -> {value}")
            group[key] = value
    if scheduler is not None:  # the schedule's factor at its current step, times the (new) base lr
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = scheduler.base_lrs[i] * scheduler.lr_lambdas[i](scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return changed
