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
from PIL import Image, ImageOps, UnidentifiedImageError

from dl_uncertainty.data.s3 import local_kind, read_bytes, split_s3_uri
from dl_uncertainty.data.stratify import check_splittable, class_names
from dl_uncertainty.errors import UserError

ORIENTATION = 0x0112  # the EXIF tag a camera sets when it stores a photo turned
EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# files a file manager leaves beside images (besides hidden ones): never images, so never listed
NOT_IMAGES = ("thumbs.db", "desktop.ini")
# notes, labels and archives kept beside a class's images: documents, never images, so never listed
DOCUMENTS = (".txt", ".md", ".csv", ".tsv", ".json", ".xml", ".yaml", ".yml", ".html", ".pdf", ".log", ".ini",
             ".py", ".ipynb", ".zip", ".tar", ".gz", ".npz", ".npy")


def _listed(file: Path, folder: Path | None = None) -> bool:
    """A file that may be an image: not hidden (nor in a hidden folder below ``folder``), not a document."""
    hidden = any(part.startswith(".") for part in (file.relative_to(folder).parts if folder else (file.name,)))
    return (file.is_file() and not hidden and file.name.lower() not in NOT_IMAGES
            and file.suffix.lower() not in DOCUMENTS)

# ---------------------------------------------------------------- listing files


def _list_folder(root: str) -> list[tuple[str, str]]:
    """(file, class name) for every file in ``root/<class>/``, local or ``s3://bucket/prefix``."""
    if root.startswith("s3://"):
        return _list_s3(root)
    base = Path(root)
    if local_kind(root) != "folder":
        raise UserError(f"image folder not found: {root}")
    classes = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    if not classes:
        raise UserError(f"{root} has no class sub-folders; put each class's images in {root}/<class name>/")
    _check_distinct(classes)
    files = []
    for folder in classes:
        found = sorted(f for f in folder.rglob("*") if _listed(f, folder))
        if not found:
            raise UserError(f"class folder {folder} has no images")
        files += [(str(f), folder.name) for f in found]
    return files


def _check_distinct(classes: list[Path]) -> None:
    """A class folder that is a link to another class folder (or to a folder inside one) would label
    the same images as two classes."""
    real = {folder: folder.resolve() for folder in classes}
    for link in (folder for folder in classes if folder.is_symlink()):
        for other in classes:
            if other != link and not (other.is_symlink() and other > link) and (
                    real[link] == real[other] or real[other] in real[link].parents):
                raise UserError(f"class folder {link} is a link to {real[link]}, whose images class {other.name!r} already "
                                "holds: they would be in two classes; remove the link, or copy in the images it should hold")


def _list_s3(uri: str) -> list[tuple[str, str]]:
    from botocore.exceptions import BotoCoreError, ClientError

    from dl_uncertainty.data.s3 import _s3_client, s3_error

    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/"
    files = []
    try:
        for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                parts = PurePosixPath(item["Key"][len(prefix):]).parts
                if (len(parts) >= 2 and not any(p.startswith(".") for p in parts) and parts[0] != "__MACOSX"
                        and parts[-1].lower() not in NOT_IMAGES and PurePosixPath(parts[-1]).suffix.lower() not in DOCUMENTS):
                    files.append((f"s3://{bucket}/{item['Key']}", parts[0]))
    except (BotoCoreError, ClientError) as err:
        raise s3_error("list", uri, err) from None
    if not files:
        raise UserError(f"{uri} has no images in class sub-folders (<prefix>/<class name>/<image>)")
    return sorted(files)


def _list_csv(path: str, label_column: str) -> list[tuple[str, str]]:
    """Rows of a CSV with a ``path`` column (relative to the CSV's folder) and a label column."""
    text = read_bytes(path).decode("utf-8-sig", errors="replace")
    separator = max((",", ";", "\t"), key=text.split("\n", 1)[0].count)  # as for tables: what the header holds most
    rows = [{str(k).strip(): v for k, v in row.items()}
            for row in csv.DictReader(io.StringIO(text), delimiter=separator, skipinitialspace=True)]
    if not rows or "path" not in rows[0] or label_column not in rows[0]:
        found = f" (found: {', '.join(list(rows[0])[:10])})" if rows else " (it has no rows)" if text.strip() else \
            " (it is empty)"
        raise UserError(f"{path} needs a header with columns 'path' and {label_column!r} and at least one row{found}; "
                        "set data.label_column if the labels are in another column")
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    files = []
    for line, row in enumerate(rows, start=2):
        file, label = (row["path"] or "").strip(), (row[label_column] or "").strip()
        if not file or not label:
            raise UserError(f"{path} line {line}: empty path or {label_column!r}")
        absolute = file.startswith(("/", "s3://"))
        found = file if absolute else f"{base}/{file}"
        kind = "file" if found.startswith("s3://") else local_kind(found)
        if kind != "file":
            where = "" if absolute else f" (relative paths start at the CSV's folder, {base})"
            what = "is a folder, not an image file" if kind == "folder" else "not found"
            raise UserError(f"{path} line {line}: image {found} {what}{where}; fix the path or remove the row")
        files.append((found, label))
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
        check_memory(len(files), cfg)
        labels = np.array([label for _, label in files])
        ood = [str(c) for c in cfg.ood_classes]
        class_names(labels, ood)
        _check_headers([f for f, _ in files if not f.startswith("s3://")], resizing=bool(cfg.image_size))
        check_splittable(labels[~np.isin(labels, ood)], cfg.val_fraction, cfg.test_fraction)
        return labels
    from dl_uncertainty.data.downloads import fetch_all

    for name in (cfg.source, cfg.far_ood):
        if name:
            fetch_all(name, cfg)
    return np.array([], dtype=str)


