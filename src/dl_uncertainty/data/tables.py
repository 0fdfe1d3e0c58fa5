"""Load, clean and split data; save/load splits as .npz with a JSON schema.

A split's features are stored uncompressed, so ``load_split(..., mmap=True)`` can map them from
disk instead of reading them into memory (training streams a large split; see ``data.stream``).

Sources: scikit-learn's digits, CSV and NPZ files, local or on S3/MinIO (``s3://bucket/key``);
image folders and the standard image benchmarks come from ``images.py``.
Imputation, outlier bounds and scaling are fitted on the training split only.
"""

from __future__ import annotations

import codecs
import csv
import io

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from dl_uncertainty.data.numbers import mark, not_numeric
from dl_uncertainty.data.packed import unpacked
from dl_uncertainty.data.s3 import read_bytes
from dl_uncertainty.data.splits import Schema, Split
from dl_uncertainty.data.stratify import (
    check_splittable,
    class_names,
    stratified_parts,
    warn_missing_classes,
)
from dl_uncertainty.errors import UserError


def _decode(raw: bytes, path: str, encoding: str) -> str:
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-16"  # its byte order mark says so (spreadsheets' "Unicode text")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        if b"\0" in raw[:4096]:
            raise UserError(f"{path} is a binary file, not a CSV (or set data.encoding, e.g. utf-16)") from None
        raise UserError(
            f"{path} is not {encoding} text (byte {err.start}); set data.encoding, e.g. data.encoding=latin-1"
        ) from None
    if "\0" in text[:4096]:
        raise UserError(f"{path} is a binary file, not a CSV (or set data.encoding, e.g. utf-16)")
    if "\r" in text and "\n" not in text:  # old Mac line ends: CR alone
        text = text.replace("\r", "\n")
    return text


SEPARATORS = {"comma": ",", "semicolon": ";", "tab": "\t"}


def _separator(text: str, separator: str | None) -> str:
    """``data.separator``, else whichever of , ; tab the header line holds most of."""
    if separator:
        return SEPARATORS.get(separator, separator)
    header = text.lstrip("\ufeff").split("\n", 1)[0]
    return max((",", ";", "\t"), key=header.count)


def _read_parquet(raw: bytes, path: str, label_column: str) -> tuple[pd.DataFrame, pd.Series]:
    """A Parquet table: its label column as text (whole numbers without a ".0"), NaN kept as missing."""
    try:
        frame = pd.read_parquet(io.BytesIO(raw))
    except Exception as err:  # pyarrow's errors share no base class but Exception
        raise UserError(f"{path} is not a readable Parquet file ({str(err).splitlines()[0][:200]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise UserError(f"{path} has columns but no rows" if len(frame.columns) else f"{path} is empty")
    if label_column not in frame.columns:
        raise UserError(f"label column {label_column!r} not in {path} (columns: "
                        f"{', '.join(map(str, frame.columns[:10]))}); set data.label_column")
    labels = frame.pop(label_column)
    if pd.api.types.is_float_dtype(labels) and bool((labels.dropna() % 1 == 0).all()):
        labels = labels.astype("Int64")
    text = labels.astype("string").astype(object)
    return frame, text.where(labels.notna(), None)


def _read_csv(path: str, cfg: DictConfig) -> tuple[pd.DataFrame, pd.Series]:
    raw = unpacked(read_bytes(path), path)
    if raw.startswith(b"PAR1"):  # Parquet's magic number: a table in columns, read as one
        frame, labels = _read_parquet(raw, path, cfg.label_column)
        return _checked_table(frame, labels, path, cfg, mark(cfg.decimal), mark(cfg.thousands), first_line=0)
    text = _decode(raw, path, cfg.encoding)
    sep = _separator(text, cfg.separator)
    decimal, thousands = mark(cfg.decimal), mark(cfg.thousands)
    try:
        # spaces around names and values are not part of them: "a, b, label" is a common header
        names = [c.lstrip(" ") for c in next(csv.reader(io.StringIO(text), delimiter=sep), [])]
        label = next((c for c in names if c.strip() == cfg.label_column), cfg.label_column)
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype={label: str}, decimal=decimal, thousands=thousands,
                            skipinitialspace=True)
        frame.columns = [c.strip() if isinstance(c, str) else c for c in frame.columns]
        header = [c.strip() for c in names]
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty") from None
    except (pd.errors.ParserError, csv.Error) as err:
        hint = ("; a value holding the separator (1,5 or 1,234 in a comma-separated file) must be quoted, or set "
                "data.separator to the file's own") if "Expected" in str(err) else ""
        raise UserError(f"{path} is not a valid CSV: {str(err).strip().splitlines()[0]}{hint}") from None
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
    return _checked_table(frame, frame.pop(label_column), path, cfg, decimal, thousands)


