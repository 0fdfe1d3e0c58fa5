from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    val: Input[Dataset],
    test: Input[Dataset],
    ood: Input[Dataset],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    predictions: Output[Dataset],
):
    """MC-evaluate the model's uncertainty; log everything to its MLflow run and to KFP."""
    import json

    import mlflow
    from sklearn.metrics import confusion_matrix

    from dl_uncertainty.data.splits import load_split
    from dl_uncertainty.reports.evaluation import evaluate_model, html, save_predictions
    from dl_uncertainty.tracking import runs as tracking
    from dl_uncertainty.tracking import store
    from dl_uncertainty.tracking.bundle import load_bundle
    from dl_uncertainty.uncertainty.calibration import Calibration

    net, cfg, schema, meta = load_bundle(model.path)
    splits = {name: load_split(a.path, expect=schema, mmap=True) for name, a in {"val": val, "test": test}.items()}
    ood_split = load_split(ood.path, mmap=True)
    calibration = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None
    result = evaluate_model(net, cfg, splits["test"], ood_split, splits["val"], calibration=calibration)
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
    matrix = confusion_matrix(result.predictions["labels"], result.predictions["probs"].argmax(1),
                              labels=list(range(len(schema.class_names))))
    confusion.log_confusion_matrix(list(schema.class_names), matrix.tolist())
    with open(report.path, "w") as fh:
        fh.write(html(result))
    save_predictions(result, predictions.path)
    with open(metrics.path, "w") as fh:  # the file travels with the artifact to the compare step
        json.dump({"model": cfg.model.name, "run_id": meta["run_id"], "metrics": result.metrics}, fh)
    store.setup(cfg)
    with mlflow.start_run(run_id=meta["run_id"]):
        tracking.log_evaluation(result)
