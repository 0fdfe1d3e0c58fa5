"""A served model's request body: MLflow's JSON formats (gzip- or deflate-compressed, or not) as a
DataFrame of raw rows, or a one-sentence UserError saying what to send instead."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd

from dl_uncertainty.errors import UserError

INPUT_KEYS = ("dataframe_split", "dataframe_records", "inputs", "instances")
MAX_INT_DIGITS = 300  # a longer integer is past float64's range (1.8e308) or close to it
MAX_UNPACKED = 256 << 20  # bytes a gzip body may unpack to (a few bytes can unpack to gigabytes)
MAX_BODY = MAX_UNPACKED  # bytes a body may hold as sent, compressed or not
MAX_ROWS = 10_000  # per request, by default: bounds one request's memory (its T x rows x classes samples)


def _number(text: str) -> int | float:
    """A JSON integer; one too long for a float is refused here (Python's int() also stops at 4300 digits)."""
    if len(text) > MAX_INT_DIGITS:
        raise UserError(f"a number in the body has {len(text.lstrip('-'))} digits; every feature must be a finite "
                        "64-bit float")
    return int(text)


class TooLarge(UserError):
    """A request with more rows than the server takes: a 413."""


def decoded(body: bytes, encoding: str | None) -> bytes:
    """The body as sent before its Content-Encoding (gzip or deflate), unpacked to at most MAX_UNPACKED bytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity" or not body:
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise UserError(f"Content-Encoding: {encoding} is not read; send the body uncompressed or with gzip")
    out, rest = bytearray(), body
    while True:  # one member after another: concatenated gzip files are one gzip stream
        unpack = zlib.decompressobj(wbits=47)  # gzip or zlib header, told apart by its first bytes
        try:
            out += unpack.decompress(rest, MAX_UNPACKED + 1 - len(out))  # >= 1: 0 would mean no limit
        except zlib.error:
            raise UserError(f"the body is not {encoding} data, as its Content-Encoding says") from None
        if len(out) > MAX_UNPACKED:
            raise TooLarge(f"the {encoding} body unpacks to more than {MAX_UNPACKED >> 20} MiB; send fewer rows "
                           "per request")
        if not unpack.eof:
            raise UserError(f"the {encoding} body is cut short: it ends before its compressed data does")
        rest = unpack.unused_data
        if not rest:
            return bytes(out)


def parse(body: bytes, content_type: str | None = None, max_rows: int = MAX_ROWS, schema=None) -> pd.DataFrame:
    """A request body in one of MLflow's JSON formats as a DataFrame (columns named or positional);
    with the model's ``schema``, rows nested as lists must have its input's shape."""
    example = 'send {"dataframe_split": {"columns": [...], "data": [[...]]}}'
    if not body.strip():
        raise UserError(f"the body is empty; {example}")
    try:
        payload = json.loads(body, parse_int=_number)
    except RecursionError:
        raise UserError("the request is nested too deeply to be a table of rows") from None
    except (ValueError, UnicodeDecodeError):
        if body[:2] == b"\x1f\x8b":  # gzip's magic number
            raise UserError("the body is gzip-compressed but says no Content-Encoding; send it with "
                            "Content-Encoding: gzip") from None
        given = f" (Content-Type: {content_type})" if content_type and "json" not in content_type else ""
        raise UserError(f"the body is not JSON{given}; {example}") from None
    if not isinstance(payload, dict) or not any(k in payload for k in INPUT_KEYS):
        raise UserError(f"the JSON body needs one of the keys {', '.join(INPUT_KEYS)}")
    keys = [k for k in INPUT_KEYS if k in payload]
    if len(keys) > 1:
        raise UserError(f"the JSON body has the keys {', '.join(keys)}; send the rows under one of them")
    key = keys[0]
    extra = [k for k in payload if k != key]
    if extra:
        raise UserError(f"unknown keys {extra[:5]} next to {key!r}; the body holds {key!r} only")
    value = payload[key]
    if isinstance(value, list | dict) and len(value) == 0:
        raise UserError(f"{key!r} holds no rows")
    try:
        frame = _frame(key, value, schema)
    except RecursionError:
        raise UserError("the request is nested too deeply to be a table of rows") from None
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
        raise UserError(f"{key!r} is not a table of rows: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if len(frame) == 0:
        raise UserError(f"{key!r} holds no rows")
    if len(frame) > max_rows:
        raise TooLarge(f"the request has {len(frame)} rows; this server takes at most {max_rows} per request "
                       "(--max-rows): send them in smaller batches")
    return frame


def _frame(key: str, value, schema=None) -> pd.DataFrame:
    if key == "dataframe_split":
        if not isinstance(value, dict) or "data" not in value:
            raise UserError('\'dataframe_split\' needs {"columns": [...], "data": [[...]]}')
        if value["data"] is not None and not isinstance(value["data"], list):
            raise UserError("'dataframe_split' data must be a list of rows")
        if value.get("columns") is not None and not isinstance(value["columns"], list):
            raise UserError("'dataframe_split' columns must be a list of column names")
        return pd.DataFrame(value["data"], columns=value.get("columns"))
    if key == "dataframe_records" or (isinstance(value, list) and value and isinstance(value[0], dict)):
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            raise UserError(f"{key!r} must be a list of records, one {{column: value}} object per row")
        return pd.DataFrame.from_records(value)
    if isinstance(value, dict):  # {"column": [values, ...], ...}
        if not all(isinstance(v, list) for v in value.values()):
            raise UserError(f"{key!r} as an object needs a list of values per column")
        return pd.DataFrame(value)
    if not isinstance(value, list):
        raise UserError(f"{key!r} must be a list of rows")
    try:
        shapes = {np.shape(row) for row in value}
    except ValueError:  # ragged or too deep: not one number per cell
        raise UserError(f"the rows of {key!r} must be lists of numbers (an image's may be nested lists of one "
                        "shape)") from None
    if schema is not None:
        from dl_uncertainty.data.rows import check_row_shape

        for shape in shapes:
            check_row_shape(shape, schema, key, len(value))
    lengths = {int(np.prod(shape)) for shape in shapes}
    if schema is not None and len(lengths) == 1 and lengths != {schema.num_features}:  # before a frame that wide
        raise UserError(f"expected {schema.num_features} values per row, got {lengths.pop()}")
    if len(lengths) > 1:
        raise UserError(f"the rows of {key!r} have different lengths ({min(lengths)} to {max(lengths)} values)")
    from dl_uncertainty.tracking.runs import (
        as_frame,  # here: mlflow is loaded by then, and --help stays fast
    )

    return as_frame(value)


def check_cells(frame: pd.DataFrame, names: list[str]) -> None:
    """Refuse cells that pandas would silently turn into numbers (true -> 1) or that are not one value."""
    def name(col: int) -> str:
        return str(frame.columns[col]) if not isinstance(frame.columns, pd.RangeIndex) else (
            names[col] if col < len(names) else str(col))

    suspect = [col for col, dtype in enumerate(frame.dtypes) if dtype.kind in ("b", "O")]
    for col in suspect:  # a numeric column holds numbers only: reading each column costs ~20 us
        series = frame.iloc[:, col]
        if series.dtype == bool:
            raise UserError(f"row 0 column {name(col)!r} is {str(bool(series.iloc[0])).lower()}, a boolean; "
                            "every feature must be a number")
        for row, cell in enumerate(series.array):
            if isinstance(cell, bool | np.bool_):
                raise UserError(f"row {row} column {name(col)!r} is {str(bool(cell)).lower()}, a boolean; "
                                "every feature must be a number")
            if isinstance(cell, list | dict | tuple):
                raise UserError(f"row {row} column {name(col)!r} holds {'a list' if not isinstance(cell, dict) else 'an object'}, "
                                "not one number; send one value per column")