def _checked_table(frame: pd.DataFrame, labels: pd.Series, path: str, cfg: DictConfig, decimal: str,
                   thousands: str | None, first_line: int = 2) -> tuple[pd.DataFrame, pd.Series]:
    """Rows without a label (an error or dropped), then every feature column must be numeric. Rows are
    named by their line in a CSV (``first_line`` 2: after the header), else by their row number."""
    label_column = cfg.label_column
    labels = labels.str.strip()
    blank = labels.isna() | (labels == "")
    if blank.any():
        if cfg.blank_labels == "error":
            raise UserError(
                f"{int(blank.sum())} rows of {path} have a blank {label_column!r} (first on "
                f"{'line' if first_line else 'row'} {int(np.flatnonzero(blank)[0]) + first_line}); fill them or set "
                "data.blank_labels=drop"
            )
        frame, labels = frame[~blank], labels[~blank]  # the index keeps each row's line for the errors below
    bad = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise not_numeric(frame, bad[0], path, decimal, thousands, first_line)
    if frame.shape[1] == 0:
        raise UserError(f"{path} has no feature columns besides {label_column!r}")
    frame, labels = frame.reset_index(drop=True).astype("float64"), labels.reset_index(drop=True)
    frame.attrs["dropped"] = {"blank_labels": int(blank.sum())}
    return frame, _same_number_same_class(labels)


def _same_number_same_class(labels: pd.Series) -> pd.Series:
    """Numeric labels written two ways ("1" and "1.0") as one class, written as an NPZ's would be."""
    numbers = pd.to_numeric(labels, errors="coerce")
    if numbers.isna().any() or labels.nunique() == numbers.nunique():
        return labels
    whole = bool((numbers % 1 == 0).all())
    return numbers.map(lambda v: str(int(v)) if whole else str(float(v)))


FLOAT32_MAX = 3.4e38


def _check_columns(frame: pd.DataFrame, where: str) -> None:
    """Columns that hold no value at all, or values too large for float32 features."""
    empty = [str(c) for c in frame.columns[frame.isna().all().to_numpy()]]
    if empty:
        one = len(empty) == 1
        raise UserError(f"column{'' if one else 's'} {empty[:5]} of {where} {'is' if one else 'are'} empty (or NaN) "
                        f"in every row; remove {'it' if one else 'them'}"
                        + (" (a separator at the end of every line makes such a column)" if where.endswith(".csv") else ""))
    with np.errstate(invalid="ignore"):
        biggest = frame.abs().max()
    if (biggest > FLOAT32_MAX).any():
        column = biggest.idxmax()
        raise UserError(f"column {str(column)!r} of {where} holds {float(biggest[column]):g}, beyond what float32 "
                        f"features hold (about {FLOAT32_MAX:g}); rescale it")


def load_raw(cfg: DictConfig) -> tuple[pd.DataFrame, np.ndarray, list[int]]:
    """Features (rows x flat features), labels as strings, and the per-example feature shape.

    Image sources are only checked here (files listed, benchmark files fetched), with no
    features: ``prepare`` decodes them.
    """
    from dl_uncertainty.config.schema import IMAGE_SOURCES

    if cfg.source in IMAGE_SOURCES:
        from dl_uncertainty.data.images import check_source  # torch: not for tables

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
    from dl_uncertainty.data.npz import read_npz

    return read_npz(cfg)


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




def check_raw(cfg: DictConfig) -> None:
    """The checks worth making before a pipeline starts tasks, in a second or less: the data can be
    read, infinite values are handled as data.non_finite says, data.ood_classes are labels in it and
    leave two classes or more, and the first stratified split can be made."""
    from dl_uncertainty.config.schema import IMAGE_SOURCES

    frame, labels, _ = load_raw(cfg)
    if cfg.source not in IMAGE_SOURCES:
        frame, labels = _non_finite(frame, labels, cfg)
        _check_columns(frame, cfg.path or cfg.source)
    if len(labels):  # a benchmark's labels come with its files, in the task
        ood = [str(c) for c in cfg.ood_classes]
        class_names(labels, ood)
        check_splittable(labels[~np.isin(labels, ood)], cfg.val_fraction, cfg.test_fraction)


