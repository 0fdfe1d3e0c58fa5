"""Classes and stratified splits: which classes a run has, the train/val/test split by class, and
what to say when the data are too small or too unbalanced for it.

A class with a single row where a split is made cannot be stratified: its row stays on the larger
side (train), and the run warns that validation and test hold none of it. That is a warning, not an
error: the model still learns the class, only its evaluation is missing, and a long tail of rare
classes is legitimate data. What is an error: fewer than two classes, every label occurring once
(usually the wrong label column), and a split too small to hold one row of each class.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from dl_uncertainty.data.splits import _natural_key
from dl_uncertainty.errors import UserError


def check_ood_classes(labels: np.ndarray, ood_names: list[str]) -> list[str]:
    """``ood_names`` (data.ood_classes as text), each of which must be a label in the data."""
    unknown = sorted(set(ood_names) - set(labels))
    if unknown:
        raise UserError(f"data.ood_classes {unknown} are not labels in the data")
    return ood_names


def _counted(labels: np.ndarray, limit: int = 6) -> str:
    names, counts = np.unique(labels, return_counts=True)
    order = sorted(range(len(names)), key=lambda i: _natural_key(str(names[i])))
    shown = [f"{names[i]} ({counts[i]} rows)" for i in order[:limit]]
    return ", ".join(shown + ([f"and {len(names) - limit} more"] if len(names) > limit else [])) or "none"


def class_names(labels: np.ndarray, ood_names: list[str], order: list[str] | None = None) -> list[str]:
    """The in-distribution classes (``order``, else natural sort): at least two besides the OOD ones."""
    check_ood_classes(labels, ood_names)
    present = set(labels[~np.isin(labels, ood_names)])
    names = [c for c in order if c in present] if order else sorted(present, key=_natural_key)
    if len(names) >= 2:
        return names
    if ood_names and len(set(labels)) >= 2:
        raise UserError(f"data.ood_classes={ood_names} leaves {len(names) or 'no'} class to train on, and a classifier "
                        f"needs at least two classes besides data.ood_classes, found: {_counted(labels)}; "
                        "hold out fewer classes")
    raise UserError(f"the data needs at least two classes, found: {_counted(labels)}; check data.label_column "
                    "(or the class sub-folders), or add rows of another class")


def rows_for_every_split(val_fraction: float, test_fraction: float) -> int:
    """About how many rows a class needs for one to land in each of train, validation and test."""
    return math.ceil(1 / min(val_fraction, test_fraction)) + 1


def _fraction_check(labels: np.ndarray, fraction: float, key: str, value: float, part: str) -> np.ndarray:
    """Which rows can be stratified (their class has two or more here); an error if none can, or if the
    split cannot hold one row of each of their classes."""
    names, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    single = counts[inverse] < 2
    if single.all():
        raise UserError(f"every label occurs once ({len(labels)} rows, {len(names)} classes), so no split can "
                        "hold rows of the same class; check that data.label_column is the label, or add rows")
    k, n = len(names[counts >= 2]), int((~single).sum())
    size = math.ceil(fraction * n)
    if size < k:
        raise UserError(f"{key}={value:g} gives the {part} split {size} of {n} rows, fewer than the {k} classes it "
                        f"must hold one row of; raise {key} or add rows")
    if n - size < k:
        raise UserError(f"{key}={value:g} leaves {n - size} of {n} rows outside the {part} split, fewer than the "
                        f"{k} classes; lower {key} or add rows")
    return ~single


def check_splittable(labels: np.ndarray, val_fraction: float, test_fraction: float | None) -> None:
    """Before any work: the checks of ``stratified`` for the first split (test, else validation)."""
    if test_fraction is not None:
        _fraction_check(labels, test_fraction, "data.test_fraction", test_fraction, "test")
    else:
        _fraction_check(labels, val_fraction, "data.val_fraction", val_fraction, "validation")


def stratified(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int, key: str, value: float,
               part: str) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` split into (rest, part) with ``fraction`` of them in part, stratified by ``labels``;
    rows of a class with a single row here stay in rest."""
    from sklearn.model_selection import train_test_split  # 0.6 s that loading a split never needs

    pool = _fraction_check(labels, fraction, key, value, part)
    try:
        rest, chosen = train_test_split(rows[pool], test_size=fraction, stratify=labels[pool], random_state=seed)
    except ValueError as err:  # not expected after the checks above; said in our words all the same
        raise UserError(f"cannot make a stratified {part} split with {key}={value:g}: "
                        f"{str(err).splitlines()[0]}; change {key} or add rows") from None
    return np.concatenate([rest, rows[~pool]]), chosen