def check_memory(count: int, cfg: DictConfig) -> None:
    """Refuse a data.image_size whose pixels (1 byte each, then 4 in the float32 splits) could not fit in
    this machine's memory, before decoding starts and the system kills the process."""
    import os

    if not cfg.image_size:
        return
    need = count * (cfg.channels or 3) * cfg.image_size[0] * cfg.image_size[1] * 5
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise UserError(f"data.image_size={list(cfg.image_size)} for {count} images needs about {need / 2**30:.0f} GiB "
                        f"of memory, more than this machine's {have / 2**30:.0f} GiB; lower data.image_size")


# ---------------------------------------------------------------- decoding


def _unreadable(path: str, err: Exception) -> UserError:
    if "truncated" in str(err).lower():  # Pillow: "Truncated File Read", "image file is truncated (n bytes ...)"
        return UserError(f"{path} is truncated: the file ends before its image does (an interrupted copy or "
                         "download?); copy it again or remove it")
    if isinstance(err, Image.DecompressionBombError):
        return UserError(f"{path} is too large to decode safely ({err}); shrink it or remove it")
    why = "" if isinstance(err, UnidentifiedImageError) else f" ({err})"  # that one names a BytesIO object
    return UserError(f"{path} is not a readable image (PNG/JPEG){why}; remove it or replace it")


def _open(raw: bytes, path: str) -> Image.Image:
    if not raw:
        raise _empty(path)
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
        if image.getexif().get(ORIENTATION, 1) != 1:  # a camera's rotation tag: the image as it is shown
            image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _unreadable(path, err) from None
    return _eight_bit(image, path)


def _empty(path: str) -> UserError:
    return UserError(f"{path} is an empty file (0 bytes); copy it again or remove it")


def _eight_bit(image: Image.Image, path: str) -> Image.Image:
    """A grayscale image of more than 8 bits as 8-bit "L", scaled by its bit depth (Pillow's own
    conversion clips at 255). 16-bit: / 257. 32-bit integer ("I", e.g. a TIFF): values must lie in
    0..65535 and are scaled as 16-bit. Float ("F"): values must lie in [0, 1]."""
    mode = image.mode
    if not (mode.startswith("I") or mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F":
        if not (np.isfinite(values).all() and low >= 0 and high <= 1):
            raise UserError(f"{path} is a floating-point image with values from {low:g} to {high:g}; "
                            "save it with values in [0, 1], or as an 8- or 16-bit PNG")
        scaled = values * 255
    else:
        if low < 0 or high > 65535:
            raise UserError(f"{path} is a 32-bit integer image with values from {low:g} to {high:g}, beyond "
                            "16 bits (0..65535); save it as an 8- or 16-bit PNG")
        scaled = values / 257  # 65535 -> 255: the full 16-bit range onto the full 8-bit range
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _check_headers(files: list[str], resizing: bool) -> None:
    """Each file opens as an image and passes ``verify()`` (PNG: every chunk's checksum), without
    decoding pixels; unless ``resizing``, all have the first one's size. A JPEG is decoded only when
    it does not end with its end-of-image marker: that is how a truncated one looks (verify reads
    only its header)."""
    first = None
    for path in files:
        try:
            if Path(path).stat().st_size == 0:
                raise _empty(path)
            with Image.open(path) as image:
                size, kind = image.size, image.format
                # their EXIF is in the header; a PNG's may follow the pixels (decode_all then compares sizes)
                if kind in EXIF_FORMATS and image.getexif().get(ORIENTATION) in (5, 6, 7, 8):  # shown turned 90 degrees
                    size = size[::-1]
                image.verify()
            if kind == "JPEG" and not _ends_like_jpeg(path):
                with Image.open(path) as image:
                    image.load()
        except FileNotFoundError:
            raise UserError(f"image file not found: {path}") from None
        except PermissionError:
            raise UserError(f"{path} cannot be read (permission denied); make it readable (chmod +r) or remove it") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise _unreadable(path, err) from None
        first = first or (path, size)
        if not resizing and size != first[1]:
            raise _sizes_differ(first[0], first[1], path, size)


def _ends_like_jpeg(path: str) -> bool:
    """The file's last bytes hold the end-of-image marker FF D9 (some cameras pad after it)."""
    with open(path, "rb") as fh:
        fh.seek(max(0, fh.seek(0, 2) - 64))
        return b"\xff\xd9" in fh.read()


def _sizes_differ(first: str, first_size: tuple[int, int], other: str, size: tuple[int, int]) -> UserError:
    """Sizes as width x height."""
    return UserError(f"images differ in size: {first} is {first_size[0]}x{first_size[1]}, {other} is "
                     f"{size[0]}x{size[1]}; set data.image_size=[H,W] to resize all")


def conform(image: Image.Image, channels: int, size: list[int] | None) -> np.ndarray:
    """A Pillow image as uint8 [C, H, W] with ``channels`` (1 or 3), resized to ``size`` [H, W]."""
    if image.mode == "P" and "transparency" in image.info:  # Pillow warns converting it straight: via RGBA, same colours
        image = image.convert("RGBA")
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
