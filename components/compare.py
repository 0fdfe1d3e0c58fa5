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
    """Table every model's metrics, pick the winner on validation metrics, register it in MLflow under
    its data's name (dl-uncertainty-<data>-<shape>) with alias 'champion' if it passes the gate."""
    from dl_uncertainty.steps import compare_models

    result = compare_models(open(config.path).read(), [m.path for m in metrics], [p.path for p in predictions])
    with open(comparison.path, "w") as fh:
        fh.write(result.markdown)
    with open(report.path, "w") as fh:
        fh.write(result.html)
    print(result.verdict)
    comparison.metadata.update({"winner": result.winner, "registered_model": result.registered_name,
                                "registered_version": result.registered_version,
                                "champion": result.champion, "gate": result.verdict})
    return result.winner
