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
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from tqdm.auto import tqdm

from dl_uncertainty.data.augment import augment
from dl_uncertainty.data.splits import Split
from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import build_model, family_of
from dl_uncertainty.families.feature_density import fit_feature_density
from dl_uncertainty.families.losses import Mix, mix_batch
from dl_uncertainty.families.networks import resolve_device
from dl_uncertainty.families.predict import predict_log_probs
from dl_uncertainty.training.checkpoints import (
    Checkpointer,
    TrainingInterrupted,
    apply_settings,
    optimizer_settings,
)
from dl_uncertainty.training.schedule import make_scheduler, step_groups
from dl_uncertainty.uncertainty import metrics

EpochCallback = Callable[[int, dict[str, float]], None]
VAL_BATCH = 1024  # validation rows per forward pass


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


NATIVE_POOLS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def set_threads(num_threads: int) -> None:
    """``num_threads`` for torch and for the BLAS and OpenMP pools numpy, scipy and scikit-learn bring:
    theirs spin between calls, so three pipeline branches on two cores with a pool of two each ran at
    half speed (the environment variables reach the libraries loaded after this)."""
    if num_threads > 0:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(num_threads)
        threadpool_limits(num_threads)
        os.environ.update({name: str(num_threads) for name in NATIVE_POOLS})


def make_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def kl_scale(model_cfg: DictConfig, epoch: int, n_train: int) -> float:
    """Weight on the summed KL: kl_weight / N_train, linearly warmed up over kl_anneal_epochs
    (families without a KL term have neither key: 1 / N_train, unused)."""
    anneal = model_cfg.get("kl_anneal_epochs", 0)
    warmup = min(1.0, epoch / anneal) if anneal else 1.0
    return model_cfg.get("kl_weight", 1.0) * warmup / n_train


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
    """The training objective and its parts for one batch, as the model's family defines them."""
    return family_of(model).loss_terms(model, x, y, cfg, kl_w, mix)


def val_log_probs(model: nn.Module, x, samples: int) -> torch.Tensor:
    """Log-probabilities ``[T, N, K]`` for per-epoch validation: ``samples`` MC draws, or with 0 the
    point estimate, one eval-mode pass per network (no dropout, a BNN's posterior mean, each
    ensemble member: its members are its samples either way)."""
    if samples > 0:
        return predict_log_probs(model, x, samples)
    family, device = family_of(model), next(model.parameters()).device
    chunks = [torch.log_softmax(family.logits(model, torch.as_tensor(np.array(x[i : i + VAL_BATCH], np.float32),
                                                                      device=device)), -1).float().cpu()
              for i in range(0, max(len(x), 1), VAL_BATCH)]
    return torch.cat(chunks, dim=1)


def evaluate_split(model: nn.Module, split: Split, samples: int) -> dict[str, float]:
    """NLL and accuracy on a split (MC-averaged over ``samples`` draws; 0: the point estimate)."""
    log_probs = val_log_probs(model, split.x, samples)
    return {"nll": metrics.nll(log_probs, split.y), "acc": metrics.accuracy(log_probs, split.y)}


