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
    from dl_uncertainty.data.splits import save_split
    from dl_uncertainty.reports.eda import eda_html
    from dl_uncertainty.steps import prepared_splits

    splits = prepared_splits(pick_config(open(config.path).read()))
    report = eda_html(splits)  # before any split is written: a failure leaves no split behind
    for name, artifact in {"train": train, "val": val, "calib": calib, "test": test, "ood": ood}.items():
        save_split(splits[name], artifact.path)
        artifact.metadata.update({"examples": len(splits[name].y), "classes": splits[name].schema.class_names})
    with open(eda_report.path, "w") as fh:
        fh.write(report)
