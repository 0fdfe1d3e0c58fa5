"""Train one model and log it to MLflow.

    python -m dl_uncertainty.train model=bnn
    python -m dl_uncertainty.train --multirun model=bnn,mc_dropout_dnn
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from dl_uncertainty.errors import Interrupted, UserError, check_writable

if TYPE_CHECKING:  # torch and MLflow load only when there is work: --help and bad input stay fast
    from torch import nn

    from dl_uncertainty.data.splits import Split
    from dl_uncertainty.training.loop import TrainResult
    from dl_uncertainty.uncertainty.calibration import Calibration


@dataclass
class TrainedRun:
    run_id: str
    model: nn.Module
    result: TrainResult
    calibration: Calibration


def train_and_log(
    cfg: DictConfig, train: Split | None = None, val: Split | None = None, calib: Split | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainedRun:
    """Train ``cfg.model`` (on ``cfg.data``, fold ``pipeline.fold`` when set, unless splits are given) inside
    a new MLflow run.

    ``train`` fits the weights, ``val`` stops training early (its NLL), and the calibration
    (temperature, conformal thresholds, abstain threshold) is fitted on ``calib`` only."""
    import mlflow
    import pandas as pd

    from dl_uncertainty.data.folds import prepare_run_splits
    from dl_uncertainty.data.rows import unscaled
    from dl_uncertainty.families.feature_density import threshold_on
    from dl_uncertainty.families.predict import served_log_probs
    from dl_uncertainty.reports.plots import training_curves
    from dl_uncertainty.tracking import runs as tracking
    from dl_uncertainty.tracking import store
    from dl_uncertainty.training.checkpoints import Checkpointer, check_resumable, data_meta
    from dl_uncertainty.training.loop import train_model
    from dl_uncertainty.uncertainty import calibration
    from dl_uncertainty.uncertainty.conformal import check_alpha

    checkpoint_dir = checkpoint_dir or cfg.train.checkpoint_dir or Path("checkpoints") / cfg.model.name
    check_writable(checkpoint_dir, "train.checkpoint_dir")
    if train is None and val is None and calib is None:
        splits = prepare_run_splits(cfg)  # pipeline.fold set: that fold's train and val
        train, val, calib = splits["train"], splits["val"], splits["calib"]
    elif train is None or val is None or calib is None:
        raise TypeError("train_and_log takes the train, val and calib splits together, or none of them")
    check_alpha(len(calib.y), cfg.evaluate.alpha)  # before training: the calibration split must be large enough
    check_mc_memory(cfg, [train, val, calib], len(train.schema.class_names))
    # a resumed training continues its MLflow run if the store still has it, so that one run holds every epoch
    resumed = Checkpointer(checkpoint_dir).load() if cfg.train.resume else None
    if resumed:  # refused here, before its MLflow run is reopened: a refused resume leaves that run as it was
        check_resumable(resumed, Path(checkpoint_dir) / "last.pt", cfg, train.schema)
    result = None
    continued = resumed.get("mlflow_run_id") if resumed else None
    if continued:  # its status, read in its store before start_run sets it RUNNING
        store.setup(cfg)
    was_finished = bool(continued) and tracking.live_run(continued) and \
        mlflow.get_run(continued).info.status == "FINISHED"
    try:
        with tracking.start_run(cfg, continue_run_id=resumed and resumed.get("mlflow_run_id")) as run:
            if resumed:
                _log_resumed(resumed, run.info.run_id, Path(checkpoint_dir) / "last.pt")
            try:
                result = train_model(
                    cfg, train, val,
                    # queued and sent in batches (flushed when the run ends): one round trip per epoch cost ~1 s
                    on_epoch=lambda epoch, metrics: mlflow.log_metrics(metrics, step=epoch, synchronous=False),
                    checkpoint_dir=checkpoint_dir,
                    checkpoint_meta={"mlflow_run_id": run.info.run_id, **data_meta(train.schema)},
                )
            except ValueError as err:  # the validation pass refuses NaN outputs: the weights went NaN
                if "contains NaN" not in str(err):
                    raise
                raise UserError(f"training diverged: the model's outputs became NaN or infinite; lower train.lr "
                                f"(now {cfg.train.lr:g}), or rescale data that holds huge values") from None
            mlflow.log_metrics({
                "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                "best_val_acc": result.best["val_acc"], "best_val_nll": result.best["val_nll"],
                "train_samples_per_second": result.samples_per_second,
            })
            mlflow.log_figure(training_curves(result.history), "figures/training_curves.png")
            threshold_on(result.model, calib.x, cfg)  # the density's abstain threshold, like the calibration: on calib
            fitted = calibration.fit(served_log_probs(result.model, calib.x, cfg).numpy(), calib.y, cfg.evaluate,
                                     rows=calib.x, seed=cfg.seed,
                                     check=lambda: (served_log_probs(result.model, val.x, cfg).numpy(), val.y))
            mlflow.log_dict(fitted.to_dict(), "calibration.json")
            example = pd.DataFrame(unscaled(train.x[:5], train.schema).round(6), columns=train.schema.feature_names or None)
            tracking.log_model(result.model, cfg, train.schema, example, fitted)
    except KeyboardInterrupt as err:  # the MLflow run ended KILLED; one line instead of a traceback
        if was_finished:
            mlflow.MlflowClient().set_terminated(continued, "FINISHED")
        raise Interrupted(_interrupted(err, result, Path(checkpoint_dir) / "last.pt")) from None
    except BaseException as err:
        if was_finished:  # a resume that failed leaves the run it continued as successful as it was
            mlflow.MlflowClient().set_terminated(continued, "FINISHED")
        if isinstance(err, RuntimeError) and "can't allocate memory" in str(err):
            raise UserError(f"out of memory ({str(err).split(': ', 1)[-1][:120]}); lower evaluate.mc_samples "
                            f"(now {cfg.evaluate.mc_samples}), train.val_mc_samples or train.batch_size") from None
        raise
    return TrainedRun(run.info.run_id, result.model, result, fitted)


def check_mc_memory(cfg: DictConfig, splits: list[Split], classes: int) -> None:
    """Refuse MC sample counts whose probabilities ([samples, rows, classes] float32, twice: log and
    plain) could not fit in this machine's memory, before any work (allocating them fails after training)."""
    import os

    samples = max(cfg.evaluate.mc_samples, cfg.train.val_mc_samples)
    rows = max(len(split.y) for split in splits)
    need = samples * rows * classes * 4 * 2
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        key = "evaluate.mc_samples" if cfg.evaluate.mc_samples >= cfg.train.val_mc_samples else "train.val_mc_samples"
        raise UserError(f"{key}={samples} needs about {need / 2**30:,.0f} GiB for the MC samples of {rows} rows x "
                        f"{classes} classes, more than this machine's {have / 2**30:.0f} GiB; lower {key} (e.g. 100)")


