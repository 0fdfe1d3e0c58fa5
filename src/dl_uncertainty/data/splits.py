"""A split on disk: ``.npz`` features and labels plus a JSON schema; class names and their order."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dl_uncertainty.errors import UserError

SPLITS = ("train", "val", "calib", "test", "ood")
# what each in-distribution split is for (the data report and the README say the same)
ROLES = {
    "train": "fitting the weights",
    "val": "early stopping and model selection (the winner and the champion gate)",
    "calib": "temperature, conformal thresholds and the abstain threshold",
    "test": "reporting only: never used to choose",
}
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