def train_model(cfg: DictConfig, train: Split, val: Split, *, on_epoch: EpochCallback | None = None,
                checkpoint_dir: str | Path | None = None, quiet: bool = False,
                checkpoint_meta: dict | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``train`` with early stopping on the val NLL; return the best weights
    (``train.keep_epoch=last``: the final epoch's).

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


@dataclass
class _Run:
    """What one training run carries from epoch to epoch (and what a checkpoint restores)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator
    history: dict[str, list[float]] = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    bad_epochs: int = 0
    start_epoch: int = 1
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    def state(self, cfg: DictConfig, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                "model_config": OmegaConf.to_container(cfg.model, resolve=True),
                "history": self.history, "best": self.best, "bad_epochs": self.bad_epochs,
                "rng": torch.get_rng_state(), "shuffle_rng": self.shuffle.get_state(),
                **({"scheduler": self.scheduler.state_dict()} if self.scheduler else {})}

    def resume(self, state: dict, checkpoints: Checkpointer, cfg: DictConfig) -> None:
        if state["model_config"] != OmegaConf.to_container(cfg.model, resolve=True):
            raise UserError(f"checkpoint {checkpoints.path} was written for a different model config")
        settings = optimizer_settings(self.optimizer)  # the config's lr etc., applied over the checkpoint's
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError):
            raise UserError(
                f"checkpoint {checkpoints.path} was written for data with other features or classes; "
                "delete it or set train.resume=false"
            ) from None
        if self.scheduler and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        changed = apply_settings(self.optimizer, self.scheduler, settings)
        self.history, self.best, self.bad_epochs = state["history"], state["best"], state["bad_epochs"]
        self.start_epoch = state["epoch"] + 1
        checkpoints.first_epoch, checkpoints.saved_epoch = self.start_epoch, state["epoch"]
        torch.set_rng_state(state["rng"])
        self.shuffle.set_state(state["shuffle_rng"])
        print(f"resuming {cfg.model.name} from {checkpoints.path} after epoch {state['epoch']}"
              + (f"; changed: {', '.join(changed)}" if changed else ""))

    def record(self, epoch: int, metrics: dict[str, float], keep_last: bool = False) -> None:
        """Append the epoch's metrics; keep the weights if its val NLL is the best so far (with
        ``keep_last``, the final epoch's weights are kept instead, so none are copied)."""
        for key, value in metrics.items():
            self.history.setdefault(key, []).append(value)
        if keep_last:
            self.best = {"nll": metrics["val_nll"], "epoch": epoch, "state": None}
        elif metrics["val_nll"] < self.best["nll"]:
            self.best = {"nll": metrics["val_nll"], "epoch": epoch, "state": copy.deepcopy(self.model.state_dict())}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1


class _Data:
    """The training split on the device (one tensor, batched by index) or streamed from disk."""

    def __init__(self, cfg: DictConfig, train: Split, device: torch.device):
        self.cfg, self.train, self.device = cfg, train, device
        self.streaming = streams(cfg.data, train.x)
        if self.streaming:  # stays on disk; each epoch's batches come from a DataLoader
            self.y = torch.as_tensor(train.y, dtype=torch.long)
        else:
            rows = np.asarray(train.x, np.float32) if train.x.flags.writeable else np.array(train.x, np.float32)
            self.x = torch.as_tensor(rows, device=device)
            self.y = torch.as_tensor(train.y, dtype=torch.long, device=device)
        self.n = len(self.y)

    def batches(self, order: torch.Tensor):
        size = self.cfg.train.batch_size
        if self.streaming:
            return torch.utils.data.DataLoader(
                _Batches(self.train.x, self.train.y, list(order.split(size))), batch_size=None,
                num_workers=self.cfg.data.workers, pin_memory=self.device.type == "cuda",
                generator=torch.Generator())  # not the global one: the same RNG draws as in memory
        return ((self.x[idx], self.y[idx]) for idx in order.to(self.device).split(size))


def _train_epoch(run: _Run, data: _Data, cfg: DictConfig, epoch: int, scaler: torch.amp.GradScaler,
                 interactive: bool) -> tuple[dict[str, float], float]:
    """One pass over the shuffled training split: the per-row sums of the loss terms, and the KL weight."""
    model, device, shape = run.model, data.device, data.train.schema.feature_shape
    augmenting = len(shape) == 3 and (cfg.data.hflip or cfg.data.crop_padding > 0)
    model.train()
    kl_w = kl_scale(cfg.model, epoch, data.n)
    order = torch.randperm(data.n, generator=run.shuffle)
    group_rows = step_groups(data.n, cfg.train.batch_size, cfg.train.get("accumulate_grad_batches", 1))
    # a bar (rows/s, time left) on a terminal, for epochs still running after a few seconds
    bar = tqdm(total=data.n, desc=f"{cfg.model.name} epoch {epoch}/{cfg.train.epochs}", leave=False,
               disable=not interactive, unit="row", unit_scale=True, delay=5)
    run.optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = {}  # summed on the device: one sync per epoch, not one per step
    with _conv_layout(model, device):
        _train_steps(run, data, cfg, order, group_rows, scaler, augmenting, kl_w, totals, bar)
    bar.close()
    return {key: float(value) for key, value in totals.items()}, kl_w


@contextmanager
def _conv_layout(model: nn.Module, device: torch.device):
    """Image networks train with their conv weights (and so activations) channels-last on the CPU,
    where oneDNN's convolution, pooling and BatchNorm kernels run ~1.3-1.5x faster that way; the
    weights are back in the default layout before anything else (validation, checkpoints, SWAG's
    flat parameter vectors) sees them. Values are the same; only the memory order differs."""
    if device.type != "cpu" or not any(p.dim() == 4 for p in model.parameters()):
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def _train_steps(run: _Run, data: _Data, cfg: DictConfig, order: torch.Tensor, group_rows: list[int],
                 scaler: torch.amp.GradScaler, augmenting: bool, kl_w: float, totals: dict[str, torch.Tensor],
                 bar) -> None:
    model, device, shape = run.model, data.device, data.train.schema.feature_shape
    use_amp, accumulate = scaler.is_enabled(), cfg.train.get("accumulate_grad_batches", 1)
    for i, (xb, yb) in enumerate(data.batches(order)):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        if augmenting:
            xb = augment(xb, shape, cfg.data.hflip, cfg.data.crop_padding)
        mix = mix_batch(xb, yb, cfg.train, shape)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            terms = loss_terms(model, xb, yb, cfg, kl_w, mix)
        # the step's loss is the mean over its rows: each batch weighted by its share of them
        scaler.scale(terms["loss"] * (len(yb) / group_rows[i])).backward()
        if (i + 1) % accumulate == 0 or i + 1 == len(group_rows):
            scaler.step(run.optimizer)
            scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            if run.scheduler:
                run.scheduler.step()
        for key, value in terms.items():
            part = value.detach().double() * len(yb)
            totals[key] = totals[key] + part if key in totals else part
        bar.update(len(yb))


def _epoch_metrics(sums: dict[str, float], kl_w: float, n_train: int, val_metrics: dict[str, float]) -> dict[str, float]:
    kl_term = kl_w * sums["kl"] / n_train if "kl" in sums else 0.0
    return {
        "train_loss": sums["loss"] / n_train,
        "train_nll": sums["nll"] / n_train,
        **({"kl": sums["kl"] / n_train} if "kl" in sums else {}),
        "val_loss": val_metrics["nll"] + kl_term,
        "val_acc": val_metrics["acc"],
        "val_nll": val_metrics["nll"],
    }


def _resolved(cfg: DictConfig) -> DictConfig:
    """The config with its interpolations resolved once: every training step reads it, and each read
    of an interpolated key re-parses it. One that cannot be resolved whole (a key only some other
    step needs) is read as it is."""
    try:
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException:
        return cfg
    OmegaConf.set_struct(resolved, True)
    return resolved


def _train_model(cfg: DictConfig, train: Split, val: Split, on_epoch: EpochCallback | None,
                 checkpoints: Checkpointer | None, quiet: bool) -> TrainResult:
    seed_everything(cfg.seed)
    set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, train.schema.feature_shape, len(train.schema.class_names)).to(device)
    family = family_of(model)
    run = _Run(model, make_optimizer(cfg.train, model.parameters()), torch.Generator().manual_seed(cfg.seed))
    run.scheduler = make_scheduler(cfg.train, run.optimizer, len(train.y))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp and device.type == "cuda")
    data = _Data(cfg, train, device)
    run.best = {"nll": math.inf, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    state = checkpoints.load() if checkpoints and cfg.train.resume else None
    if state is not None:
        run.resume(state, checkpoints, cfg)
    elif checkpoints and cfg.train.resume:  # e.g. a restarted pod's first try: say it, then train
        print(f"train.resume=true: no checkpoint at {checkpoints.path} yet; training from the first epoch")

    def patience_spent() -> bool:  # early stopping: this many epochs without a better val NLL
        return bool(cfg.train.early_stopping_patience) and run.bad_epochs >= cfg.train.early_stopping_patience

    interactive = sys.stderr.isatty() and not quiet
    step_cfg = _resolved(cfg)
    seen, busy = 0, 0.0
    epoch = run.start_epoch - 1
    for epoch in range(run.start_epoch, cfg.train.epochs + 1):
        if patience_spent():
            epoch -= 1
            break
        tic = time.perf_counter()
        sums, kl_w = _train_epoch(run, data, step_cfg, epoch, scaler, interactive)
        busy += time.perf_counter() - tic
        seen += data.n
        family.epoch_end(model, epoch, cfg)
        with _conv_layout(model, device):
            val_metrics = evaluate_split(model, val, cfg.train.val_mc_samples)
        metrics = _epoch_metrics(sums, kl_w, data.n, val_metrics)
        run.record(epoch, metrics, keep_last=cfg.train.keep_epoch == "last")
        line = (f"{cfg.model.name} epoch {epoch:3d}/{cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
                f"val_acc {metrics['val_acc']:.4f}  val_nll {metrics['val_nll']:.4f}")
        if not quiet:
            (tqdm.write if interactive else print)(line)
        if on_epoch:
            on_epoch(epoch, metrics)
        if checkpoints:
            checkpoints.epoch_done(run.state(cfg, epoch), last_epoch=epoch == cfg.train.epochs or patience_spent())

    if run.best["state"] is not None:  # None: keep_epoch=last, the model holds the final epoch's weights
        model.load_state_dict(run.best["state"])
    family.after_training(model, train, val, cfg)
    fit_feature_density(model, train, val, cfg)  # the distance-aware score, on the final weights
    rate = seen / busy if busy else 0.0
    return TrainResult(model, run.history, best_epoch=run.best["epoch"], epochs_run=epoch, samples_per_second=rate)