def _log_resumed(resumed: dict, run_id: str, path: Path) -> None:
    """Tag the run with the checkpoint it resumed from; a new run (the interrupted one is not in this
    store) gets the restored epochs' metrics too, at their own steps, so its curves start at epoch 1."""
    import time

    import mlflow
    from mlflow.entities import Metric

    previous = resumed.get("mlflow_run_id")
    mlflow.set_tag("resumed_from", f"{path} epoch {resumed['epoch']}" + (f" run {previous}" if previous else ""))
    if previous == run_id:
        return
    now = int(time.time() * 1000)
    restored = [Metric(key, float(value), now, step) for key, values in resumed["history"].items()
                for step, value in enumerate(values[: resumed["epoch"]], start=1)]
    for start in range(0, len(restored), 1000):  # MLflow's limit per batch
        mlflow.MlflowClient().log_batch(run_id, metrics=restored[start : start + 1000])


def _interrupted(err: KeyboardInterrupt, result: TrainResult | None, last: Path) -> str:
    """Which checkpoint a Ctrl-C left, naming its epoch: only one this run wrote or resumed from."""
    from dl_uncertainty.training.checkpoints import TrainingInterrupted

    resume = "resume with train.resume=true"
    if result is not None:  # after training: its last epoch is always saved
        return f"interrupted after training; epoch {result.epochs_run}'s checkpoint is at {last}; {resume}"
    if not isinstance(err, TrainingInterrupted):
        return "interrupted before training started"
    if err.path is None or not err.epoch:
        return "interrupted before the first epoch finished; no checkpoint was written"
    if err.written:
        return f"interrupted; epoch {err.epoch}'s checkpoint is at {err.path}; {resume}"
    return f"interrupted before an epoch finished; {err.path} still holds epoch {err.epoch}, as resumed; {resume}"


def _task(cfg: DictConfig) -> None:
    trained = train_and_log(cfg)
    best = trained.result.best
    print(
        f"{cfg.model.name}: run {trained.run_id}  best epoch {trained.result.best_epoch}  "
        f"val_acc {best['val_acc']:.4f}  val_nll {best['val_nll']:.4f}\n"
        f"  evaluate it: python -m dl_uncertainty.evaluate run_id={trained.run_id}"
    )


if __name__ == "__main__":
    from dl_uncertainty.cli import run

    run("train", __doc__, _task)
