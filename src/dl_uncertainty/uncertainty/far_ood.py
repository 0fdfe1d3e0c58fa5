"""Generated far-OOD images every machine can make: inputs no class of the data looks like.

Each kind is built in the images' own value range (pixels, before the data's scaling), from a seed,
so evaluation reports one AUROC per kind and the numbers repeat:

- ``uniform``: i.i.d. uniform noise;
- ``blobs``: one to three smooth Gaussian bumps on a dark background;
- ``inverted``: test images turned negative (max + min - x);
- ``constant``: one value everywhere;
- ``patch``: a random crop of a quarter to a half of a test image's side, scaled up to full size.
"""

from __future__ import annotations

import numpy as np

from dl_uncertainty.errors import UserError

FAR_KINDS = ("uniform", "blobs", "inverted", "constant", "patch")
MAX_INPUTS = 300  # per kind


def _blobs(rng: np.random.Generator, n: int, channels: int, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.zeros((n, channels, height, width))
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            sigma = rng.uniform(0.08, 0.25) * min(height, width)
            bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
            out[i] += rng.uniform(0.4, 1.0, size=(channels, 1, 1)) * bump
    return np.clip(out, 0, 1)


def _patches(rng: np.random.Generator, images: np.ndarray, n: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    _, _, height, width = images.shape
    out = np.empty((n, *images.shape[1:]))
    for i in range(n):
        side = rng.uniform(0.25, 0.5)
        h, w = max(1, round(side * height)), max(1, round(side * width))
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        crop = torch.from_numpy(np.ascontiguousarray(images[rng.integers(len(images)), :, top:top + h, left:left + w],
                                                     dtype=np.float64))[None]
        out[i] = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0].numpy()
    return out


def far_ood(kind: str, images: np.ndarray, n: int | None = None, seed: int = 0) -> np.ndarray:
    """``n`` (default: as many as ``images``, at most MAX_INPUTS) far-OOD images of ``kind`` shaped
    like ``images`` [N, C, H, W], in their value range."""
    if kind not in FAR_KINDS:
        raise UserError(f"unknown far-OOD kind {kind!r}; expected one of {', '.join(FAR_KINDS)}")
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim != 4 or len(arr) == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] array, got shape {arr.shape}")
    n = min(len(arr), MAX_INPUTS) if n is None else n
    lo, hi = float(arr.min()), float(arr.max())
    rng = np.random.default_rng([seed, FAR_KINDS.index(kind)])
    _, channels, height, width = arr.shape
    if kind == "uniform":
        unit = rng.uniform(0, 1, size=(n, channels, height, width))
    elif kind == "blobs":
        unit = _blobs(rng, n, channels, height, width)
    elif kind == "constant":
        unit = np.broadcast_to(rng.uniform(0, 1, size=(n, 1, 1, 1)), (n, channels, height, width))
    elif kind == "inverted":
        return (hi + lo - arr[rng.choice(len(arr), n, replace=n > len(arr))]).astype(np.float32)
    else:
        return _patches(rng, arr, n).astype(np.float32)
    return (lo + (hi - lo) * unit).astype(np.float32)
