"""Seeds as an axis of the comparison: each family's metrics over its model seeds (mean ± std), the
run that stands for the family (its median seed), and whether the winner's lead is beyond seed noise.

Every (family, seed) branch trains on the same data split, and the k-th seed of every family is the
same model seed, so the families' results are paired by seed: the winner's lead over another family
is judged on the per-seed differences of the selection metric (their mean, a Student t interval and
how many seeds the winner is better on), not on two means whose noise is mostly shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dl_uncertainty.reports.render import format_value, markdown_table

LEVEL = 0.95  # of the t-interval on the mean paired difference


@dataclass
class Spread:
    """One metric of one family over its seeds."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1); NaN for one seed: the noise is not measured."""
        return float(np.std(self.values, ddof=1)) if self.n > 1 else float("nan")

    def cell(self) -> str:
        if self.n <= 1 or not math.isfinite(self.std):
            return format_value(self.mean)
        return f"{format_value(self.mean)} ± {format_value(self.std)}"


def replicate(entry: dict) -> int:
    """What pairs a family's runs with another's: the fold under cross-validation, else the model seed
    (a record without one, an older pipeline's, counts as seed 0)."""
    return entry["fold"] if "fold" in entry else entry.get("seed", 0)


def axis(entries: list[dict]) -> str:
    """What a family's runs differ by: "fold" under cross-validation, else "seed"."""
    return "fold" if any("fold" in e for e in entries) else "seed"


def by_family(entries: list[dict]) -> dict[str, list[dict]]:
    """Evaluate records (``{"model", "seed", "run_id", "metrics"}``, and ``"fold"`` under cross-validation)
    grouped by family, each sorted by fold or seed."""
    families: dict[str, list[dict]] = {}
    for entry in entries:
        families.setdefault(entry["model"], []).append(entry)
    return {name: sorted(runs, key=replicate) for name, runs in families.items()}


def aggregate(entries: list[dict]) -> dict[str, dict[str, Spread]]:
    """Per family, per metric: its finite values over the seeds."""
    out: dict[str, dict[str, Spread]] = {}
    for name, runs in by_family(entries).items():
        keys = sorted({k for e in runs for k in e["metrics"]})
        out[name] = {k: Spread([float(e["metrics"][k]) for e in runs
                                if k in e["metrics"] and _finite(e["metrics"][k])]) for k in keys}
    return out


def means(spreads: dict[str, dict[str, Spread]]) -> dict[str, dict[str, float]]:
    """Per family, each metric's mean over seeds: what the winner is picked on."""
    return {name: {k: s.mean for k, s in metrics.items()} for name, metrics in spreads.items()}


def median_seed(runs: list[dict], metric: str, mode: str) -> dict:
    """The run that stands for a family: the median of its seeds on ``metric`` (for an even number of
    seeds, the better of the two middle ones). Not the best seed: picking the luckiest of n draws
    would register a model better than the family typically trains."""
    scored = [e for e in runs if _finite(e["metrics"].get(metric))]
    if not scored:
        return runs[0]
    ranked = sorted(scored, key=lambda e: e["metrics"][metric], reverse=(mode == "max"))  # best first
    return ranked[(len(ranked) - 1) // 2]


@dataclass
class Paired:
    """The winner against another family on one metric, seed by seed (difference > 0: the winner is better)."""

    other: str
    differences: list[float]
    low: float
    high: float

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return float(np.mean(self.differences))

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.differences)

    @property
    def beyond_noise(self) -> bool | None:
        """True when the whole interval is above 0; None with one seed (noise not measured)."""
        return None if self.n < 2 else bool(self.low > 0)


def paired(winner_runs: list[dict], other_runs: list[dict], other: str, metric: str, mode: str,
           level: float = LEVEL) -> Paired:
    """Per-seed differences of ``metric`` between the winner and ``other`` (seeds both have), their
    mean's two-sided Student t interval at ``level``."""
    from scipy import stats

    theirs = {replicate(e): e["metrics"].get(metric) for e in other_runs}
    diffs = []
    for entry in winner_runs:
        mine, their = entry["metrics"].get(metric), theirs.get(replicate(entry))
        if _finite(mine) and _finite(their):
            diffs.append(float(their - mine) if mode == "min" else float(mine - their))
    n = len(diffs)
    if n < 2:
        mean = diffs[0] if diffs else float("nan")
        return Paired(other, diffs, mean, mean)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(np.std(diffs, ddof=1)) / math.sqrt(n)
    mean = float(np.mean(diffs))
    return Paired(other, diffs, mean - half, mean + half)


def leads(entries: list[dict], winner: str, metric: str, mode: str) -> list[Paired]:
    """The winner against every other family, closest (smallest mean lead) first."""
    families = by_family(entries)
    found = [paired(families[winner], runs, name, metric, mode) for name, runs in families.items() if name != winner]
    return sorted(found, key=lambda p: p.mean if math.isfinite(p.mean) else math.inf)


def noise_verdict(winner: str, metric: str, found: list[Paired], level: float = LEVEL, over: str = "seed") -> str:
    """One sentence per rival: the lead, its interval, the sign count, and whether it is beyond seed
    (``over="fold"``: fold-to-fold) noise."""
    if not found:
        return f"{winner} is the only family: nothing to compare."
    if found[0].n < 2:
        return "One seed: noise not measured (pipeline.seeds=1; with 3 or more the lead is tested over seeds)."
    lines = []
    for p in found:
        judged = f"beyond {over} noise" if p.beyond_noise else f"within {over} noise (the interval includes 0)"
        lines.append(f"{winner} vs {p.other}: {metric} better by {p.mean:.4f} on average over {p.n} paired {over}s, "
                     f"{level:.0%} t-interval [{p.low:.4f}, {p.high:.4f}], better on {p.wins} of {p.n} {over}s: {judged}.")
    if over == "fold":  # fold models share most of their training rows: their differences are correlated
        lines.append("Folds share training rows, so this interval is narrower than an independent one would be.")
    return " ".join(lines)


def spread_rows(spreads: dict[str, dict[str, Spread]], columns: list[str], over: str = "seed") -> list[dict]:
    """One row per family: its number of seeds (or folds) and each column's mean ± std."""
    rows = []
    for name, metrics in spreads.items():
        n = max((s.n for s in metrics.values()), default=0)
        row = {"model": name, **({f"{over}s": n} if n > 1 else {})}
        row.update({c: metrics[c].cell() if c in metrics else format_value(float("nan")) for c in columns})
        rows.append(row)
    return rows


def spread_markdown(spreads: dict[str, dict[str, Spread]], columns: list[str], winner: str, metric: str,
                    mode: str, representative: dict, noise: str, verdict: str = "", axis: str = "seed") -> str:
    """The comparison: mean ± std per metric per family, the winner on the mean, the run registered
    for it, the noise verdict and the gate's. ``axis``: what the runs of a family differ by (seed or fold)."""
    spread = spreads[winner][metric]
    over = f" over {spread.n} {axis}s" if spread.n > 1 else ""
    which = (f" Registered: its median {axis}, {representative.get(axis)} (run {representative['run_id']})."
             if spread.n > 1 else "")
    return (f"# Model comparison\n\n{markdown_table(spread_rows(spreads, columns, axis))}\n\n"
            f"**Winner: {winner}** ({'lowest' if mode == 'min' else 'highest'} {metric}: "
            f"{spread.mean:.4f}{' mean' if over else ''}{over}).{which} {noise} {verdict}\n")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
