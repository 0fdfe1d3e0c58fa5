"""Training: the ELBO for the BNN, the data loss alone for MC-Dropout and ensemble members.

A training split up to ``data.in_memory_max_mb`` lives on the device as one tensor and is batched
by index; a larger one (or any, with ``data.stream=true``) stays on disk, memory-mapped, and a
DataLoader reads the same batches (``data.workers`` processes; pinned memory on CUDA). Image
batches are augmented on the device (``data.hflip``, ``data.crop_padding``; training only). A
checkpoint is written at most every ``train.checkpoint_every_s``, for the last epoch, and on Ctrl-C
for the last finished epoch, so ``train.resume=true`` continues exactly where a run stopped.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from dl_uncertainty.data.splits import Split
from dl_uncertainty.errors import UserError
from dl_uncertainty.families.networks import (
    Ensemble,
    get_model,
    is_bayesian,
    kl_divergence,
    resolve_device,
)
from dl_uncertainty.training.augment import augment
from dl_uncertainty.training.checkpoints import Checkpointer, TrainingInterrupted
from dl_uncertainty.training.losses import Mix, mix_batch, mixed_loss
from dl_uncertainty.uncertainty import metrics
from dl_uncertainty.uncertainty.predict import predict_log_probs

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    model: nn.Module
    history: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int = 0
    epochs_run: int = 0
    samples_per_second: float = 0.0

    @property
    def best(self) -> dict[str, float]:
        return {k: v[self.best_epoch - 1] for k, v in self.history.items()}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def set_threads(num_threads: int) -> None:
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def make_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def kl_scale(model_cfg: DictConfig, epoch: int, n_train: int) -> float:
    """Weight on the summed KL: kl_weight / N_train, linearly warmed up over kl_anneal_epochs."""
    warmup = min(1.0, epoch / model_cfg.kl_anneal_epochs) if model_cfg.kl_anneal_epochs else 1.0
    return model_cfg.kl_weight * warmup / n_train


def streams(data_cfg: DictConfig, x: np.ndarray) -> bool:
    """Whether training reads ``x`` from disk in batches rather than holding it on the device."""
    mode = str(data_cfg.stream).lower()
    return mode == "true" or (mode == "auto" and x.nbytes > data_cfg.in_memory_max_mb * 2**20)


class _Batches(torch.utils.data.Dataset):
    """Item i is batch i of an epoch's order: rows gathered from a (memory-mapped) array."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batches: list[torch.Tensor]):
        self.x, self.y, self.batches = x, y, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getstate__(self) -> dict:  # a worker started by spawn maps the file again, not a copy of it
        state = dict(self.__dict__)
        if isinstance(self.x, np.memmap) and self.x.filename:
            state["x"] = (self.x.filename, self.x.dtype, self.x.offset, self.x.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["x"], tuple):
            state["x"] = np.memmap(state["x"][0], state["x"][1], "r", state["x"][2], state["x"][3])
        self.__dict__.update(state)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batches[i].numpy()
        return torch.from_numpy(np.asarray(self.x[idx], np.float32)), torch.from_numpy(self.y[idx])


def loss_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig, kl_w: float,
               mix: Mix | None = None) -> dict:
    """The training objective and its parts for one batch (``mix``: the batch after mixup/cutmix)."""
    inputs = x if mix is None else mix.x
    if isinstance(model, Ensemble):
        logits = model.member_logits(inputs)
        members = logits.shape[0]
        partner = None if mix is None else Mix(mix.x, mix.y_partner.repeat(members), mix.lam)
        nll = mixed_loss(logits.reshape(-1, logits.shape[-1]).float(), y.repeat(members), partner,
                         cfg.train) * members  # sum of the members' mean losses: each learns as if alone
        return {"loss": nll, "nll": nll / members}
    logits = model(inputs).float()
    nll = mixed_loss(logits, y, mix, cfg.train)
    if is_bayesian(model):  # the ELBO: the same data term plus the scaled KL
        kl = kl_divergence(model).squeeze()
        return {"loss": nll + kl_w * kl, "nll": nll, "kl": kl}
    return {"loss": nll, "nll": nll}


def evaluate_split(model: nn.Module, split: Split, samples: int) -> dict[str, float]:
    """MC-averaged NLL and accuracy on a split."""
    log_probs = predict_log_probs(model, split.x, samples)
    return {"nll": metrics.nll(log_probs, split.y), "acc": metrics.accuracy(log_probs, split.y)}


