"""``model=swag``: SWA-Gaussian (Maddox et al. 2019), a Gaussian over the weights fitted to the SGD
trajectory: mean and diagonal from the running first and second moments, plus a low-rank part from
the last K deviations, collected at the end of training epochs.

A weight sample is ``mean + sqrt(scale) * (sqrt(diag) * z1 + D z2 / sqrt(K - 1))``, so its covariance
is ``scale * (diag + D D^T / (K - 1))``; ``scale=0.5`` is the paper's ``(diag + low-rank) / 2``.
Sample t's normals come from a generator seeded by (seed, t), the engine's per-row seeding, so a
row's answer does not depend on its batch. BatchNorm statistics depend on the weights, so a net with
BatchNorm gets them recomputed on training rows for each of its first ``model.bn_samples`` samples
after training, stored in buffers. After training the network itself holds the SWA mean (with its
own BatchNorm statistics): its plain forward is the SWA prediction (``model.swa_only``).

The learning rate is the optimiser's as configured: the paper's constant (or cyclic) SWA learning
rate over the collection epochs is not applied.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from dl_uncertainty.data.splits import Split
from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import Family
from dl_uncertainty.families.losses import Mix
from dl_uncertainty.families.networks import build_network, penultimate

MOMENTS = ("mean", "sq_mean", "dev", "count")


class SWAGModel(nn.Module):
    """The network plus the SWAG moments and per-sample BatchNorm statistics, all buffers."""

    def __init__(self, net: nn.Module, rank: int, bn_samples: int, scale: float, swa_only: bool):
        super().__init__()
        self.net = net
        self.scale, self.swa_only = scale, swa_only
        self.shapes = [(name, p.shape) for name, p in net.named_parameters()]
        size = sum(p.numel() for p in net.parameters())
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("sq_mean", torch.zeros(size))
        self.register_buffer("dev", torch.zeros(rank, size))  # row (i - 1) % rank: snapshot i minus the mean then
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))  # set once the posterior is fitted
        self.register_buffer("seed", torch.zeros((), dtype=torch.long))  # the seed bn_mean/bn_var belong to
        self.bns = [(name, m) for name, m in net.named_modules() if isinstance(m, _BatchNorm)]
        channels = sum(m.num_features for _, m in self.bns)
        samples = bn_samples if self.bns else 0
        self.register_buffer("bn_mean", torch.zeros(samples, channels))
        self.register_buffer("bn_var", torch.ones(samples, channels))
        self.register_load_state_dict_pre_hook(_keep_later_moments)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def collect(self) -> None:
        """Add the network's current weights to the running moments."""
        w = parameters_to_vector(self.net.parameters()).detach()
        n = int(self.count) + 1
        self.mean += (w - self.mean) / n
        self.sq_mean += (w * w - self.sq_mean) / n
        self.dev[(n - 1) % len(self.dev)] = w - self.mean
        self.count += 1

    def weights(self, seed: int, t: int) -> torch.Tensor:
        """Weight sample t as one vector, its normals from the generator seeded by (seed, t)."""
        k = min(int(self.count), len(self.dev))
        gen = torch.Generator(self.mean.device).manual_seed(seed * 1_000_003 + t)
        z1 = torch.randn(self.mean.shape, generator=gen, device=self.mean.device)
        z2 = torch.randn(k, generator=gen, device=self.mean.device)
        diag = (self.sq_mean - self.mean**2).clamp_(min=0)  # float cancellation can dip below 0
        spread = diag.sqrt() * z1 + (z2 @ self.dev[:k]) / math.sqrt(k - 1)
        return self.mean + math.sqrt(self.scale) * spread

    def tensors(self, w: torch.Tensor, t: int | None) -> dict[str, torch.Tensor]:
        """Parameters (from ``w``) and BatchNorm statistics (of sample t) for ``functional_call``."""
        out, start = {}, 0
        for name, shape in self.shapes:
            size = math.prod(shape)
            out[name] = w[start:start + size].view(shape)
            start += size
        if t is not None:
            start = 0
            for name, bn in self.bns:
                prefix = f"{name}." if name else ""
                out[prefix + "running_mean"] = self.bn_mean[t, start:start + bn.num_features]
                out[prefix + "running_var"] = self.bn_var[t, start:start + bn.num_features]
                start += bn.num_features
        return out


