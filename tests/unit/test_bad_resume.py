"""A resume with settings that differ from its checkpoint's: the config's lr applies, another optimizer is refused."""

from __future__ import annotations

import math

import pytest
import torch

from dl_uncertainty.errors import UserError
from dl_uncertainty.training.checkpoints import check_resumable
from dl_uncertainty.training.loop import train_model
from dl_uncertainty.training.schedule import lr_factor, steps_per_epoch

BASE = ["model=mc_dropout_dnn", "train.val_mc_samples=0", "train.checkpoint_every_s=0"]


def optimizer_groups(folder) -> list[dict]:
    return torch.load(folder / "last.pt", weights_only=True)["optimizer"]["param_groups"]


@pytest.mark.parametrize("schedule", ["none", "cosine"])
def test_a_resume_with_another_lr_trains_on_with_the_new_lr(tiny_cfg, digits_splits, tmp_path, capsys, schedule):
    train, val = digits_splits["train"], digits_splits["val"]
    first = tiny_cfg(*BASE, "train.epochs=2", "train.lr=0.001", f"train.lr_schedule={schedule}")
    train_model(first, train, val, checkpoint_dir=tmp_path, quiet=True)
    assert {g["lr"] for g in optimizer_groups(tmp_path)} == {0.001 * lr_factor(schedule, 2 * _steps(first, train),
                                                                             2 * _steps(first, train))}
    resumed = tiny_cfg(*BASE, "train.epochs=2", "train.epochs=3", "train.resume=true", "train.lr=0.05",
                       f"train.lr_schedule={schedule}")
    capsys.readouterr()
    train_model(resumed, train, val, checkpoint_dir=tmp_path, quiet=True)
    assert "changed: lr 0.001 -> 0.05" in capsys.readouterr().out
    total = 3 * _steps(resumed, train)  # the schedule of the resumed run: 3 epochs, at its end
    expected = 0.05 * lr_factor(schedule, total, total)
    (group,) = optimizer_groups(tmp_path)
    assert math.isclose(group["lr"], expected, rel_tol=1e-9)
    if schedule != "none":
        assert group["initial_lr"] == 0.05


def _steps(cfg, train) -> int:
    return steps_per_epoch(len(train.y), cfg.train.batch_size, cfg.train.accumulate_grad_batches)


def test_a_resume_with_another_weight_decay_applies_it(tiny_cfg, digits_splits, tmp_path):
    train, val = digits_splits["train"], digits_splits["val"]
    train_model(tiny_cfg(*BASE, "train.epochs=1"), train, val, checkpoint_dir=tmp_path, quiet=True)
    train_model(tiny_cfg(*BASE, "train.epochs=2", "train.resume=true", "train.weight_decay=0.01"), train, val,
                checkpoint_dir=tmp_path, quiet=True)
    assert [g["weight_decay"] for g in optimizer_groups(tmp_path)] == [0.01]


def test_a_resume_with_another_optimizer_is_refused_naming_the_key(tiny_cfg, digits_splits, tmp_path):
    train, val = digits_splits["train"], digits_splits["val"]
    train_model(tiny_cfg(*BASE, "train.epochs=1"), train, val, checkpoint_dir=tmp_path, quiet=True)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    for other in ("sgd", "adamw"):
        cfg = tiny_cfg(*BASE, "train.epochs=2", "train.resume=true", f"train.optimizer={other}")
        with pytest.raises(UserError, match=rf"written with train.optimizer=adam, this run sets train.optimizer={other}; "
                                            r"set train.optimizer=adam to resume it"):
            check_resumable(state, tmp_path / "last.pt", cfg, train.schema)


def test_a_resume_with_no_checkpoint_yet_says_it_trains_from_the_first_epoch(tiny_cfg, digits_splits, tmp_path,
                                                                              capsys):
    train, val = digits_splits["train"], digits_splits["val"]
    result = train_model(tiny_cfg(*BASE, "train.epochs=1", "train.resume=true"), train, val,
                         checkpoint_dir=tmp_path / "empty", quiet=True)
    assert f"no checkpoint at {tmp_path / 'empty' / 'last.pt'} yet; training from the first epoch" in \
        capsys.readouterr().out
    assert result.epochs_run == 1