def train_model(
    cfg: DictConfig,
    train: Split,
    val: Split,
    *,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    quiet: bool = False,
    checkpoint_meta: dict | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``train`` with early stopping on the val NLL; return the best weights.

    ``on_epoch(epoch, metrics)`` sees every epoch's metrics (MLflow logging, pruning: an exception
    it raises ends the training); ``quiet`` drops the per-epoch line; ``checkpoint_meta`` is saved
    in every checkpoint (e.g. the MLflow run id, to continue that run on resume). Ctrl-C raises
    ``TrainingInterrupted`` once the last finished epoch is checkpointed.
    """
    checkpoints = Checkpointer(checkpoint_dir, cfg.train.checkpoint_every_s) if checkpoint_dir else None
    if checkpoints:
        checkpoints.meta = dict(checkpoint_meta or {})
    try:
        return _train_model(cfg, train, val, on_epoch, checkpoints, quiet)
    except KeyboardInterrupt:
        if checkpoints is None:
            raise TrainingInterrupted(None, 0, written=False) from None
        raise checkpoints.interrupted() from None


def _train_model(cfg: DictConfig, train: Split, val: Split, on_epoch: EpochCallback | None,
                 checkpoints: Checkpointer | None, quiet: bool) -> TrainResult:
    seed_everything(cfg.seed)
    set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    model = get_model(cfg.model, train.schema.feature_shape, len(train.schema.class_names)).to(device)
    optimizer = make_optimizer(cfg.train, model.parameters())
    use_amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    shuffle = torch.Generator().manual_seed(cfg.seed)

    streaming = streams(cfg.data, train.x)
    if streaming:  # stays on disk; each epoch's batches come from a DataLoader
        y = torch.as_tensor(train.y, dtype=torch.long)
    else:
        rows = np.asarray(train.x, np.float32) if train.x.flags.writeable else np.array(train.x, np.float32)
        x = torch.as_tensor(rows, device=device)
        y = torch.as_tensor(train.y, dtype=torch.long, device=device)
    n_train, batch = len(y), cfg.train.batch_size
    augmenting = len(train.schema.feature_shape) == 3 and (cfg.data.hflip or cfg.data.crop_padding > 0)

    history: dict[str, list[float]] = {}
    best = {"nll": math.inf, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    bad_epochs, start_epoch = 0, 1
    state = checkpoints.load() if checkpoints and cfg.train.resume else None
    if state is not None:
        if state["model_config"] != OmegaConf.to_container(cfg.model, resolve=True):
            raise UserError(f"checkpoint {checkpoints.path} was written for a different model config")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError):
            raise UserError(
                f"checkpoint {checkpoints.path} was written for data with other features or classes; "
                "delete it or set train.resume=false"
            ) from None
        history, best, bad_epochs = state["history"], state["best"], state["bad_epochs"]
        start_epoch = state["epoch"] + 1
        checkpoints.first_epoch, checkpoints.saved_epoch = start_epoch, state["epoch"]
        torch.set_rng_state(state["rng"])
        shuffle.set_state(state["shuffle_rng"])
        print(f"resuming {cfg.model.name} from {checkpoints.path} after epoch {state['epoch']}")

    def patience_spent() -> bool:  # early stopping: this many epochs without a better val NLL
        return bool(cfg.train.early_stopping_patience) and bad_epochs >= cfg.train.early_stopping_patience

    interactive = sys.stderr.isatty() and not quiet
    seen, busy = 0, 0.0
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        if patience_spent():
            epoch -= 1
            break
        model.train()
        kl_w = kl_scale(cfg.model, epoch, n_train)
        sums: dict[str, float] = {}
        order = torch.randperm(n_train, generator=shuffle)
        if streaming:
            batches = torch.utils.data.DataLoader(
                _Batches(train.x, train.y, list(order.split(batch))), batch_size=None,
                num_workers=cfg.data.workers, pin_memory=device.type == "cuda",
                generator=torch.Generator())  # not the global one: the same RNG draws as in memory
        else:
            batches = ((x[idx], y[idx]) for idx in order.to(device).split(batch))
        bar = tqdm(batches, desc=f"{cfg.model.name} epoch {epoch}/{cfg.train.epochs}", total=-(-n_train // batch),
                   leave=False, disable=not interactive, unit="batch")
        tic = time.perf_counter()
        for xb, yb in bar:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if augmenting:
                xb = augment(xb, train.schema.feature_shape, cfg.data.hflip, cfg.data.crop_padding)
            mix = mix_batch(xb, yb, cfg.train, train.schema.feature_shape)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                terms = loss_terms(model, xb, yb, cfg, kl_w, mix)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * len(yb)
        busy += time.perf_counter() - tic
        seen += n_train

        val_metrics = evaluate_split(model, val, cfg.train.val_mc_samples)
        kl_term = kl_w * sums["kl"] / n_train if "kl" in sums else 0.0
        metrics = {
            "train_loss": sums["loss"] / n_train,
            "train_nll": sums["nll"] / n_train,
            **({"kl": sums["kl"] / n_train} if "kl" in sums else {}),
            "val_loss": val_metrics["nll"] + kl_term,
            "val_acc": val_metrics["acc"],
            "val_nll": val_metrics["nll"],
        }
        for key, value in metrics.items():
            history.setdefault(key, []).append(value)
        if metrics["val_nll"] < best["nll"]:
            best, bad_epochs = {"nll": metrics["val_nll"], "epoch": epoch,
                                "state": copy.deepcopy(model.state_dict())}, 0
        else:
            bad_epochs += 1
        line = (f"{cfg.model.name} epoch {epoch:3d}/{cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
                f"val_acc {metrics['val_acc']:.4f}  val_nll {metrics['val_nll']:.4f}")
        if not quiet:
            (tqdm.write if interactive else print)(line)
        if on_epoch:
            on_epoch(epoch, metrics)
        if checkpoints:
            checkpoints.epoch_done({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "model_config": OmegaConf.to_container(cfg.model, resolve=True),
                "history": history, "best": best, "bad_epochs": bad_epochs,
                "rng": torch.get_rng_state(), "shuffle_rng": shuffle.get_state(),
            }, last_epoch=epoch == cfg.train.epochs or patience_spent())

    model.load_state_dict(best["state"])
    rate = seen / busy if busy else 0.0
    return TrainResult(model, history, best_epoch=best["epoch"], epochs_run=epoch, samples_per_second=rate)
