"""Image data: a folder of class sub-folders, a CSV of paths and labels, or a standard benchmark.

Images are decoded with Pillow (in DataLoader worker processes when ``data.workers > 0``),
converted to the configured channels and size, and kept as uint8 pixels. They then become
ordinary flat-row splits (``data.Split``) of pixels in [0, 1] normalised per channel, so the
pipeline's split files, models, MC inference and the MLflow model work on images exactly as on
any other data. Preprocessing holds the images in memory (1 byte per pixel value, then 4 per
split row: CIFAR-10's float32 splits are 0.7 GB); training and evaluation map the split files from
disk, and a training split above ``data.in_memory_max_mb`` streams through a DataLoader
(``training.py``, ``data.stream``).

    python -m dl_uncertainty.images make-shapes data/shapes   # 3 classes of drawn shapes
"""

from __future__ import annotations

import csv
import io
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from .data import Schema, Split, _natural_key, check_ood_classes, read_bytes, split_s3_uri
from .errors import UserError

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")

# ---------------------------------------------------------------- listing files


def _list_folder(root: str) -> list[tuple[str, str]]:
    """(file, class name) for every file in ``root/<class>/``, local or ``s3://bucket/prefix``."""
    if root.startswith("s3://"):
        return _list_s3(root)
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"image folder not found: {root}")
    classes = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root} has no class sub-folders; put each class's images in {root}/<class name>/")
    files = []
    for folder in classes:
        found = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not found:
            raise UserError(f"class folder {folder} has no images")
        files += [(str(f), folder.name) for f in found]
    return files


def _list_s3(uri: str) -> list[tuple[str, str]]:
    from botocore.exceptions import BotoCoreError, ClientError

    from .data import _s3_client

    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/"
    files = []
    try:
        for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                parts = PurePosixPath(item["Key"][len(prefix):]).parts
                if len(parts) >= 2 and not parts[-1].startswith("."):
                    files.append((f"s3://{bucket}/{item['Key']}", parts[0]))
    except (BotoCoreError, ClientError) as err:
        raise UserError(f"cannot list {uri}: {err}") from None
    if not files:
        raise UserError(f"{uri} has no images in class sub-folders (<prefix>/<class name>/<image>)")
    return sorted(files)


def _list_csv(path: str, label_column: str) -> list[tuple[str, str]]:
    """Rows of a CSV with a ``path`` column (relative to the CSV's folder) and a label column."""
    text = read_bytes(path).decode("utf-8-sig", errors="replace")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "path" not in rows[0] or label_column not in rows[0]:
        raise UserError(f"{path} needs a header with columns 'path' and {label_column!r} and at least one row")
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    files = []
    for line, row in enumerate(rows, start=2):
        file, label = (row["path"] or "").strip(), (row[label_column] or "").strip()
        if not file or not label:
            raise UserError(f"{path} line {line}: empty path or {label_column!r}")
        absolute = file.startswith(("/", "s3://"))
        files.append((file if absolute else f"{base}/{file}", label))
    return files


def list_images(cfg: DictConfig) -> list[tuple[str, str]]:
    if str(cfg.path).lower().endswith(".csv"):
        return _list_csv(cfg.path, cfg.label_column)
    return _list_folder(cfg.path)


def check_source(cfg: DictConfig) -> np.ndarray:
    """The labels of an image source without decoding it: files listed (at least two classes; every
    local file's header read and checked by Pillow's verify, sizes compared unless resizing), or
    benchmark files fetched. What a run checks before any task starts."""
    if cfg.source == "image_folder":
        files = list_images(cfg)
        labels = np.array([label for _, label in files])
        _class_names(labels, [str(c) for c in cfg.ood_classes])
        _check_headers([f for f, _ in files if not f.startswith("s3://")], resizing=bool(cfg.image_size))
        return labels
    from .downloads import fetch_all

    for name in (cfg.source, cfg.far_ood):
        if name:
            fetch_all(name, cfg)
    return np.array([], dtype=str)


# ---------------------------------------------------------------- decoding


def _unreadable(path: str, err: Exception) -> UserError:
    why = "" if isinstance(err, UnidentifiedImageError) else f": {err}"  # that one names a BytesIO object
    return UserError(f"{path} is not a readable image (PNG/JPEG){why}")