def stratified_parts(labels: np.ndarray, cfg, seed: int, with_test: bool = True,
                     names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Positions into ``labels`` as disjoint, stratified test / calib / val / train parts, each
    ``data.<split>_fraction`` of the whole (``with_test=False``: a benchmark's own test set, so the
    fractions are of the rest). A class that has rows to spare but none in calibration is refused,
    naming the key. ``names``: class names of integer ``labels``, for the message."""
    rest, parts, whole = np.arange(len(labels)), {}, 1.0
    steps = (("test", "test_fraction", "test"), ("calib", "calib_fraction", "calibration"),
             ("val", "val_fraction", "validation"))
    for name, key, what in steps[0 if with_test else 1:]:
        share = cfg[key] / whole
        if name == "calib" and math.ceil(share * len(rest)) < len(np.unique(labels[rest])):
            _no_calib_rows(cfg, labels, rest, np.array([], int), names)
        if len(rest) < len(labels) and (np.unique(labels[rest], return_counts=True)[1] < 2).all():
            named = np.asarray(names)[labels] if names is not None else labels
            raise UserError(f"the data has {len(labels)} rows ({_counted(named)}): too few for test, calibration, "
                            f"validation and train splits of every class; after the {list(parts)[-1]} split every "
                            f"class has one row left; add rows")
        rest, parts[name] = stratified(rest, labels[rest], share, seed, f"data.{key}", cfg[key], what)
        whole -= cfg[key]
        if name == "calib":
            _no_calib_rows(cfg, labels, rest, parts["calib"], names)
    parts["train"] = rest
    return parts


def _no_calib_rows(cfg, labels: np.ndarray, rest: np.ndarray, calib: np.ndarray, names: list[str] | None) -> None:
    """Refuse a class with rows to spare (three or more: one each for train, validation and
    calibration) that got no calibration row; rarer classes stay in train, and the run warns."""
    pool = np.concatenate([rest, calib]).astype(int)
    values, counts = np.unique(labels[pool], return_counts=True)
    missing = [v for v, c in zip(values, counts, strict=True) if c >= 3 and v not in set(labels[calib])]
    if missing:
        shown = str(names[int(missing[0])]) if names is not None else str(missing[0])
        raise UserError(f"data.calib_fraction={cfg.calib_fraction:g} leaves class {shown!r} with no calibration rows "
                        f"({len(calib)} calibration rows for {len(values)} classes); raise data.calib_fraction")


def warn_missing_classes(names: list[str], y: dict[str, np.ndarray], val_fraction: float,
                         test_fraction: float | None) -> str | None:
    """One warning line (printed, and returned) naming each class that validation or test holds no
    row of, with its rows per split, and what to do; None when every split has every class."""
    counts = {part: np.bincount(y[part], minlength=len(names)) for part in ("train", "val", "test")}
    missing = [i for i in range(len(names)) if min(counts["val"][i], counts["test"][i]) == 0]
    if not missing:
        return None
    shown = "; ".join(f"{names[i]!r} {counts['train'][i]} train, {counts['val'][i]} validation, "
                      f"{counts['test'][i]} test" for i in missing[:5])
    more = f" and {len(missing) - 5} more classes" if len(missing) > 5 else ""
    need = rows_for_every_split(val_fraction, test_fraction or val_fraction)
    fractions = "data.val_fraction / data.test_fraction" if test_fraction is not None else "data.val_fraction"
    line = (f"warning: too few rows to put every class in every split ({shown}{more}), so validation or test "
            f"says nothing about {'it' if len(missing) == 1 else 'them'}; about {need} rows per class put one in "
            f"each: add rows of {'it' if len(missing) == 1 else 'them'}, raise {fractions}, or remove "
            f"{'its' if len(missing) == 1 else 'their'} rows from the data")
    print(line, file=sys.stderr, flush=True)
    return line


def ood_parts(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions into the OOD split's ``labels`` as two disjoint halves, stratified by held-out class:
    (gate, report). The champion gate reads the gate half (against validation), the test report the
    other, so no OOD row both chooses the champion and reports its quality. A class with a single
    row goes to the report half."""
    rng = np.random.default_rng([seed, 0x00D])
    gate, report = [], []
    for value in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == value))
        gate.append(rows[: len(rows) // 2])
        report.append(rows[len(rows) // 2 :])
    empty = np.zeros(0, dtype=np.int64)
    return (np.sort(np.concatenate([empty, *gate])).astype(np.int64),
            np.sort(np.concatenate([empty, *report])).astype(np.int64))
