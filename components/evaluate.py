from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    val: Input[Dataset],
    calib: Input[Dataset],
    test: Input[Dataset],
    ood: Input[Dataset],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    predictions: Output[Dataset],
):
    """MC-evaluate the model's uncertainty (selection metrics on val, the calibration's own numbers on
    calib, reported metrics on test); log everything to its MLflow run and to KFP."""
    from dl_uncertainty.steps import evaluate_bundle, write_evaluation

    write_evaluation(evaluate_bundle(model.path, val.path, calib.path, test.path, ood.path,
                                     predictions_path=predictions.path), metrics, confusion, report)
