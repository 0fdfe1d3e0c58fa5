import itertools

import pytest
from omegaconf import OmegaConf

from dl_uncertainty.cli import expand_sweeps
from dl_uncertainty.config.compose import (
    config_dir,
    config_from_json,
    flatten,
    load_config,
    to_json,
)
from dl_uncertainty.errors import UserError


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def test_every_group_combination_composes():
    groups = ["data", "model", "train", "evaluate"]
    combos = list(itertools.product(*(_options(g) for g in groups)))
    assert len(combos) >= 9
    for combo in combos:
        overrides = [f"{g}={o}" for g, o in zip(groups, combo, strict=True)]
        if combo[0] != "digits":
            overrides.append("data.path=some/file")
        cfg = load_config(overrides)
        assert cfg.model.name == combo[1]
        assert cfg.data.source == combo[0]


def test_defaults_are_the_documented_ones():
    cfg = load_config()
    assert (cfg.data.source, cfg.model.name, cfg.device) == ("digits", "bnn", "auto")
    assert list(cfg.data.ood_classes) == ["8", "9"]
    assert cfg.evaluate.mc_samples >= 1


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.epoch=3", "epoch"),
        ("model.hiden_sizes=[3]", "hiden_sizes"),
        ("train.epochs=abc", "train.epochs"),
        ("model.dropout=1.0", "model.dropout"),
        ("model.dropout=-0.1", "model.dropout"),
        ("train.epochs=0", "train.epochs"),
        ("evaluate.mc_samples=0", "evaluate.mc_samples"),
        ("model=nope", "model/nope"),
        ("data.missing=guess", "data.missing"),
        ("device=tpu", "device"),
        ("train.loss=hinge", "train.loss"),
        ("train.focal_gamma=-1", "train.focal_gamma"),
        ("train.focal_alpha=0", "train.focal_alpha"),
        ("train.mixup_alpha=0", "train.mixup_alpha must be > 0"),
        ("train.mixup_prob=1.5", "train.mixup_prob must be in [0, 1]"),
        ("train.cutmix_prob=-0.1", "train.cutmix_prob must be in [0, 1]"),
        ("train.keep_epoch=first", "train.keep_epoch"),
        ("train.keep_epoch=last", "set train.keep_epoch=best to stop early, or train.early_stopping_patience=0"),
    ],
)
def test_bad_config_is_a_user_error_naming_the_key(override, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.").replace("[", r"\[")) as info:
        load_config([override])
    assert "\n" not in str(info.value)


def test_mixup_and_cutmix_shares_add_up_to_at_most_one():
    with pytest.raises(UserError, match=r"train\.mixup_prob \+ train\.cutmix_prob must be <= 1"):
        load_config(["train.mixup_prob=0.6", "train.cutmix_prob=0.5"])
    assert load_config(["train.mixup_prob=0.5", "train.cutmix_prob=0.5"]).train.cutmix_prob == 0.5


def test_json_round_trip_keeps_every_value():
    cfg = load_config(["model=mc_dropout_dnn", "train.lr=0.01"])
    again = config_from_json(to_json(cfg))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg, resolve=True)  # JSON holds resolved values
    assert flatten(cfg)["train.lr"] == 0.01


def test_json_with_unknown_key_is_rejected():
    with pytest.raises(UserError, match="nonsense"):
        config_from_json('{"nonsense": 1}')


def test_sweeps_expand_to_the_cartesian_product():
    jobs = expand_sweeps(["model=bnn,mc_dropout_dnn", "seed=1,2", "train.lr=0.1"])
    assert len(jobs) == 4
    assert ["model=bnn", "seed=2", "train.lr=0.1"] in jobs
