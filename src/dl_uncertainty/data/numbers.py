"""Numbers written as text: decimal commas and thousands separators, and what to say when a feature
column holds something that is not a number."""

from __future__ import annotations

import re

import pandas as pd

from dl_uncertainty.errors import UserError

# data.decimal / data.thousands by name: a bare comma cannot be written in a Hydra override
MARKS = {"comma": ",", "point": ".", "space": " ", "apostrophe": "'", "underscore": "_"}

_THOUSANDS = {  # mark -> a number grouped in threes by it (an optional decimal part after the other mark)
    ",": r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?",
    " ": r"[+-]?\d{1,3}( \d{3})+([.,]\d+)?",
    "'": r"[+-]?\d{1,3}('\d{3})+([.,]\d+)?",
}
_DECIMAL_COMMA = r"[+-]?\d*,\d+([eE][+-]?\d+)?"
_EUROPEAN = r"[+-]?(\d{1,3}(\.\d{3})+(,\d*)?|\d*,\d+)"
_NAMES = {",": "comma", ".": "point", " ": "space", "'": "apostrophe"}


def mark(value: str | None) -> str | None:
    """A data.decimal / data.thousands value as the character itself."""
    return None if value is None else MARKS.get(value, value)


def _all_match(pattern: str, values: list[str]) -> bool:
    return all(re.fullmatch(pattern, v) for v in values)


def _hint(values: list[str], decimal: str, thousands: str | None) -> str:
    """What the text values suggest the user sets, or how to fix the column."""
    grouped = [m for m, pattern in _THOUSANDS.items() if m not in (decimal, ".") and _all_match(pattern, values)]
    decimal_comma = decimal != "," and _all_match(_DECIMAL_COMMA, values)
    european = decimal != "," and _all_match(_EUROPEAN, values) and any("." in v for v in values)
    if "," in grouped and decimal_comma:  # 1,234: a thousand, or one and a bit
        return ("they look like numbers with a thousands separator (data.thousands=comma) or a decimal comma "
                "(data.decimal=comma): set the one the file uses")
    if european:
        return "they look like numbers with a decimal comma and points between thousands (1.234,5): set " \
               "data.decimal=comma data.thousands=point"
    if grouped and thousands is None:
        return f"they look like numbers with a thousands separator: set data.thousands={_NAMES[grouped[0]]}"
    if decimal_comma:
        return "they look like numbers with a decimal comma: set data.decimal=comma"
    return ("every feature column must hold numbers: remove or encode text columns, or set data.label_column "
            "if this is the label")


def not_numeric(frame: pd.DataFrame, column: str, path: str, decimal: str, thousands: str | None,
                first_line: int = 2) -> UserError:
    """The error for a feature column that did not parse as numbers: the first offending value, its
    line in the file, how many there are, and the setting (or fix) that would read them."""
    values = frame[column]
    text = values.astype("string").str.strip()
    bad = values.notna() & pd.to_numeric(values, errors="coerce").isna() & (text != "")
    rows = bad[bad].index
    if len(rows) == 0:  # e.g. mixed types pandas kept as objects but every value converts
        return UserError(f"feature column {column!r} in {path} is not numeric; every feature column must hold numbers")
    first, sample = rows[0], [str(v) for v in text[rows[:200]]]
    return UserError(f"feature column {column!r} in {path} is not numeric: "
                     f"{'line' if first_line else 'row'} {int(first) + first_line} holds "
                     f"{str(text[first])!r} ({len(rows)} such value{'s' if len(rows) > 1 else ''}); {_hint(sample, decimal, thousands)}")