def _keep_later_moments(module: SWAGModel, state_dict: dict, prefix: str, *_args) -> None:
    # The training loop reloads the best-val-NLL epoch's state_dict at the end. The moments are a
    # running average over the whole trajectory: one with fewer snapshots is an earlier state of it,
    # not a better one, so it leaves the moments collected since then in place.
    if prefix + "count" in state_dict and int(state_dict[prefix + "count"]) < int(module.count):
        for key in MOMENTS:
            state_dict[prefix + key] = getattr(module, key)


def first_epoch(swa_start: float, epochs: int) -> int:
    """The first collecting epoch: ``swa_start`` below 1 is the fraction of train.epochs run before it."""
    return math.floor(swa_start * epochs) + 1 if swa_start < 1 else int(swa_start)


def _bn_rows(train: Split, rows: int, seed: int, device: torch.device) -> torch.Tensor:
    """The training rows BatchNorm statistics are computed on (``rows`` of them, 0 = all), chosen by ``seed``."""
    n = len(train.y)
    if 0 < rows < n:
        idx = np.sort(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:rows].numpy())
        return torch.as_tensor(np.asarray(train.x[idx], np.float32), device=device)
    return torch.as_tensor(np.asarray(train.x, np.float32), device=device)


def _bn_statistics(net: nn.Module, w: torch.Tensor, rows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm running mean and variance of ``net`` (a working copy) with weights ``w``, averaged
    over ``rows`` in training batches; everything else (dropout) in eval mode."""
    vector_to_parameters(w, net.parameters())
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the batches, not an exponential one
        bn.train()
    with torch.no_grad():
        for batch in rows.split(batch_size):
            net(batch)
    return torch.cat([bn.running_mean for bn in bns]), torch.cat([bn.running_var for bn in bns])


class SWAG(Family):
    name = "swag"
    sampling = "own"

    def check(self, cfg: DictConfig) -> None:
        if cfg.rank < 2:
            raise UserError(f"model.rank must be >= 2 (the low-rank part divides by rank - 1), got {cfg.rank}")
        if cfg.scale < 0:
            raise UserError(f"model.scale must be >= 0, got {cfg.scale}")
        if cfg.swa_start <= 0:
            raise UserError(f"model.swa_start must be > 0 (an epoch, or a fraction of train.epochs below 1), "
                            f"got {cfg.swa_start}")
        if cfg.collect_every < 1:
            raise UserError(f"model.collect_every must be >= 1, got {cfg.collect_every}")
        if cfg.bn_samples < 1:
            raise UserError(f"model.bn_samples must be >= 1, got {cfg.bn_samples}")
        if cfg.bn_rows < 0:
            raise UserError(f"model.bn_rows must be >= 0 (0 = every training row), got {cfg.bn_rows}")

    def check_run(self, model: SWAGModel, cfg: DictConfig) -> None:
        """Checks that need train.* or evaluate.* (``check`` sees model.* only)."""
        m, epochs = cfg.model, cfg.train.epochs
        start = first_epoch(m.swa_start, epochs)
        if start > epochs:
            raise UserError(f"model.swa_start={m.swa_start} starts collecting at epoch {start}, after the last "
                            f"epoch (train.epochs={epochs})")
        if start + m.collect_every > epochs:
            raise UserError(f"model.swa_start={m.swa_start} with model.collect_every={m.collect_every} collects "
                            f"one snapshot by train.epochs={epochs}; SWAG needs at least 2")
        if model.bns and m.bn_samples < cfg.evaluate.mc_samples:
            raise UserError(f"model.bn_samples={m.bn_samples} is below evaluate.mc_samples="
                            f"{cfg.evaluate.mc_samples}: each sample needs its own BatchNorm statistics")

    def build(self, cfg: DictConfig, feature_shape: list[int], num_classes: int) -> nn.Module:
        net = build_network(cfg, feature_shape, num_classes, bayesian=False)
        return SWAGModel(net, cfg.rank, cfg.bn_samples, cfg.scale, cfg.swa_only)

    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig,
                   kl_w: float, mix: Mix | None = None) -> dict[str, torch.Tensor]:
        # The first batch is the first place the whole config is seen: fail before an epoch is spent.
        self.check_run(model, cfg)
        return super().loss_terms(model, x, y, cfg, kl_w, mix)

    def epoch_end(self, model: nn.Module, epoch: int, cfg: DictConfig) -> None:
        start = first_epoch(cfg.model.swa_start, cfg.train.epochs)
        if epoch >= start and (epoch - start) % cfg.model.collect_every == 0:
            with torch.no_grad():
                model.collect()

    def after_training(self, model: nn.Module, train: Split, val: Split, cfg: DictConfig) -> None:
        """Put the SWA mean into the network, then BatchNorm statistics for it and for each sample."""
        if int(model.count) < 2:
            raise UserError(f"SWAG collected {int(model.count)} snapshot(s): training stopped at an epoch before "
                            f"model.swa_start={cfg.model.swa_start} had two; start earlier, or raise "
                            f"train.early_stopping_patience (0 = off)")
        model.seed.fill_(cfg.seed)
        with torch.no_grad():
            vector_to_parameters(model.mean, model.net.parameters())
            if model.bns:
                work = copy.deepcopy(model.net).eval()
                rows = _bn_rows(train, cfg.model.bn_rows, cfg.seed, model.mean.device)
                size = cfg.train.batch_size
                _bn_statistics(work, model.mean, rows, size)
                model.net.load_state_dict(work.state_dict())  # the SWA mean with its own statistics
                for t in range(len(model.bn_mean)):
                    model.bn_mean[t], model.bn_var[t] = _bn_statistics(work, model.weights(cfg.seed, t), rows, size)
        model.ready.fill_(True)

    def sample(self, model: nn.Module, x: torch.Tensor, samples: int, *, strategy: str = "auto",
               seed: int | None = None, cache=None) -> torch.Tensor:
        """``[T, N, K]`` log-softmax of T weight samples; before the posterior is fitted (during
        training) and with ``model.swa_only``, the network as it is, T times."""
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                if not bool(model.ready) or model.swa_only:
                    one = torch.log_softmax(model.net(x).float(), dim=-1)
                    return one.unsqueeze(0).expand(samples, *one.shape)
                seed = int(model.seed) if seed is None else seed
                if model.bns:
                    self._check_bn_samples(model, samples, seed)
                out = []
                for t in range(samples):
                    tensors = model.tensors(model.weights(seed, t), t if model.bns else None)
                    out.append(torch.log_softmax(functional_call(model.net, tensors, (x,)).float(), dim=-1))
                return torch.stack(out)
        finally:
            model.train(was_training)

    @staticmethod
    def _check_bn_samples(model: SWAGModel, samples: int, seed: int) -> None:
        """Samples 0..T-1 of ``seed`` must be those the stored BatchNorm statistics were computed for."""
        if samples > len(model.bn_mean):
            raise UserError(f"this SWAG model has BatchNorm statistics for {len(model.bn_mean)} samples "
                            f"(model.bn_samples), {samples} were asked for; retrain with a larger model.bn_samples")
        if seed != int(model.seed):
            raise UserError(f"this SWAG model's BatchNorm statistics belong to seed={int(model.seed)}'s weight "
                            f"samples, not seed={seed}")

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of the network, which holds the SWA mean once trained."""
        return penultimate(model.net, x)

    def networks(self, model: nn.Module) -> list[nn.Module]:
        return [model.net]


FAMILY = SWAG()