def _fit_cleaning(train: pd.DataFrame, cfg: DictConfig) -> dict:
    stats: dict = {"missing": cfg.missing, "outliers": cfg.outliers, "scaling": cfg.scaling}
    if cfg.missing in ("mean", "median"):
        fill = train.mean() if cfg.missing == "mean" else train.median()
        stats["fill"] = fill.fillna(0.0).tolist()
    if cfg.outliers == "iqr":
        q1, q3 = train.quantile(0.25), train.quantile(0.75)
        k = cfg.outlier_threshold * (q3 - q1)
        stats["clip_low"], stats["clip_high"] = (q1 - k).fillna(-np.inf).tolist(), (q3 + k).fillna(np.inf).tolist()
    elif cfg.outliers == "zscore":
        mean, std = train.mean(), train.std(ddof=0)
        k = cfg.outlier_threshold * std
        stats["clip_low"], stats["clip_high"] = (mean - k).fillna(-np.inf).tolist(), (mean + k).fillna(np.inf).tolist()
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


def fit_scaling(x: np.ndarray, method: str) -> dict:
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
    """Raw data -> cleaned, stratified, disjoint train/val/calib/test splits plus the held-out OOD classes."""
    from dl_uncertainty.config.schema import IMAGE_SOURCES

    if cfg.source in IMAGE_SOURCES:
        from dl_uncertainty.data.image_splits import prepare_images  # torch: not for tables

        return prepare_images(cfg, seed)
    frame, labels, feature_shape = load_raw(cfg)
    dropped = {"blank_labels": 0, "non_finite": 0, "missing": 0, **frame.attrs.get("dropped", {})}
    before = len(frame)
    frame, labels = _non_finite(frame, labels, cfg)
    dropped["non_finite"] = before - len(frame)
    _check_columns(frame, cfg.path or cfg.source)
    if int(np.prod(feature_shape)) != frame.shape[1]:
        raise UserError(f"data.image_shape={feature_shape} does not match {frame.shape[1]} features")
    if cfg.missing == "drop":
        keep = ~frame.isna().any(axis=1).to_numpy()
        frame, labels = frame[keep].reset_index(drop=True), labels[keep]
        dropped["missing"] = int((~keep).sum())
    elif cfg.missing == "ffill":
        frame = frame.ffill().bfill()
    if len(frame) == 0:
        raise UserError(f"every row of {cfg.path or cfg.source} has a missing value, so data.missing=drop leaves "
                        "none; fill the gaps, or set data.missing=median (or mean, ffill)")

    ood_names = [str(c) for c in cfg.ood_classes]
    names = class_names(labels, ood_names)
    is_ood = np.isin(labels, ood_names)

    index = {name: i for i, name in enumerate(names)}
    y_in = np.array([index[v] for v in labels[~is_ood]], dtype=np.int64)
    rows = np.flatnonzero(~is_ood)
    positions = stratified_parts(y_in, cfg, seed, names=names)
    warn_missing_classes(names, {part: y_in[positions[part]] for part in ("train", "val", "test")},
                         cfg.val_fraction, cfg.test_fraction)
    train = rows[positions["train"]]

    stats = _fit_cleaning(frame.iloc[train], cfg)
    stats.update(blank_labels=cfg.blank_labels, non_finite=cfg.non_finite,
                 rows_dropped=dropped)  # before splitting: {"blank_labels": n, "non_finite": n, "missing": n}
    x_train, _ = _apply_cleaning(frame.iloc[train], stats)
    stats.update(fit_scaling(x_train, cfg.scaling))

    ood_index = {name: i for i, name in enumerate(ood_names)}
    parts = {**{name: rows[positions[name]] for name in ("train", "val", "calib", "test")},
             "ood": np.flatnonzero(is_ood)}
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
        schema = Schema(feature_shape, names, ood_names, cfg.source, {**stats, **counts},
                        feature_names=[str(c) for c in frame.columns])
        splits[name] = Split(x, y, schema)
    return splits
