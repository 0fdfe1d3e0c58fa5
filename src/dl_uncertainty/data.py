"""Load, clean and split data; save/load splits as .npz with a JSON schema.

A split's features are stored uncompressed, so ``load_split(..., mmap=True)`` can map them from
disk instead of reading them into memory (training streams a large split; see ``data.stream``).

Sources: scikit-learn's digits, CSV and NPZ files, local or on S3/MinIO (``s3://bucket/key``);
image folders and the standard image benchmarks come from ``images.py``.
Imputation, outlier bounds and scaling are fitted on the training split only.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from .errors import UserError

SPLITS = ("train", "val", "test", "ood")
SCHEMA_VERSION = 1


@dataclass
class Schema:
    """What a split file holds, so a later step can check it was given the right thing."""

    feature_shape: list[int]  # per-example shape, e.g. [64] or [1, 8, 8]
    class_names: list[str]  # in-distribution classes; label i is class_names[i]
    ood_class_names: list[str]  # OOD split labels index into this
    source: str
    cleaning: dict = field(default_factory=dict)  # imputer/clip/scaler statistics and counts
    version: int = SCHEMA_VERSION
    feature_names: list[str] = field(default_factory=list)  # the raw columns, as the user's data names them
    far_ood: str = "uniform noise"  # what the far-OOD inputs are: noise, or another dataset's name

    @property
    def num_features(self) -> int:
        return int(np.prod(self.feature_shape))


@dataclass
class Split:
    x: np.ndarray  # float32 [N, num_features]
    y: np.ndarray  # int64 [N]
    schema: Schema
    far_x: np.ndarray | None = None  # OOD split only: another dataset's inputs, scaled like x


# ---------------------------------------------------------------- reading raw data


def _s3_client():
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return _cached_s3_client(endpoint or None, os.environ.get("AWS_ACCESS_KEY_ID"), os.getpid())


@functools.lru_cache(maxsize=4)
def _cached_s3_client(endpoint: str | None, _key_id: str | None, _pid: int):
    # one client per endpoint, credentials and process (DataLoader workers get their own):
    # making a client costs more than reading one small image
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise UserError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key


def read_bytes(path: str) -> bytes:
    """Bytes of a local file or an ``s3://bucket/key`` object."""
    if path.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3_uri(path)
        try:
            return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as err:
            raise UserError(f"cannot read {path}: {err}") from None
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data file not found: {path}")
    return file.read_bytes()


