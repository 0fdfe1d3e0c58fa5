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
    from dl_uncertainty.steps import train_branch

    model.metadata.update(train_branch(open(config.path).read(), model_name, seed, fold, train.path, val.path,
                                       calib.path, model.path, val_rows.path))
