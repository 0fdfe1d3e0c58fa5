"""The search space: Hydra sweep syntax -> Optuna ranges, checked against the typed config."""

import pytest

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.errors import UserError
from dl_uncertainty.training.tuning import Sweep, compose, parse_param, search_space


@pytest.mark.parametrize(("text", "expected"), [
    ("interval(0.1, 0.5)", dict(kind="float", low=0.1, high=0.5, log=False)),
    ("tag(log, interval(1e-4, 1e-2))", dict(kind="float", low=1e-4, high=1e-2, log=True)),
    ("int(interval(16, 128))", dict(kind="int", low=16, high=128)),
    ("range(8, 64, step=8)", dict(kind="int", low=8, high=56, step=8)),
    ("range(0.1, 0.45, step=0.1)", dict(kind="float", low=0.1, high=pytest.approx(0.4), step=0.1)),
])
def test_ranges_become_optuna_ranges(text, expected):
    param = parse_param("train.x", text)
    for key, value in expected.items():
        assert getattr(param, key) == value, key


def test_choices_of_lists_get_optuna_safe_labels():
    param = parse_param("model.hidden_sizes", "choice([256, 256], [512], 7, relu)")
    assert param.kind == "categorical"
    assert param.choices == {"[256, 256]": [256, 256], "[512]": [512], 7: 7, "relu": "relu"}
    assert param.label([512]) == "[512]"


@pytest.mark.parametrize(("text", "needle"), [
    ("interval(0.5, 0.1)", "inverted range"),
    ("interval(0.1, 0.1)", "empty range"),
    ("range(5, 5)", "range is empty"),
    ("tag(log, interval(0, 1))", "log range needs low > 0"),
    ("0.1", "is not a search range"),
    ("interval(a, 1)", "cannot parse"),
])
def test_bad_ranges_are_one_line_user_errors(text, needle):
    with pytest.raises(UserError, match=needle) as info:
        parse_param("train.lr", text)
    assert "\n" not in str(info.value) and "train.lr" in str(info.value)


def test_every_configured_space_is_valid():
    cfg = load_config()
    for family in cfg.tune.space:
        assert search_space(load_config([f"model={family}"]))


@pytest.mark.parametrize(("override", "needle"), [
    ("train.lrr=interval(0.1, 0.2)", "'train.lrr' is not a data.*, model.* or train.* config key"),
    ("seed=choice(1, 2)", "'seed' is not a data.*, model.* or train.* config key"),
    ("model.dropout=interval(0.5, 1.5)", "model.dropout must be in"),  # every bound must be a valid config
    ("train.batch_size=choice(32, abc)", "train.batch_size"),
])
def test_the_space_is_checked_against_the_config(override, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.").replace("*", r"\*")):
        compose(["model=mc_dropout_dnn", override])


def test_command_line_sweeps_join_the_space_and_plain_values_fix_keys():
    cfg = compose(["model=bnn", "train.lr=0.002", "train.weight_decay=tag(log, interval(1e-6, 1e-3))"])
    space = search_space(cfg)
    assert "train.lr" not in space and cfg.train.lr == 0.002
    assert space["train.weight_decay"].log and "model.prior_sigma" in space


def test_budget_and_objectives_are_checked():
    with pytest.raises(UserError, match="tune.n_trials must be >= 1"):
        load_config(["tune.n_trials=0"])
    with pytest.raises(UserError, match="tune.objectives"):
        load_config(["tune.objectives=[val_loss]"])


@pytest.mark.parametrize(("trials", "workers"), [(10, 2), (7, 3), (1, 4), (0, 2)])
def test_worker_shares_add_up_to_the_budget(trials, workers):
    sweep = Sweep(load_config(), "s", "r", trials)
    shares = [sweep.share(w, workers) for w in range(workers)]
    assert sum(shares) == trials and max(shares) - min(shares) <= 1