def _open(raw: bytes, path: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise _unreadable(path, err) from None
    return image


def _check_headers(files: list[str], resizing: bool) -> None:
    """Each file opens as an image and passes ``verify()`` (PNG: every chunk's checksum), without
    decoding pixels; unless ``resizing``, all have the first one's size."""
    first = None
    for path in files:
        try:
            with Image.open(path) as image:
                size = image.size
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise _unreadable(path, err) from None
        first = first or (path, size)
        if not resizing and size != first[1]:
            raise _sizes_differ(first[0], first[1], path, size)


def _sizes_differ(first: str, first_size: tuple[int, int], other: str, size: tuple[int, int]) -> UserError:
    """Sizes as width x height."""
    return UserError(f"images differ in size: {first} is {first_size[0]}x{first_size[1]}, {other} is "
                     f"{size[0]}x{size[1]}; set data.image_size=[H,W] to resize all")


def conform(image: Image.Image, channels: int, size: list[int] | None) -> np.ndarray:
    """A Pillow image as uint8 [C, H, W] with ``channels`` (1 or 3), resized to ``size`` [H, W]."""
    image = image.convert("L" if channels == 1 else "RGB")
    if size:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


class ImageFiles(torch.utils.data.Dataset):
    """Decodes one file per item, lazily, so DataLoader workers can decode in parallel.

    An unreadable file comes back as its error message: an exception raised in a worker would
    reach the user wrapped in the worker's traceback.
    """

    def __init__(self, files: list[str], channels: int, size: list[int] | None):
        self.files, self.channels, self.size = files, channels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray | str:
        try:
            return conform(_open(read_bytes(self.files[i]), self.files[i]), self.channels, self.size)
        except UserError as err:
            return str(err)


def decode_all(files: list[str], cfg: DictConfig) -> np.ndarray:
    """uint8 [N, C, H, W] of every file; an error names a bad file, or two files of different sizes."""
    channels = cfg.channels
    if channels is None:  # the first image decides: grayscale stays one channel
        channels = 1 if _open(read_bytes(files[0]), files[0]).mode in GRAY_MODES else 3
    loader = torch.utils.data.DataLoader(ImageFiles(files, channels, cfg.image_size), batch_size=32,
                                         num_workers=cfg.workers, collate_fn=list)
    images: list[np.ndarray] = []
    for batch in loader:
        for item in batch:
            if isinstance(item, str):
                raise UserError(item)
            if images and item.shape != images[0].shape:
                raise _sizes_differ(files[0], images[0].shape[:0:-1], files[len(images)], item.shape[:0:-1])
            images.append(item)
    return np.stack(images)


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


def _stratified(labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split  # 0.6 s that training never needs

    rows = np.arange(len(labels))
    try:
        return train_test_split(rows, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as err:
        raise UserError(f"cannot make a stratified {what} split: {err}") from None


def _class_names(labels: np.ndarray, ood_names: list[str], order: list[str] | None = None) -> list[str]:
    """The in-distribution classes (``order``, else natural sort): at least two besides the OOD ones."""
    check_ood_classes(labels, ood_names)
    present = set(labels[~np.isin(labels, ood_names)])
    class_names = [c for c in order if c in present] if order else sorted(present, key=_natural_key)
    if len(class_names) < 2:
        found = ", ".join(sorted(set(labels))) or "none"
        raise UserError(f"image data needs at least two classes besides data.ood_classes, found: {found}")
    return class_names


def make_splits(pixels: np.ndarray, labels: np.ndarray, cfg: DictConfig, seed: int,
                test: tuple[np.ndarray, np.ndarray] | None = None,
                far_ood: tuple[np.ndarray, str] | None = None, order: list[str] | None = None) -> dict[str, Split]:
    """uint8 images + string labels -> normalised train/val/test/ood splits.

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
    class_names = _class_names(labels, ood_names, order)
    is_ood = np.isin(labels, ood_names)
    inside = np.flatnonzero(~is_ood & ~is_test)
    if test is None:
        rest, test_part = _stratified(labels[inside], cfg.test_fraction, seed, "test")
        test_rows, inside = inside[test_part], inside[rest]
        val_fraction = cfg.val_fraction / (1 - cfg.test_fraction)
    else:
        test_rows, val_fraction = np.flatnonzero(~is_ood & is_test), cfg.val_fraction
    train_part, val_part = _stratified(labels[inside], val_fraction, seed, "validation")
    parts = {"train": inside[train_part], "val": inside[val_part], "test": test_rows,
             "ood": np.flatnonzero(is_ood)}

    mean, std, how = _normalisation(pixels[parts["train"]], cfg)
    per_pixel = int(np.prod(pixels.shape[2:]))
    center, scale = np.repeat(mean, per_pixel), np.repeat(std, per_pixel)
    shape = list(pixels.shape[1:])
    cleaning = {"scaling": how, "center": center.tolist(), "scale": scale.tolist()}
    source = cfg.source if cfg.source != "image_folder" else f"image_folder {cfg.path}"
    index = {name: i for i, name in enumerate(class_names)}
    far_name = far_ood[1] if far_ood is not None else Schema.far_ood
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



def conform_array(pixels: np.ndarray, channels: int, size: list[int]) -> np.ndarray:
    """uint8 [N, C, H, W] converted to ``channels`` and resized to ``size`` (another dataset as far-OOD)."""
    if pixels.shape[1] == channels and list(pixels.shape[2:]) == list(size):
        return pixels
    out = []
    for image in pixels:
        mode = "L" if image.shape[0] == 1 else "RGB"
        array = image[0] if mode == "L" else image.transpose(1, 2, 0)
        out.append(conform(Image.fromarray(array, mode=mode), channels, size))
    return np.stack(out)


def prepare_images(cfg: DictConfig, seed: int) -> dict[str, Split]:
    """``data.source`` image_folder | mnist | fashion_mnist | cifar10 -> the four splits."""
    if cfg.source == "image_folder":
        files = list_images(cfg)
        pixels = decode_all([f for f, _ in files], cfg)
        return make_splits(pixels, np.array([label for _, label in files]), cfg, seed)
    from .downloads import BENCHMARKS, load_benchmark

    train, test = load_benchmark(cfg.source, cfg)
    far = None
    if cfg.far_ood:
        _, (far_pixels, _) = load_benchmark(cfg.far_ood, cfg)
        far = (conform_array(far_pixels, train[0].shape[1], list(train[0].shape[2:])), cfg.far_ood)
    return make_splits(train[0], train[1], cfg, seed, test=test, far_ood=far, order=BENCHMARKS[cfg.source]["classes"])


# ---------------------------------------------------------------- training-time augmentation


def augment(x: torch.Tensor, shape: list[int], hflip: bool, crop_padding: int,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flips and random crops of zero-padded images, per example, on x's device.

    ``x`` holds flat normalised rows [B, C*H*W]; zero padding is the training mean.
    """
    batch, (channels, height, width) = len(x), shape
    images = x.view(batch, channels, height, width)
    if hflip:
        flip = torch.rand(batch, generator=generator).to(x.device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if crop_padding:
        p = crop_padding
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        dy, dx = (torch.randint(0, 2 * p + 1, (2, batch), generator=generator)).to(x.device)
        rows = (dy[:, None] + torch.arange(height, device=x.device))[:, :, None]
        cols = (dx[:, None] + torch.arange(width, device=x.device))[:, None, :]
        picked = padded[torch.arange(batch, device=x.device)[:, None, None], :, rows, cols]  # [B, H, W, C]
        images = picked.permute(0, 3, 1, 2)
    return images.reshape(batch, -1)


# ---------------------------------------------------------------- a generated data set


def make_shapes(folder: str | Path, per_class: int = 100, size: int = 32, seed: int = 0) -> Path:
    """``folder/{circle,square,triangle}/*.png``: one bright filled shape per image on a dark
    background, random size, place and colours, so a model must learn the outline, not a colour."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for shape in ("circle", "square", "triangle"):
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background = tuple(int(v) for v in rng.integers(0, 90, 3))
            image = Image.new("RGB", (size, size), background)
            draw = ImageDraw.Draw(image)
            radius = rng.uniform(0.25, 0.45) * size
            cx, cy = rng.uniform(radius, size - radius, 2)
            colour = tuple(int(v) for v in rng.integers(140, 256, 3))
            if shape == "circle":
                draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
            elif shape == "square":
                draw.rectangle([cx - radius * 0.8, cy - radius * 0.8, cx + radius * 0.8, cy + radius * 0.8],
                               fill=colour)
            else:
                angle = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
                draw.polygon(list(zip(cx + radius * np.cos(angle), cy + radius * np.sin(angle), strict=True)),
                             fill=colour)
            image.save(folder / shape / f"{shape}_{i:04d}.png")
    return folder


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dl_uncertainty.images", description="Image data helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser("make-shapes", help="write circle/square/triangle PNGs, one folder per class")
    shapes.add_argument("folder")
    shapes.add_argument("--per-class", type=int, default=100)
    shapes.add_argument("--size", type=int, default=32)
    shapes.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = make_shapes(args.folder, args.per_class, args.size, args.seed)
    print(f"{3 * args.per_class} images in {folder}; use them with data=image_folder data.path={folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
