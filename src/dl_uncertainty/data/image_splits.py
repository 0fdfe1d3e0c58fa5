"""Image splits: decoded pixels become stratified train/val/calib/test/ood splits of normalised rows."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from dl_uncertainty.data.images import check_memory, conform_array, decode_all, list_images
from dl_uncertainty.data.splits import Schema, Split
from dl_uncertainty.data.stratify import class_names as in_distribution
from dl_uncertainty.data.stratify import stratified_parts, warn_missing_classes
from dl_uncertainty.errors import UserError

# ---------------------------------------------------------------- splits


def _normalisation(train: np.ndarray, cfg: DictConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-channel mean and std of pixels in [0, 1]: data.mean/std, else fitted on the uint8 training
    images (exactly, from each channel's histogram: no float copy of the data)."""
    channels = train.shape[1]
    if cfg.mean is not None:
        if len(cfg.mean) != channels or len(cfg.std) != channels:
            raise UserError(f"data.mean and data.std need {channels} values (one per channel), "
                            f"got {len(cfg.mean)} and {len(cfg.std)}")
        return np.asarray(cfg.mean, np.float64), np.asarray(cfg.std, np.float64), "per-channel mean/std (given)"
    values = np.arange(256) / 255
    mean, std = np.zeros(channels), np.zeros(channels)
    for c in range(channels):
        counts = np.bincount(train[:, c].ravel(), minlength=256)
        mean[c] = counts @ values / counts.sum()
        std[c] = np.sqrt(counts @ (values - mean[c]) ** 2 / counts.sum())
    return mean, np.where(std > 1e-6, std, 1.0), "per-channel mean/std (fitted on train)"


def _rows(pixels: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """uint8 images -> flat float32 rows, normalised (in place: one float32 copy of the data)."""
    rows = pixels.reshape(len(pixels), len(center)).astype(np.float32)
    rows /= 255
    rows -= center.astype(np.float32)
    rows /= scale.astype(np.float32)
    return rows


def make_splits(pixels: np.ndarray, labels: np.ndarray, cfg: DictConfig, seed: int,
                test: tuple[np.ndarray, np.ndarray] | None = None,
                far_ood: tuple[np.ndarray, str] | None = None, order: list[str] | None = None) -> dict[str, Split]:
    """uint8 images + string labels -> normalised train/val/calib/test/ood splits.

    ``test``: a fixed test set (a benchmark's own), else a stratified share of the images.
    ``far_ood``: images of another dataset, stored with the OOD split (else the evaluation
    uses uniform noise). ``order``: the class order (a benchmark's label order), else sorted names.
    """
    if test is not None:
        pixels, labels = np.concatenate([pixels, test[0]]), np.concatenate([labels, test[1]])
    is_test = np.zeros(len(labels), bool)
    if test is not None:
        is_test[len(labels) - len(test[1]):] = True
    ood_names = [str(c) for c in cfg.ood_classes]
    class_names = in_distribution(labels, ood_names, order)
    is_ood = np.isin(labels, ood_names)
    inside = np.flatnonzero(~is_ood & ~is_test)
    positions = stratified_parts(labels[inside], cfg, seed, with_test=test is None)
    parts = {name: inside[positions[name]] for name in ("train", "val", "calib")}
    parts["test"] = inside[positions["test"]] if test is None else np.flatnonzero(~is_ood & is_test)
    parts["ood"] = np.flatnonzero(is_ood)

    mean, std, how = _normalisation(pixels[parts["train"]], cfg)
    per_pixel = int(np.prod(pixels.shape[2:]))
    center, scale = np.repeat(mean, per_pixel), np.repeat(std, per_pixel)
    shape = list(pixels.shape[1:])
    cleaning = {"scaling": how, "center": center.tolist(), "scale": scale.tolist()}
    source = cfg.source if cfg.source != "image_folder" else f"image_folder {cfg.path}"
    far_name = far_ood[1] if far_ood is not None else Schema.far_ood
    index = {name: i for i, name in enumerate(class_names)}
    warn_missing_classes(class_names, {p: np.array([index[v] for v in labels[parts[p]]], dtype=np.int64)
                                       for p in ("train", "val", "test")},
                         cfg.val_fraction, cfg.test_fraction if test is None else None)
    splits = {}
    for name, rows in parts.items():
        lookup = index if name != "ood" else {n: i for i, n in enumerate(ood_names)}
        y = np.array([lookup[v] for v in labels[rows]], dtype=np.int64)
        schema = Schema(shape, class_names, ood_names, source, dict(cleaning), far_ood=far_name,
                        feature_names=[f"pixel_{i}" for i in range(len(center))])
        splits[name] = Split(_rows(pixels[rows], center, scale), y, schema)
    if far_ood is not None:
        splits["ood"].far_x = _rows(far_ood[0][: max(len(parts["test"]), 1)], center, scale)
    return splits


def prepare_images(cfg: DictConfig, seed: int) -> dict[str, Split]:
    """``data.source`` image_folder | mnist | fashion_mnist | cifar10 -> the four splits."""
    if cfg.source == "image_folder":
        files = list_images(cfg)
        check_memory(len(files), cfg)
        pixels = decode_all([f for f, _ in files], cfg)
        return make_splits(pixels, np.array([label for _, label in files]), cfg, seed)
    from dl_uncertainty.data.downloads import BENCHMARKS, load_benchmark

    train, test = load_benchmark(cfg.source, cfg)
    far = None
    if cfg.far_ood:
        _, (far_pixels, _) = load_benchmark(cfg.far_ood, cfg)
        far = (conform_array(far_pixels, train[0].shape[1], list(train[0].shape[2:])), cfg.far_ood)
    return make_splits(train[0], train[1], cfg, seed, test=test, far_ood=far, order=BENCHMARKS[cfg.source]["classes"])
