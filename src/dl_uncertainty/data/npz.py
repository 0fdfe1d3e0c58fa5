"""A NumPy ``.npz`` archive of features ``x`` and labels ``y`` as a table of rows, checked on the way."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from dl_uncertainty.data.s3 import read_bytes
from dl_uncertainty.errors import UserError

SAVE = "save it with np.savez(path, x=features, y=labels)"


def _arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        loaded = np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a NumPy .npz archive ({why}); {SAVE}") from None
    if isinstance(loaded, np.ndarray):
        raise UserError(f"{path} holds one array (an .npy file), not an .npz archive of x and y; {SAVE}")
    with loaded as npz:
        missing = [key for key in ("x", "y") if key not in npz.files]
        if missing:
            held = ", ".join(repr(k) for k in npz.files) or "none"
            raise UserError(f"{path} holds the arrays {held} but needs 'x' (features, one row per example) and "
                            f"'y' (labels); {' and '.join(repr(k) for k in missing)} missing: {SAVE}")
        arrays = []
        for key in ("x", "y"):
            try:
                arrays.append(npz[key])
            except ValueError:  # an object array: loading it would run pickled code
                raise UserError(f"{path}'s {key!r} is an array of Python objects, which is not loaded (unpickling "
                                f"can run code); save {'numbers' if key == 'x' else 'numbers or strings'} "
                                f"instead, e.g. np.asarray({key}, dtype={'float' if key == 'x' else 'str'})") from None
            except (OSError, EOFError, zipfile.BadZipFile) as err:
                raise UserError(f"{path}'s {key!r} cannot be read ({err}); {SAVE}") from None
    return arrays[0], arrays[1]


def _check(path: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim == 0 or y.ndim == 0:
        raise UserError(f"{path}: x and y must be arrays with one entry per example, got shapes {x.shape} and {y.shape}")
    if y.ndim != 1:
        one_hot = " (one-hot? save y.argmax(axis=1))" if y.ndim == 2 and y.shape[0] == len(x) else ""
        raise UserError(f"{path}: y must hold one label per row, got shape {y.shape}{one_hot}")
    if len(x) == 0:
        raise UserError(f"{path} holds no examples (x has shape {x.shape})")
    if len(x) != len(y):
        raise UserError(f"{path}: x has {len(x)} rows but y has {len(y)}; they must have one row per example each")
    if x.dtype.kind not in "biuf":
        raise UserError(f"{path}: x must hold real numbers, got dtype {x.dtype}; {SAVE} with numbers as features")
    if x.size == 0:
        raise UserError(f"{path}: x has shape {x.shape}, no features per example")
    if y.dtype.kind not in "biufUS":
        raise UserError(f"{path}: y must hold numbers or strings as labels, got dtype {y.dtype}")


def read_npz(cfg: DictConfig) -> tuple[pd.DataFrame, np.ndarray, list[int]]:
    """Features (rows x flat features), labels as strings, and the per-example feature shape."""
    x, y = _arrays(cfg.path)
    _check(cfg.path, x, y)
    if x.ndim == 1:  # one value per example: one feature
        x = x[:, None]
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
    if x.ndim == 4 and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3) and not cfg.image_shape:
        x = x.transpose(0, 3, 1, 2)  # channels last (N, H, W, C), as Pillow, TensorFlow and Keras save images
    shape = list(x.shape[1:]) if x.ndim != 3 else [1, *x.shape[1:]]
    flat = x.reshape(len(x), -1).astype("float64")
    frame = pd.DataFrame(flat, columns=[f"feature_{i}" for i in range(flat.shape[1])])
    frame.attrs["dropped"] = {"blank_labels": int(blank.sum())}
    return frame, y.astype(str), list(cfg.image_shape or shape)
