from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def tune_report(
    study: Input[Artifact],
    trials: Input[List[Metrics]],
    best: Output[Metrics],
    tuned: Output[Artifact],
    report: Output[HTML],
) -> str:
    """The best trial as configs/tuned/<model>.yaml, history and importance figures, the HTML report;
    all logged to the parent MLflow run as well. ``trials`` (one per worker) only makes it wait for all."""
    from dl_uncertainty.reports.sweep import finish
    from dl_uncertainty.training.tuning import Sweep

    summary = finish(Sweep.from_json(open(study.path).read()))
    for name, value in {**summary.best, **{f"baseline_{k}": v for k, v in (summary.baseline or {}).items()},
                        **{f"trials_{k}": n for k, n in summary.counts.items()}}.items():
        best.log_metric(name, value)
    with open(tuned.path, "w") as fh:
        fh.write(summary.tuned_yaml)
    tuned.metadata.update({"save_as": f"configs/tuned/{summary.model}.yaml", "best_trial": summary.best_trial})
    with open(report.path, "w") as fh:
        fh.write(summary.html)
    return f"{summary.model}: trial {summary.best_trial} of study {summary.study_name}"
