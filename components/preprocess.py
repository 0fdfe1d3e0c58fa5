from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preprocess(
    config: Input[Artifact],
    train: Output[Dataset],
    val: Output[Dataset],
    calib: Output[Dataset],
    test: Output[Dataset],
    ood: Output[Dataset],
    eda_report: Output[HTML],
):
    """Load, clean and split the data; write the five splits (train, val, calib, test, ood) and the EDA report."""
    from dl_uncertainty.config.compose import pick_config
    from dl_uncertainty.data.folds import check_folds, pooled_labels
    from dl_uncertainty.data.splits import dropped_rows_line, save_split
    from dl_uncertainty.data.tables import prepare as prepare_splits
    from dl_uncertainty.reports.eda import eda_html
    from dl_uncertainty.uncertainty.conformal import check_alpha

    cfg = pick_config(open(config.path).read())
    splits = prepare_splits(cfg.data, cfg.seed)
    check_alpha(len(splits["calib"].y), cfg.evaluate.alpha)
    check_folds(pooled_labels(splits["train"], splits["val"]), cfg.pipeline.folds, splits["train"].schema.class_names)
    if dropped := dropped_rows_line(splits["train"].schema):
        print(dropped)
    report = eda_html(splits)  # before any split is written: a failure leaves no split behind
    for name, artifact in {"train": train, "val": val, "calib": calib, "test": test, "ood": ood}.items():
        save_split(splits[name], artifact.path)
        artifact.metadata.update({"examples": len(splits[name].y), "classes": splits[name].schema.class_names})
    with open(eda_report.path, "w") as fh:
        fh.write(report)
