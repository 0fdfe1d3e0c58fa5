from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def compare(
    config: Input[Artifact],
    metrics: Input[List[Metrics]],
    predictions: Input[List[Dataset]],
    comparison: Output[Markdown],
    report: Output[HTML],
) -> str:
    """Table every model's metrics, pick the winner, register it in MLflow with alias 'champion'."""
    import json

    import numpy as np

    from dl_uncertainty.config.compose import pick_config
    from dl_uncertainty.tracking import store
    from dl_uncertainty.tracking.compare import (
        comparison_html,
        comparison_markdown,
        current_champion,
        gate_failures,
        gate_skipped,
        gate_verdict,
        pick_winner,
        register_champion,
        tuning_section,
    )
    from dl_uncertainty.uncertainty.metrics import TABLE_METRICS

    cfg = pick_config(open(config.path).read())
    entries = [json.load(open(m.path)) for m in metrics]
    results = {e["model"]: e["metrics"] for e in entries}
    preds = {}
    for entry, artifact in zip(entries, predictions, strict=True):
        with np.load(artifact.path) as npz:
            preds[entry["model"]] = {"probs": npz["probs"], "labels": npz["labels"]}
    metric, mode = cfg.evaluate.winner_metric, cfg.evaluate.winner_mode
    winner = pick_winner(results, metric, mode)
    gate, alpha = cfg.evaluate.champion_gate, results[winner].get("alpha", cfg.evaluate.alpha)
    failures = gate_failures(results[winner], gate, alpha)
    store.setup(cfg)
    verdict = gate_verdict(winner, failures, gate_skipped(results[winner], gate),
                           current_champion(cfg.evaluate.registered_model_name))
    columns = [c for c in TABLE_METRICS if any(c in m for m in results.values())]
    with open(comparison.path, "w") as fh:
        fh.write(comparison_markdown(results, columns, winner, metric, mode, verdict))
    tuning = tuning_section({e["model"]: e["run_id"] for e in entries})
    with open(report.path, "w") as fh:
        fh.write(comparison_html(results, columns, winner, metric, mode, preds, verdict, tuning))
    run_id = next(e["run_id"] for e in entries if e["model"] == winner)
    version = register_champion(run_id, cfg.evaluate.registered_model_name, promote=not failures)
    print(verdict)
    comparison.metadata.update({"winner": winner, "registered_version": version, "champion": not failures,
                                "gate": verdict})
    return winner
