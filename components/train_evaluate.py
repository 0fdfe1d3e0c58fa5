from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def train_evaluate(
    config: Input[Artifact],
    model_name: str,
    seed: int,
    fold: int,
    train: Input[Dataset],
    val: Input[Dataset],
    calib: Input[Dataset],
    test: Input[Dataset],
    ood: Input[Dataset],
    model: Output[Model],
    val_rows: Output[Dataset],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    predictions: Output[Dataset],
):
    """``train`` then ``evaluate`` in one process, with the outputs of both: what a kfp.local branch runs,
    where a second task would start Python and import torch, MLflow and the rest again (seconds of CPU
    per branch on a small dataset). The evaluation reads the bundle back, as the evaluate task does."""
    from dl_uncertainty.steps import evaluate_bundle, train_branch, write_evaluation

    model.metadata.update(train_branch(open(config.path).read(), model_name, seed, fold, train.path, val.path,
                                       calib.path, model.path, val_rows.path))
    write_evaluation(evaluate_bundle(model.path, val_rows.path, calib.path, test.path, ood.path,
                                     predictions_path=predictions.path), metrics, confusion, report)
