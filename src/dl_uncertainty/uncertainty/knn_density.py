"""A nonparametric in-distribution score: the distance to the k-th nearest training feature after
L2-normalising every feature vector (Sun et al., ICML 2022, "Out-of-distribution detection with
deep nearest neighbors").

A class-conditional Gaussian needs enough rows per feature to estimate its covariance; a
nearest-neighbour distance needs none and makes no assumption about the features' shape, so it
holds up with a few hundred training images where the Gaussian does not. ``k`` follows the paper's
scaling with the number of stored rows (k = 50 for CIFAR-10's 50,000): one per thousand, at least 1.

Same interface as ``density.ClassGaussianDensity`` where callers need it: ``fit``, ``log_density``
(here: minus the k-th distance, higher = more in-distribution), ``state_dict`` / ``from_state``.
"""

from __future__ import annotations

import numpy as np

from dl_uncertainty.errors import UserError
from dl_uncertainty.uncertainty.density import as_features

MAX_ROWS = 10_000  # stored training rows (a random subset beyond it): bounds the bundle and a served row's cost
CHUNK = 2048


def _normalised(features, what: str) -> np.ndarray:
    x = as_features(features, what, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class KNNDensity:
    kind = "knn"

    def __init__(self, k: int | None = None, seed: int = 0):
        self.k, self.seed = k, seed
        self.bank: np.ndarray | None = None  # [M, D] normalised training features

    def fit(self, features, labels=None, num_classes: int | None = None) -> KNNDensity:
        bank = _normalised(features, "training features")
        if len(bank) == 0:
            raise UserError("cannot fit the feature density: no training rows")
        if len(bank) > MAX_ROWS:
            bank = bank[np.random.default_rng(self.seed).choice(len(bank), MAX_ROWS, replace=False)]
        self.bank = bank
        self.k = min(len(bank), self.k or max(1, len(bank) // 1000))
        return self

    def log_density(self, features) -> np.ndarray:
        """Minus the Euclidean distance from each row's normalised features to its k-th nearest
        stored training feature, [N]: higher = more in-distribution."""
        if self.bank is None:
            raise RuntimeError("fit the density before scoring")
        x = _normalised(features, "features")
        if x.shape[1] != self.bank.shape[1]:
            raise ValueError(f"features have {x.shape[1]} columns, the density was fitted on {self.bank.shape[1]}")
        out = np.empty(len(x))
        for start in range(0, len(x), CHUNK):
            sq = np.maximum(2.0 - 2.0 * (x[start:start + CHUNK] @ self.bank.T), 0.0)  # |a - b|^2 of unit vectors
            out[start:start + CHUNK] = -np.sqrt(np.partition(sq, self.k - 1, axis=1)[:, self.k - 1])
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.bank is None:
            raise RuntimeError("fit the density before saving it")
        return {"kind": np.array(self.kind), "k": np.array(self.k), "bank": self.bank}

    @classmethod
    def from_state(cls, state: dict) -> KNNDensity:
        density = cls(int(np.asarray(state["k"])))
        density.bank = np.asarray(state["bank"], dtype=np.float32)
        return density
