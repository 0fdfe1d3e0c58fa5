"""Put evaluated models side by side, pick the winner, and register it as the MLflow champion.

The winner and the champion gate read validation metrics (``val_<metric>``, see ``SELECTION_SPLIT``);
test metrics are in the tables for reporting and never choose. The registered model's name derives
from the data a model was trained on (``registered_name``), so models of different data never share
a name.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from dl_uncertainty.errors import UserError
from dl_uncertainty.reports import calibration_plots, metric_catalog
from dl_uncertainty.reports.render import Section, html_report, markdown_table

CHAMPION = "champion"
SELECTION_SPLIT = "val"  # the split whose metrics choose the winner and pass the gate
REGISTERED_PREFIX = "dl-uncertainty"


def selection_metric(metric: str) -> str:
    """The validation metric that ``evaluate.winner_metric`` chooses by: ``nll`` -> ``val_nll``."""
    return metric if metric.startswith(f"{SELECTION_SPLIT}_") else f"{SELECTION_SPLIT}_{metric}"


def selection_note(metric: str) -> str:
    return f"chosen on validation {metric.removeprefix(f'{SELECTION_SPLIT}_')}; test numbers reported only"


def registered_name(data, feature_shape, explicit: str | None = None) -> str:
    """``explicit`` (evaluate.registered_model_name), else ``dl-uncertainty-<data>-<input shape>``: the data
    source (with the file or folder name for csv, npz and image_folder) and the input shape joined by x,
    e.g. ``dl-uncertainty-digits-1x8x8``, ``dl-uncertainty-image_folder-shapes-3x32x32``."""
    if explicit:
        return explicit
    source = str(data.source)
    if data.get("path") and source in ("csv", "npz", "image_folder"):
        source += "-" + Path(str(data.path).rstrip("/")).stem
    shape = "x".join(str(int(d)) for d in feature_shape)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{REGISTERED_PREFIX}-{source}-{shape}")


def pick_winner(results: dict[str, dict[str, float]], metric: str, mode: str) -> str:
    """Name of the model with the best ``metric`` (lowest for mode=min, highest for max)."""
    scored = {name: m[metric] for name, m in results.items() if metric in m and math.isfinite(m[metric])}
    if not scored:
        raise UserError(f"no model has a finite {metric!r} to compare (metrics: {sorted(next(iter(results.values())))})")
    pick = min if mode == "min" else max
    return pick(scored, key=scored.get)


# gate key -> (metric, direction, what it means); coverage is checked against 1 - alpha - coverage_slack
GATE = {
    "max_ece": ("val_ece_ts", "max", "validation ECE (calibrated)"),
    "min_ood_auroc": ("val_auroc_entropy", "min", "OOD AUROC (entropy, validation vs the OOD gate half)"),
    "coverage_slack": ("val_coverage", "min", "validation conformal coverage"),
}
OPTIONAL = {"val_auroc_entropy": "no OOD split"}  # the only metric a model may lack: then it is not checked


def _limit(key: str, gate, alpha: float) -> float | None:
    limit = gate[key]
    if key == "coverage_slack" and limit is not None:
        return 1 - alpha - limit  # the sets promise >= 1 - alpha; sampling error allowed for by the slack
    return limit


def gate_failures(metrics: dict[str, float], gate, alpha: float) -> list[str]:
    """Why a model may not become champion: one phrase per failed threshold (empty: it passes).

    A threshold set to null is not checked. A missing metric fails, except the OOD AUROC of a model
    evaluated without an OOD split (``gate_skipped`` names it). Coverage must reach 1 - alpha - slack.
    """
    failures = []
    for key in GATE:
        metric, direction, label = GATE[key]
        limit, value = _limit(key, gate, alpha), metrics.get(metric)
        if limit is None or (value is None and metric in OPTIONAL):
            continue
        if value is None:
            failures.append(f"{label} was not measured ({metric} missing)")
        elif not math.isfinite(value) or (value > limit if direction == "max" else value < limit):
            failures.append(f"{label} {value:.4f} {'>' if direction == 'max' else '<'} {limit:g}")
    return failures


def gate_skipped(metrics: dict[str, float], gate) -> list[str]:
    """The thresholds not checked because the model lacks an optional metric, with why."""
    return [f"{GATE[key][2]} not checked ({OPTIONAL[GATE[key][0]]})" for key in GATE
            if gate[key] is not None and GATE[key][0] in OPTIONAL and GATE[key][0] not in metrics]


def current_champion(name: str) -> str | None:
    """The version the champion alias points at, or None when there is none (or no such model)."""
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def register_champion(run_id: str, name: str, promote: bool = True) -> str:
    """Register ``runs:/<run_id>/model`` as a new version of ``name``; with ``promote``, point the
    champion alias at it (otherwise the alias stays where it was)."""
    try:
        version = mlflow.register_model(f"runs:/{run_id}/model", name)
        if promote:
            mlflow.MlflowClient().set_registered_model_alias(name, CHAMPION, version.version)
    except MlflowException as err:
        raise UserError(f"cannot register run {run_id} as {name}@{CHAMPION}: {err.message.splitlines()[0]}") from None
    return str(version.version)


def gate_verdict(winner: str, failures: list[str], skipped: list[str] = (), champion: str | None = "") -> str:
    """``champion``: the version the alias is on now (None: there is none; "": not looked up)."""
    note = f" ({'; '.join(skipped)})" if skipped else ""
    if not failures:
        return f"{winner} passes the champion gate{note} and becomes {CHAMPION}."
    if champion is None:
        stays = (f"no {CHAMPION} is set, so `make serve` has nothing to serve until a model passes "
                 f"(thresholds: evaluate.champion_gate).")
    else:
        where = f"version {champion}" if champion else "the previous champion"
        stays = f"the {CHAMPION} alias stays on {where} (thresholds: evaluate.champion_gate)."
    return f"{winner} fails the champion gate ({'; '.join(failures)}){note}: registered, but {stays}"


def comparison_rows(results: dict[str, dict[str, float]], columns: list[str]) -> list[dict]:
    return [{"model": name, **{c: m.get(c, float("nan")) for c in columns}} for name, m in results.items()]


def _reason(results: dict[str, dict[str, float]], winner: str, metric: str, mode: str) -> str:
    return f"{'lowest' if mode == 'min' else 'highest'} {metric}: {results[winner][metric]:.4f}"


def comparison_markdown(results: dict[str, dict[str, float]], columns: list[str], winner: str,
                        metric: str, mode: str, verdict: str = "") -> str:
    return (f"# Model comparison\n\n{markdown_table(comparison_rows(results, columns))}\n\n"
            f"**Winner: {winner}** ({_reason(results, winner, metric, mode)}; {selection_note(metric)}). {verdict}\n")


SWEEP_FIGURES = {"optimization_history": "Optimisation history", "param_importances": "Parameter importance"}


def tuning_section(run_ids: dict[str, str]) -> Section | None:
    """For each compared model trained from ``configs/tuned/<model>.yaml`` (its run tagged with the
    study), the sweep's figures from the study's parent run in MLflow, or where to find its report.
    None when no model was tuned. Needs the tracking URI set (``store.setup``)."""
    from dl_uncertainty.tracking.store import TUNED_STUDY_TAG  # not runs: it loads torch

    client = mlflow.MlflowClient()
    text, figures = [], {}
    for model, run_id in run_ids.items():
        study = client.get_run(run_id).data.tags.get(TUNED_STUDY_TAG)
        if not study:
            continue
        parents = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                                     filter_string=f"tags.optuna_study = '{study}' AND tags.sweep = 'parent'")
        uris = {}
        for name, caption in SWEEP_FIGURES.items() if parents else ():
            try:
                path = mlflow.artifacts.download_artifacts(run_id=parents[0].info.run_id,
                                                           artifact_path=f"figures/{name}.png")
            except (MlflowException, OSError):
                continue  # no importance figure where a single parameter was searched
            uris[f"{model}: {caption}"] = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
        if uris:
            text.append(f"{model} was trained from the best trial of Optuna study {study} "
                        f"(its sweep: MLflow run {parents[0].info.run_id}, artifact reports/sweep.html).")
            figures.update(uris)
        else:
            text.append(f"{model} was trained from the best trial of Optuna study {study}, whose sweep is not in "
                        f"this MLflow: see outputs/sweeps/{study}.html where it was tuned, or the "
                        "tuning-pipeline run's report step.")
    return Section("Tuning", text=text, figures=figures) if text else None


def comparison_html(results: dict[str, dict[str, float]], columns: list[str], winner: str, metric: str,
                    mode: str, predictions: dict[str, dict[str, np.ndarray]], verdict: str = "",
                    tuning: Section | None = None, seeds: list[dict] | None = None,
                    cross_validation: Section | None = None) -> str:
    """Side-by-side report: every metric, overlaid reliability diagrams and risk-coverage curves, and
    ``tuning`` (see ``tuning_section``) when a model came from a sweep. With several seeds per family,
    ``results`` are the means, ``seeds`` the mean ± std rows (``seeds.spread_rows``) and the figures
    show each family's median-seed run; ``cross_validation``: the K-fold section (``folds.cv_section``)."""
    pairs = {name: (p["probs"], p["labels"]) for name, p in predictions.items()}
    all_metrics = sorted({k for m in results.values() for k in m})
    groups: dict[str, list[dict]] = {g: [] for g in metric_catalog.GROUPS}
    for k in all_metrics:
        groups[metric_catalog.group(k)].append({"metric": k, "better": metric_catalog.better(k),
                                                **{name: m.get(k, float("nan")) for name, m in results.items()}})
    sections = [
        Section("Winner", text=[f"{winner} wins on {_reason(results, winner, metric, mode)} ({selection_note(metric)}).",
                                verdict],
                table=[{"metric": c, "better": metric_catalog.better(c),
                        **{name: m.get(c, float("nan")) for name, m in results.items()}} for c in columns]),
        *([Section("Over seeds (mean ± std)", table=seeds)] if seeds and any("seeds" in r for r in seeds) else []),
        *([cross_validation] if cross_validation else []),
        Section("Calibration and selective prediction", figures={
            "Reliability": calibration_plots.reliability_equal_mass(pairs),
            "Risk-coverage": calibration_plots.risk_coverage_zoomed(pairs),
        }),
        *(Section(f"Every metric: {g}", text="↑: higher is better, ↓: lower is better." if i == 0 else (), table=rows)
          for i, (g, rows) in enumerate((g, r) for g, r in groups.items() if r)),
        *([tuning] if tuning else []),
    ]
    return html_report("Model comparison", sections)
