"""Between a model's rows and what users hold: raw table rows, images, pixel ranges (serving time)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from dl_uncertainty.data.splits import Schema
from dl_uncertainty.data.tables import _apply_cleaning
from dl_uncertainty.errors import UserError


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


def row_shapes(schema: Schema) -> list[tuple[int, ...]]:
    """The shapes one row may be sent in: flat, or nested as the model's input (an image's (C, H, W);
    one channel also as (H, W) or channels last, (H, W, 1), which flatten to the same order)."""
    shapes = [(schema.num_features,), tuple(int(n) for n in schema.feature_shape)]
    if len(shapes[1]) == 3 and shapes[1][0] == 1:
        shapes += [shapes[1][1:], (*shapes[1][1:], 1)]
    return list(dict.fromkeys(shapes))


def check_row_shape(shape: tuple[int, ...], schema: Schema, key: str, rows: int) -> None:
    """Refuse rows nested in a shape this model does not take (``shape``: one row's, as lists)."""
    if shape == () and schema.num_features > 1:
        raise UserError(f"{key!r} holds {rows} single numbers, not rows: this model takes {schema.num_features} "
                        f"values per row, so send one row as [[v1, ..., v{schema.num_features}]]")
    if len(shape) <= 1 or shape in row_shapes(schema):
        return  # flat rows: their length is checked with the columns
    nested = " or ".join(str(s) for s in row_shapes(schema)[1:]) or "nothing"
    raise UserError(f"the rows of {key!r} are nested as {shape}, {_values(int(np.prod(shape)))} each; this model takes "
                    f"{schema.num_features} values per row, flat or nested as {nested}")


def _values(n: int) -> str:
    return f"{n} value" if n == 1 else f"{n} values"


LIMIT_SCALED = 1e6  # how many training standard deviations (or ranges) from the training centre a value may lie


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
            problem = "; ".join(([f"unknown columns {unknown[:5]}"] if unknown else [])
                                + ([f"missing columns {missing[:5]}"] if missing else []))
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
        raise UserError(f"row {row} column {names[col]!r} {what}; every feature must be a finite number"
                        + _number_hint(given))
    if input_range(schema) is not None:
        outside = (values < -PIXEL_TOLERANCE) | (values > 1 + PIXEL_TOLERANCE)
        if outside.any():
            row, col = (int(i) for i in np.argwhere(outside)[0])
            raise UserError(f"row {row} column {names[col]!r} is {float(values[row, col]):g}, but this image model "
                            "takes pixels scaled to [0, 1]; divide 0-255 pixel values by 255")
    with np.errstate(over="ignore", invalid="ignore"):
        x, _ = _apply_cleaning(pd.DataFrame(values, columns=names), schema.cleaning)
    bad = ~np.isfinite(x) | (np.abs(x) > LIMIT_SCALED if "center" in schema.cleaning else False)
    if bad.any():  # finite as given, too large once scaled to float32 (e.g. 1e300), or absurdly far (1e20 pixels)
        row, col = (int(i) for i in np.argwhere(bad)[0])
        far = "" if not np.isfinite(x[row, col]) else (
            f" ({abs(float(x[row, col])):.2g} times the training data's spread from its centre)")
        raise UserError(f"row {row} column {names[col]!r} is {float(values[row, col]):g}, too large to scale{far}; "
                        f"every feature must be a number of the size the training data held (at most "
                        f"{LIMIT_SCALED:g} times its spread from its centre)")
    return x


def _number_hint(given) -> str:
    """A number written with a decimal comma or thousands separators, as text: what to send instead."""
    if not isinstance(given, str) or not re.fullmatch(r"\s*[-+]?\d[\d.,' ]*\s*", given) or "," not in given:
        return ""
    return (f" (send {given.strip()!r} as a JSON number with a decimal point and no thousands separators, "
            "e.g. 1.5 for '1,5' and 1234 for '1,234')")


def to_rows(images: np.ndarray, schema: Schema) -> np.ndarray:
    """The inverse of ``to_images``: raw images to flat, scaled float32 rows."""
    flat = images.reshape(len(images), -1)
    stats = schema.cleaning
    if "center" in stats:
        flat = (flat - np.asarray(stats["center"])) / np.asarray(stats["scale"])
    return flat.astype(np.float32)