def upload_file(local: str, uri: str) -> None:
    """Put a local file at ``s3://bucket/key`` (e.g. MinIO's ``datasets`` bucket)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    if not Path(local).is_file():
        raise UserError(f"file not found: {local}")
    bucket, key = split_s3_uri(uri)
    try:
        _s3_client().upload_file(local, bucket, key)
    except (BotoCoreError, ClientError, Boto3Error) as err:
        raise UserError(f"cannot upload {local} to {uri}: {err}") from None


def _decode(raw: bytes, path: str, encoding: str) -> str:
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        if b"\0" in raw[:4096]:
            raise UserError(f"{path} is a binary file, not a CSV") from None
        raise UserError(
            f"{path} is not {encoding} text (byte {err.start}); set data.encoding, e.g. data.encoding=latin-1"
        ) from None
    if "\0" in text[:4096]:
        raise UserError(f"{path} is a binary file, not a CSV (or set data.encoding, e.g. utf-16)")
    return text


SEPARATORS = {"comma": ",", "semicolon": ";", "tab": "\t"}


def _separator(text: str, separator: str | None) -> str:
    """``data.separator``, else whichever of , ; tab the header line holds most of."""
    if separator:
        return SEPARATORS.get(separator, separator)
    header = text.lstrip("\ufeff").split("\n", 1)[0]
    return max((",", ";", "\t"), key=header.count)


def _read_csv(path: str, cfg: DictConfig) -> tuple[pd.DataFrame, pd.Series]:
    text = _decode(read_bytes(path), path, cfg.encoding)
    sep = _separator(text, cfg.separator)
    try:
        header = next(csv.reader(io.StringIO(text), delimiter=sep), [])
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype={cfg.label_column: str})
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty") from None
    except (pd.errors.ParserError, csv.Error) as err:
        raise UserError(f"{path} is not a valid CSV: {str(err).splitlines()[0]}") from None
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise UserError(f"{path} has duplicated column names {duplicated}; rename them")
    if frame.empty:
        raise UserError(f"{path} has a header but no rows")
    label_column = cfg.label_column
    if label_column not in frame.columns:
        raise UserError(
            f"label column {label_column!r} not in {path} (columns found with separator {sep!r}: "
            f"{', '.join(map(str, frame.columns[:10]))}); set data.label_column or data.separator"
        )
    labels = frame.pop(label_column).str.strip()
    blank = labels.isna() | (labels == "")
    if blank.any():
        if cfg.blank_labels == "error":
            raise UserError(
                f"{int(blank.sum())} rows of {path} have a blank {label_column!r} (first on line "
                f"{int(np.flatnonzero(blank)[0]) + 2}); fill them or set data.blank_labels=drop"
            )
        frame, labels = frame[~blank].reset_index(drop=True), labels[~blank].reset_index(drop=True)
    frame.attrs["dropped"] = {"blank_labels": int(blank.sum())}
    bad = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise UserError(f"feature column {bad[0]!r} in {path} is not numeric")
    if frame.shape[1] == 0:
        raise UserError(f"{path} has no feature columns besides {label_column!r}")
    return frame.astype("float64"), labels


def load_raw(cfg: DictConfig) -> tuple[pd.DataFrame, np.ndarray, list[int]]:
    """Features (rows x flat features), labels as strings, and the per-example feature shape.

    Image sources are only checked here (files listed, benchmark files fetched), with no
    features: ``prepare`` decodes them.
    """
    from .config import IMAGE_SOURCES

    if cfg.source in IMAGE_SOURCES:
        from .images import check_source  # torch: not for tables

        labels = check_source(cfg)
        return pd.DataFrame(index=range(len(labels))), labels, []
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        frame = pd.DataFrame(digits.data, columns=[f"pixel_{i}" for i in range(digits.data.shape[1])])
        return frame, digits.target.astype(str), list(cfg.image_shape or [64])
    if cfg.source == "csv":
        frame, labels = _read_csv(cfg.path, cfg)
        return frame, labels.astype(str).to_numpy(), list(cfg.image_shape or [frame.shape[1]])
    try:
        with np.load(io.BytesIO(read_bytes(cfg.path)), allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
    except KeyError as err:
        raise UserError(f"{cfg.path} must contain arrays 'x' and 'y' (missing {err})") from None
    except ValueError as err:
        raise UserError(f"{cfg.path} is not a valid .npz file: {err}") from None
    if len(x) != len(y) or len(x) == 0:
        raise UserError(f"{cfg.path}: x has {len(x)} rows but y has {len(y)}")
    if not np.issubdtype(x.dtype, np.number):
        raise UserError(f"{cfg.path}: x must be numeric, got dtype {x.dtype}")
    if y.ndim != 1:
        raise UserError(f"{cfg.path}: y must hold one label per row, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        blank = np.isnan(y)
    elif y.dtype.kind in "US":
        blank = np.char.strip(y.astype(str)) == ""
    else:
        blank = np.zeros(len(y), dtype=bool)
    if blank.any():  # the same rule as a CSV's blank labels, before NaN can become a class 'nan'
        if cfg.blank_labels == "error":
            raise UserError(
                f"{int(blank.sum())} labels in {cfg.path}'s y are blank (NaN or empty; first at row "
                f"{int(np.flatnonzero(blank)[0])}); fill them or set data.blank_labels=drop"
            )
        x, y = x[~blank], y[~blank]
        if len(y) == 0:
            raise UserError(f"{cfg.path}: every label in y is blank")
    if np.issubdtype(y.dtype, np.floating) and np.all(y % 1 == 0):  # label 2.0 is class '2', not '2.0'
        y = y.astype(np.int64)
    shape = list(x.shape[1:]) if x.ndim != 3 else [1, *x.shape[1:]]
    flat = x.reshape(len(x), -1).astype("float64")
    columns = [f"feature_{i}" for i in range(flat.shape[1])]
    frame = pd.DataFrame(flat, columns=columns)
    frame.attrs["dropped"] = {"blank_labels": int(blank.sum())}
    return frame, y.astype(str), list(cfg.image_shape or shape)


# ---------------------------------------------------------------- cleaning


def _non_finite(frame: pd.DataFrame, labels: np.ndarray, cfg: DictConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """Infinite feature values: an error, dropped rows, or missing values (``data.non_finite``)."""
    inf = np.isinf(frame.to_numpy())
    if not inf.any():
        return frame, labels
    if cfg.non_finite == "error":
        per_column = inf.sum(axis=0)
        raise UserError(
            f"{cfg.path or cfg.source} has {int(inf.sum())} infinite values (column {frame.columns[per_column.argmax()]!r} "
            f"has {int(per_column.max())}); fix the data or set data.non_finite=drop or data.non_finite=as_missing"
        )
    if cfg.non_finite == "drop":
        keep = ~inf.any(axis=1)
        return frame[keep].reset_index(drop=True), labels[keep]
    return frame.mask(inf), labels


def check_ood_classes(labels: np.ndarray, ood_names: list[str]) -> list[str]:
    """``ood_names`` (data.ood_classes as text), each of which must be a label in the data."""
    unknown = sorted(set(ood_names) - set(labels))
    if unknown:
        raise UserError(f"data.ood_classes {unknown} are not labels in the data")
    return ood_names


def check_raw(cfg: DictConfig) -> None:
    """The checks worth making before a pipeline starts tasks, in a second or less: the data can be
    read, infinite values are handled as data.non_finite says, data.ood_classes are labels in it."""
    from .config import IMAGE_SOURCES

    frame, labels, _ = load_raw(cfg)
    if cfg.source not in IMAGE_SOURCES:
        frame, labels = _non_finite(frame, labels, cfg)
        check_ood_classes(labels, [str(c) for c in cfg.ood_classes])


def _fit_cleaning(train: pd.DataFrame, cfg: DictConfig) -> dict:
    stats: dict = {"missing": cfg.missing, "outliers": cfg.outliers, "scaling": cfg.scaling}
    if cfg.missing in ("mean", "median"):
        fill = train.mean() if cfg.missing == "mean" else train.median()
        stats["fill"] = fill.fillna(0.0).tolist()
    if cfg.outliers == "iqr":
        q1, q3 = train.quantile(0.25), train.quantile(0.75)
        k = cfg.outlier_threshold * (q3 - q1)
        stats["clip_low"], stats["clip_high"] = (q1 - k).tolist(), (q3 + k).tolist()
    elif cfg.outliers == "zscore":
        mean, std = train.mean(), train.std(ddof=0)
        k = cfg.outlier_threshold * std
        stats["clip_low"], stats["clip_high"] = (mean - k).tolist(), (mean + k).tolist()
    return stats


def _apply_cleaning(frame: pd.DataFrame, stats: dict) -> tuple[np.ndarray, dict]:
    counts = {"missing_filled": int(frame.isna().sum().sum()), "outliers_clipped": 0}
    if "fill" in stats and counts["missing_filled"]:
        frame = frame.fillna(pd.Series(stats["fill"], index=frame.columns))
    x = frame.to_numpy(dtype="float64")
    if "clip_low" in stats:
        low, high = np.asarray(stats["clip_low"]), np.asarray(stats["clip_high"])
        counts["outliers_clipped"] = int(((x < low) | (x > high)).sum())
        x = np.clip(x, low, high)
    if "center" in stats:
        x = (x - np.asarray(stats["center"])) / np.asarray(stats["scale"])
    return x.astype("float32"), counts


def _fit_scaling(x: np.ndarray, method: str) -> dict:
    if method == "standard":
        center, scale = x.mean(axis=0), x.std(axis=0)
    elif method == "minmax":
        center, scale = x.min(axis=0), x.max(axis=0) - x.min(axis=0)
    elif method == "global":  # one mean/std for every feature: pixels keep their relative scale
        center, scale = np.full(x.shape[1], x.mean()), np.full(x.shape[1], x.std())
    else:
        return {}
    scale = np.where(scale > 1e-12, scale, 1.0)  # constant features (e.g. always-blank pixels)
    return {"center": center.tolist(), "scale": scale.tolist()}


# ---------------------------------------------------------------- splitting


def prepare(cfg: DictConfig, seed: int) -> dict[str, Split]:
    """Raw data -> cleaned, stratified train/val/test splits plus the held-out OOD classes."""
    from .config import IMAGE_SOURCES

    if cfg.source in IMAGE_SOURCES:
        from .images import prepare_images  # torch: not for tables

        return prepare_images(cfg, seed)
    frame, labels, feature_shape = load_raw(cfg)
    dropped = {"blank_labels": 0, "non_finite": 0, "missing": 0, **frame.attrs.get("dropped", {})}
    before = len(frame)
    frame, labels = _non_finite(frame, labels, cfg)
    dropped["non_finite"] = before - len(frame)
    if int(np.prod(feature_shape)) != frame.shape[1]:
        raise UserError(f"data.image_shape={feature_shape} does not match {frame.shape[1]} features")
    if cfg.missing == "drop":
        keep = ~frame.isna().any(axis=1).to_numpy()
        frame, labels = frame[keep].reset_index(drop=True), labels[keep]
        dropped["missing"] = int((~keep).sum())
    elif cfg.missing == "ffill":
        frame = frame.ffill().bfill()
    if len(frame) == 0:
        raise UserError("no rows left after dropping rows with missing values")

    ood_names = check_ood_classes(labels, [str(c) for c in cfg.ood_classes])
    is_ood = np.isin(labels, ood_names)
    class_names = sorted(set(labels[~is_ood]), key=_natural_key)
    if len(class_names) < 2:
        raise UserError("need at least two in-distribution classes after removing data.ood_classes")

    from sklearn.model_selection import train_test_split  # 0.6 s that loading a split never needs

    index = {name: i for i, name in enumerate(class_names)}
    y_in = np.array([index[v] for v in labels[~is_ood]], dtype=np.int64)
    rows = np.flatnonzero(~is_ood)
    try:
        rest, test = train_test_split(
            rows, test_size=cfg.test_fraction, stratify=y_in, random_state=seed
        )
        val_share = cfg.val_fraction / (1 - cfg.test_fraction)
        train, val = train_test_split(
            rest, test_size=val_share, stratify=y_in[np.searchsorted(rows, rest)], random_state=seed
        )
    except ValueError as err:
        raise UserError(f"cannot make a stratified split: {err}") from None

    stats = _fit_cleaning(frame.iloc[train], cfg)
    stats.update(blank_labels=cfg.blank_labels, non_finite=cfg.non_finite,
                 rows_dropped=dropped)  # before splitting: {"blank_labels": n, "non_finite": n, "missing": n}
    x_train, _ = _apply_cleaning(frame.iloc[train], stats)
    stats.update(_fit_scaling(x_train, cfg.scaling))

    ood_index = {name: i for i, name in enumerate(ood_names)}
    parts = {"train": train, "val": val, "test": test, "ood": np.flatnonzero(is_ood)}
    splits = {}
    for name, part in parts.items():
        x, counts = _apply_cleaning(frame.iloc[part], stats)
        if name == "ood":
            y = np.array([ood_index[v] for v in labels[part]], dtype=np.int64)
        else:
            y = y_in[np.searchsorted(rows, part)]
        if not np.isfinite(x).all():
            raise UserError(
                f"the {name} split has {int((~np.isfinite(x)).sum())} non-finite values after cleaning "
                f"(data.missing={cfg.missing}); choose another data.missing or data.scaling"
            )
        schema = Schema(feature_shape, class_names, ood_names, cfg.source, {**stats, **counts},
                        feature_names=[str(c) for c in frame.columns])
        splits[name] = Split(x, y, schema)
    return splits


def dropped_rows_line(schema: Schema) -> str | None:
    """One line saying how many rows the cleaning dropped and why, or None if it dropped none."""
    dropped = schema.cleaning.get("rows_dropped", {})
    why = {"blank_labels": "a blank label", "non_finite": "an infinite value", "missing": "a missing value"}
    parts = [f"{n} with {why[k]} (data.{k}=drop)" for k, n in dropped.items() if n]
    return f"dropped {sum(dropped.values())} rows: {', '.join(parts)}" if parts else None


def _natural_key(name: str):
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def unscaled(x: np.ndarray, schema: Schema) -> np.ndarray:
    """Scaled rows back to the raw value range (what the user's data holds, after clipping)."""
    stats = schema.cleaning
    return x * np.asarray(stats["scale"]) + np.asarray(stats["center"]) if "center" in stats else x


def to_images(x: np.ndarray, schema: Schema) -> np.ndarray | None:
    """Flat rows back to [N, C, H, W] in the raw value range, or None for non-image data."""
    if len(schema.feature_shape) != 3:
        return None
    return unscaled(x, schema).reshape(len(x), *schema.feature_shape)


PIXEL_TOLERANCE = 0.01  # how far outside [0, 1] an image model's input may be (rounding, resampling)


def input_range(schema: Schema) -> list[float] | None:
    """[0, 1] for an image model (its columns are pixels scaled from 0-255 to [0, 1]), else None."""
    return [0.0, 1.0] if str(schema.cleaning.get("scaling", "")).startswith("per-channel mean/std") else None


def raw_to_rows(frame: pd.DataFrame, schema: Schema) -> np.ndarray:
    """New raw inputs (named columns, or rows of values in the training order) through the
    cleaning and scaling fitted on the training split. Bad input: UserError, one sentence."""
    names = schema.feature_names or [str(i) for i in range(schema.num_features)]
    if isinstance(frame.columns, pd.RangeIndex):  # positional values, no column names
        if frame.shape[1] != len(names):
            raise UserError(f"expected {len(names)} values per row, got {frame.shape[1]}")
        frame = frame.set_axis(names, axis=1)
    else:
        columns = [str(c) for c in frame.columns]
        given, known = set(columns), set(names)  # sets: an image has thousands of columns
        if len(given) < len(columns):
            twice = pd.Index(columns)[pd.Index(columns).duplicated()].unique().tolist()
            raise UserError(f"columns {twice[:5]} are given more than once; name each column once")
        missing = [n for n in names if n not in given]
        unknown = [c for c in columns if c not in known]
        if missing or unknown:
            problem = f"missing columns {missing[:5]}" if missing else f"unknown columns {unknown[:5]}"
            raise UserError(f"{problem}: the model takes {len(names)} columns, {names[0]!r} to {names[-1]!r}")
        frame = frame.set_axis(columns, axis=1)[names]
    try:
        values = frame.to_numpy(dtype="float64")
    except (TypeError, ValueError):  # some cell is not a number: find which, below
        values = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype="float64")
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        given = frame.iloc[row, col]
        given = given.item() if isinstance(given, np.generic) else given
        what = "is empty" if given is None else f"is {given!r}"
        raise UserError(f"row {row} column {names[col]!r} {what}; every feature must be a finite number")
    if input_range(schema) is not None:
        outside = (values < -PIXEL_TOLERANCE) | (values > 1 + PIXEL_TOLERANCE)
        if outside.any():
            row, col = (int(i) for i in np.argwhere(outside)[0])
            raise UserError(f"row {row} column {names[col]!r} is {float(values[row, col]):g}, but this image model "
                            "takes pixels scaled to [0, 1]; divide 0-255 pixel values by 255")
    with np.errstate(over="ignore", invalid="ignore"):
        x, _ = _apply_cleaning(pd.DataFrame(values, columns=names), schema.cleaning)
    bad = ~np.isfinite(x)
    if bad.any():  # finite as given, too large once scaled to float32 (e.g. 1e300)
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise UserError(f"row {row} column {names[col]!r} is {float(values[row, col])!r}, too large to scale; "
                        f"every feature must be a number of the size the training data held")
    return x


