"""What each reported metric is about (its group) and which way is better, for tables a reader can scan.

``group(name)``: accuracy, calibration, selective prediction, OOD detection, conformal, shift,
uncertainty, validation (``val_*``: what the comparison chooses and gates on), or other. ``better(name)``: "↑" (higher is better), "↓" (lower is better) or "" (a
setting or a count, neither). Rules are tried in order; the first whose pattern matches wins.
"""

from __future__ import annotations

import re

UP, DOWN, NEITHER = "↑", "↓", ""

_RULES: tuple[tuple[str, str, str], ...] = (  # (pattern, group, better)
    (r"^(gaussian_noise|rotation|shift)_.*_acc$", "shift", UP),
    (r"^(gaussian_noise|rotation|shift)_.*_ece$", "shift", DOWN),
    (r"^(far_)?(auroc|aupr)_", "OOD detection", UP),
    (r"^far_[a-z]+_auroc_", "OOD detection", UP),  # per generated far-OOD kind
    (r"^(far_)?fpr95_", "OOD detection", DOWN),
    (r"^(ood|far_ood)_abstain_rate$", "OOD detection", UP),
    (r"^coverage_band_", "conformal", NEITHER),
    (r"^coverage(_|$)", "conformal", UP),
    (r"^(set_size|empty)(_|$)", "conformal", DOWN),
    (r"^singleton(_|$)", "conformal", UP),
    (r"^(alpha|calibration_examples)$", "conformal", NEITHER),
    (r"^(aurc|selective_risk)$", "selective prediction", DOWN),
    (r"^acc_cov\d+$", "selective prediction", UP),
    (r"^abstain_rate$", "selective prediction", DOWN),
    (r"^temperature_gain", "calibration", UP),
    (r"^(temperature|calibration_)", "calibration", NEITHER),
    (r"^(nll|brier|ece|aece|mce)(_ts)?$", "calibration", DOWN),
    (r"^(acc|test_accuracy)(_ts)?$", "accuracy", UP),
    (r"^(entropy|mutual_info|avg_test_uncertainty)$", "uncertainty", NEITHER),
)
SELECTION = "validation (what selection reads)"  # val_<metric>: the same metric on the validation split
GROUPS = ("accuracy", "calibration", "selective prediction", "OOD detection", "conformal", "shift",
          "uncertainty", SELECTION, "other")


def _rule(name: str) -> tuple[str, str]:
    if name.startswith("val_"):
        return SELECTION, _rule(name[4:])[1]
    for pattern, grp, better_ in _RULES:
        if re.search(pattern, name):
            return grp, better_
    return "other", NEITHER


def group(name: str) -> str:
    return _rule(name)[0]


def better(name: str) -> str:
    return _rule(name)[1]


def grouped_rows(metrics: dict[str, float]) -> dict[str, list[dict]]:
    """group -> rows ``{"metric", "value", "better"}``, groups in ``GROUPS`` order, names sorted."""
    out: dict[str, list[dict]] = {g: [] for g in GROUPS}
    for name in sorted(metrics):
        grp, better_ = _rule(name)
        out[grp].append({"metric": name, "value": metrics[name], "better": better_})
    return {g: rows for g, rows in out.items() if rows}
