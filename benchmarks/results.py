"""Regenerate the results tables of README.md and BENCHMARKS.md (``make results``).

Runs the default pipeline on digits with every registered family and 3 model seeds each
(``pipeline.seeds=3``), into a
temporary folder and MLflow store (your ``mlflow.db`` and champion are not touched), then rewrites
only what lies between marker comments, so a change that moves a number shows in the diff:

    <!-- results:NAME -->  ...  <!-- /results:NAME -->

``--from RUN_DIR`` makes the tables from a finished run's outputs instead of running the pipeline.
The speed tables of BENCHMARKS.md depend on the machine and come from ``make bench``, not from here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from dl_uncertainty.families.registry import NAMES  # noqa: E402
from dl_uncertainty.tracking import seeds as S  # noqa: E402
from dl_uncertainty.tracking.compare import pick_winner, selection_metric  # noqa: E402

SEEDS = 3
# every registered family, each with 3 model seeds
OVERRIDES = [f"pipeline.seeds={SEEDS}", f"pipeline.models=[{','.join(NAMES)}]"]
# README column -> metric, and how to show it
COLUMNS = [("val NLL (selects)", "val_nll", 4), ("test acc", "acc", 4), ("NLL", "nll", 4), ("Brier", "brier", 4), ("ECE (15 bins)", "ece", 4),
           ("AURC", "aurc", 5), ("OOD AUROC (entropy)", "auroc_entropy", 4), ("OOD AUROC (MI)", "auroc_mutual_info", 4),
           ("far-OOD AUROC (entropy)", "far_auroc_entropy", 4), ("coverage (LAC, 90 %)", "coverage", 3),
           ("set size", "set_size", 2), ("abstains on test", "abstain_rate", 3), ("abstains on OOD", "ood_abstain_rate", 3)]
PER_SEED = [("acc", 4), ("nll", 4), ("ece", 4), ("auroc_entropy", 4), ("coverage", 3)]


def marker(name: str) -> tuple[str, str]:
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"


def rewrite(text: str, name: str, body: str) -> str:
    """``text`` with what lies between the ``name`` markers replaced by ``body``; nothing else changes."""
    start, end = marker(name)
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.S)
    found = len(pattern.findall(text))
    if found != 1:
        raise SystemExit(f"expected one {start} ... {end} block, found {found}")
    return pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", text)


def write_tables(tables: dict[str, str], files: list[Path]) -> list[str]:
    """Put each table between its markers in whichever of ``files`` holds them; return the names written.
    Every table must land somewhere."""
    written = []
    for path in files:
        text = original = path.read_text()
        for name, body in tables.items():
            if marker(name)[0] in text:
                text = rewrite(text, name, body)
                written.append(name)
        if text != original:
            path.write_text(text)
    missing = sorted(set(tables) - set(written))
    if missing:
        raise SystemExit(f"no markers for {', '.join(missing)} in {', '.join(str(f) for f in files)}")
    return written


def _cell(spread: S.Spread | None, digits: int) -> str:
    if spread is None or not spread.values:
        return "-"
    text = f"{spread.mean:.{digits}f}"
    return text if spread.n < 2 else f"{text} ± {spread.std:.{digits}f}"


def tables(records: list[dict], winner_metric: str, winner_mode: str, note: str) -> dict[str, str]:
    """The markdown of every results block, from the evaluate records of one run."""
    spreads = S.aggregate(records)
    means = S.means(spreads)
    winner = pick_winner(means, winner_metric, winner_mode)
    families = S.by_family(records)
    registered = S.median_seed(families[winner], winner_metric, winner_mode)
    noise = S.noise_verdict(winner, winner_metric, S.leads(records, winner, winner_metric, winner_mode))
    head = "| model | " + " | ".join(c for c, _, _ in COLUMNS) + " |"
    rows = [head, "|---|" + "---:|" * len(COLUMNS)]
    for name in spreads:
        best = {metric: name == pick(means, metric) for _, metric, _ in COLUMNS}
        cells = [(f"**{_cell(spreads[name].get(m), d)}**" if best[m] else _cell(spreads[name].get(m), d))
                 for _, m, d in COLUMNS]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    comparison = (f"{note}\n\n" + "\n".join(rows) + "\n\n"
                  f"Mean ± sample standard deviation over {max(len(r) for r in families.values())} model seeds per family (bold: the best mean). "
                  f"The winner by the default rule (lowest mean {winner_metric}) is `{winner}`; the registered "
                  f"champion is its median seed, {registered.get('seed')}. {noise}")
    per_seed = ["| model | seed | " + " | ".join(m for m, _ in PER_SEED) + " |", "|---|---:|" + "---:|" * len(PER_SEED)]
    for name, runs in families.items():
        for run in runs:
            per_seed.append(f"| `{name}` | {run.get('seed')} | "
                            + " | ".join(f"{run['metrics'].get(m, float('nan')):.{d}f}" for m, d in PER_SEED) + " |")
    leads = ["| winner | vs | mean lead | 95 % t-interval | better on | verdict |", "|---|---|---:|---|---:|---|"]
    for p in S.leads(records, winner, winner_metric, winner_mode):
        verdict = {True: "beyond seed noise", False: "within seed noise", None: "one seed: not measured"}[p.beyond_noise]
        leads.append(f"| `{winner}` | `{p.other}` | {p.mean:.4f} | [{p.low:.4f}, {p.high:.4f}] | "
                     f"{p.wins} of {p.n} | {verdict} |")
    seeds = (f"{note}\n\nEvery seed's run ({winner_metric} picks the winner; lead = the rival's "
             f"{winner_metric} minus the winner's, per seed):\n\n" + "\n".join(per_seed) + "\n\n" + "\n".join(leads))
    return {"comparison": comparison, "seeds": seeds, "coverage": coverage_table(records)}


def coverage_table(records: list[dict]) -> str:
    """Test coverage of every family's LAC/APS/RAPS sets (thresholds fitted on the calibration split),
    averaged over seeds, against split conformal's band [1 - alpha, 1 - alpha + 1/(n+1)] widened by
    2 standard errors. One split serves every seed, so averaging seeds does not average out the
    calibration draw: the standard error is one split's, sqrt(alpha (1 - alpha) / (n + 2) + c (1 - c) / m)
    (the spread of the calibrated coverage, a Beta law, plus the m test rows' binomial noise)."""
    import math

    from dl_uncertainty.uncertainty.conformal import coverage_band

    rows = ["| model | method | coverage (mean over seeds) | per seed | band ± 2 SE | inside |",
            "|---|---|---:|---|---|---|"]
    inside_all = []
    for name, runs in S.by_family(records).items():
        m = runs[0]["metrics"]
        if "calibration_examples" not in m:  # evaluated without a calibration: no sets
            continue
        alpha, n = m.get("alpha", 0.1), int(m["calibration_examples"])
        tests = runs[0].get("test_rows")
        for method in ("lac", "aps", "raps"):
            values = [r["metrics"][f"coverage_{method}"] for r in runs if f"coverage_{method}" in r["metrics"]]
            if not values:
                continue
            c = sum(values) / len(values)
            low, high = coverage_band(alpha, n)
            se = math.sqrt(alpha * (1 - alpha) / (n + 2) + (c * (1 - c) / tests if tests else 0.0))
            inside = low - 2 * se <= c <= high + 2 * se
            inside_all.append(inside)
            rows.append(f"| `{name}` | {method.upper()} | {c:.3f} | {', '.join(f'{v:.3f}' for v in values)} | "
                        f"[{low - 2 * se:.3f}, {high + 2 * se:.3f}] | {'yes' if inside else '**no**'} |")
    return "\n".join(rows) + f"\n\n{sum(inside_all)} of {len(inside_all)} inside the band."


def pick(means: dict[str, dict[str, float]], metric: str) -> str | None:
    from dl_uncertainty.reports import metric_catalog

    scored = {n: m[metric] for n, m in means.items() if metric in m}
    if not scored:
        return None
    lower = metric_catalog.better(metric) == "↓"
    return (min if lower else max)(scored, key=scored.get)


def records_of(run_dir: Path) -> list[dict]:
    """Every evaluate record of a run, with ``test_rows``, its test split's size, from its predictions."""
    import numpy as np

    from pipelines.local import evaluation_records

    found = []
    for path in evaluation_records(run_dir):  # an evaluate task's, or a kfp.local train-evaluate task's
        found.append(json.loads(path.read_text()))
        if (path.parent / "predictions").is_file():
            with np.load(path.parent / "predictions") as npz:
                found[-1]["test_rows"] = len(npz["labels"])
    if not found:
        raise SystemExit(f"no evaluate records under {run_dir}")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="run_dir", type=Path, help="a finished run's output folder")
    parser.add_argument("--files", nargs="+", type=Path, default=[ROOT / "README.md", ROOT / "BENCHMARKS.md"])
    args = parser.parse_args(argv)
    from dl_uncertainty.config.compose import load_config

    cfg = load_config(OVERRIDES)
    load = os.getloadavg()[0]
    if args.run_dir:
        run_dir, seconds = args.run_dir, None
    else:
        import time

        from pipelines.local import run_local

        work = Path(tempfile.mkdtemp(prefix="dlu-results-"))
        tic = time.perf_counter()
        run_dir = run_local([*OVERRIDES, f"tracking_uri=sqlite:///{work / 'mlflow.db'}"], work / "outputs")
        seconds = time.perf_counter() - tic
    # tables made from a finished run (--from) cannot know the load or time it ran at
    measured = f", load average {load:.1f} at start, {seconds:.0f} s" if seconds is not None else ""
    records = records_of(run_dir)
    seeds = sorted({r.get("seed") for r in records})
    note = (f"`make results`: digits, default settings, model seeds {', '.join(map(str, seeds))} (one data split, "
            f"made with seed {cfg.seed}), {cfg.evaluate.mc_samples} MC samples, {os.cpu_count()} CPU cores{measured}.")
    # the winner is chosen as compare chooses it: on the validation metric; test numbers are reported only
    written = write_tables(tables(records, selection_metric(cfg.evaluate.winner_metric), cfg.evaluate.winner_mode, note),
                           args.files)
    print(f"rewrote {', '.join(written)} in {', '.join(str(f) for f in args.files)}")


if __name__ == "__main__":
    main()