def to_rows(images: np.ndarray, schema: Schema) -> np.ndarray:
    """The inverse of ``to_images``: raw images to flat, scaled float32 rows."""
    flat = images.reshape(len(images), -1)
    stats = schema.cleaning
    if "center" in stats:
        flat = (flat - np.asarray(stats["center"])) / np.asarray(stats["scale"])
    return flat.astype(np.float32)


# ---------------------------------------------------------------- files


def save_split(split: Split, path: str | Path, shown_as: str | Path | None = None) -> None:
    if not np.isfinite(split.x).all():  # checked here so that no caller can write NaN splits
        raise UserError(f"refusing to write {shown_as or path}: its features hold NaN or infinite values")
    schema = json.dumps(asdict(split.schema))
    far = {} if split.far_x is None else {"far_x": split.far_x}
    with open(path, "wb") as fh:  # np.savez would append ".npz" to a path without it
        np.savez(fh, x=split.x, y=split.y, schema=np.array(schema), **far)  # uncompressed: mappable


def _mapped(path: str | Path, npz, name: str) -> np.ndarray:
    """Member ``name`` of an .npz, memory-mapped read-only if it is stored uncompressed (else read)."""
    info = npz.zip.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:  # a split written compressed by an older version
        return npz[name]
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)  # the local file header: name and extra-field lengths
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        fh.seek(name_len + extra_len, os.SEEK_CUR)
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def load_split(path: str | Path, expect: Schema | None = None, mmap: bool = False) -> Split:
    """Load a split; with ``expect``, check it has the same features and classes. ``mmap``: the
    features stay on disk, memory-mapped (pages are read as rows are used)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            x = _mapped(path, npz, "x") if mmap else npz["x"]
            y, schema = npz["y"], Schema(**json.loads(str(npz["schema"])))
            far_x = npz["far_x"] if "far_x" in npz.files else None
    except FileNotFoundError:
        raise UserError(f"dataset file not found: {path}") from None
    except (KeyError, ValueError, TypeError, OSError, EOFError, struct.error) as err:
        raise UserError(f"{path} is not a dataset written by dl_uncertainty ({err})") from None
    if schema.version != SCHEMA_VERSION or x.ndim != 2 or x.shape[1] != schema.num_features:
        raise UserError(f"{path}: features {x.shape} do not match its schema {schema.feature_shape}")
    if expect is not None and (
        schema.feature_shape != expect.feature_shape or schema.class_names != expect.class_names
    ):
        raise UserError(
            f"{path} has features {schema.feature_shape} and classes {schema.class_names}, "
            f"expected {expect.feature_shape} and {expect.class_names}"
        )
    return Split(x, y, schema, far_x)


def save_splits(splits: dict[str, Split], folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    paths = {name: folder / f"{name}.npz" for name in splits}
    temps = {name: folder / f".{name}.npz.partial" for name in splits}
    try:  # all or nothing: no split file unless every split was written
        folder.mkdir(parents=True, exist_ok=True)
        for name, split in splits.items():
            save_split(split, temps[name], shown_as=paths[name])
        for name in splits:
            os.replace(temps[name], paths[name])
    except OSError as err:
        raise UserError(f"cannot write the splits to {folder}: {err.strerror or err}") from None
    finally:
        for temp in temps.values():
            if temp.is_file():
                temp.unlink()
    return paths


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m dl_uncertainty.data upload table.csv s3://datasets/table.csv``"""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m dl_uncertainty.data", description="Dataset helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    upload = sub.add_parser("upload", help="put a CSV/NPZ file at s3://bucket/key (e.g. MinIO's datasets bucket)",
                            description="Endpoint from AWS_ENDPOINT_URL (or MLFLOW_S3_ENDPOINT_URL), "
                                        "credentials from the standard AWS variables.")
    upload.add_argument("file", help="local .csv or .npz file")
    upload.add_argument("uri", help="destination, s3://bucket/key")
    args = parser.parse_args(argv)
    try:
        if Path(args.file).suffix.lower() not in (".csv", ".npz"):
            raise UserError(f"{args.file}: only .csv and .npz files can be used as data_source")
        upload_file(args.file, args.uri)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"uploaded {args.file} -> {args.uri}; use it with data_source={args.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
