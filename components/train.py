from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train(config: Input[Artifact], model_name: str, seed: int, fold: int, train: Input[Dataset], val: Input[Dataset],
          calib: Input[Dataset], model: Output[Model], val_rows: Output[Dataset]):
    """Train one model with model seed ``seed`` (early stopping on val), fit its calibration on calib,
    log it to MLflow, and export its weights + config + calibration into the Model artifact.
    ``fold`` >= 0 (K-fold cross-validation): train on the other folds of train + val, early-stop on
    fold ``fold``, every split in the scaling refitted on the fold's training part. ``val_rows``: the rows it early-stopped on, which evaluate reads as its validation."""
    from dl_uncertainty.config.compose import pick_config
    from dl_uncertainty.data.folds import fold_splits, rescaled
    from dl_uncertainty.data.splits import load_split, save_split
    from dl_uncertainty.tracking.bundle import save_bundle
    from dl_uncertainty.train import train_and_log

    cfg = pick_config(open(config.path).read(), model_name, seed, fold if fold >= 0 else None)
    train_split = load_split(train.path, mmap=True)  # trained in memory or streamed: data.stream
    val_split = load_split(val.path, expect=train_split.schema)
    calib_split = load_split(calib.path, expect=train_split.schema)
    if fold >= 0:
        train_split, val_split = fold_splits(train_split, val_split, cfg.pipeline.folds, fold, cfg.seed)
        calib_split = rescaled(calib_split, train_split.schema)  # the fold's scaling, refitted on its train part
    save_split(val_split, val_rows.path)
    trained = train_and_log(cfg, train_split, val_split, calib_split, checkpoint_dir=f"{model.path}.checkpoints")
    save_bundle(trained.model, cfg, train_split.schema, model.path, run_id=trained.run_id,
                calibration=trained.calibration.to_dict())
    model.metadata.update({"model_name": model_name, "seed": seed, "fold": fold, "mlflow_run_id": trained.run_id,
                           "best_val_acc": trained.result.best["val_acc"],
                           "best_val_nll": trained.result.best["val_nll"]})
