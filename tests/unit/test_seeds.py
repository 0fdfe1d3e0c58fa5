"""Seeds as an axis: aggregation over seeds, the representative run, the noise verdict, the branches,
SEEDS=0 refused, and tune.seeds averaging a trial's objective."""

import math

import pytest

from dl_uncertainty.config.compose import branch_label, branches, load_config
from dl_uncertainty.errors import UserError
from dl_uncertainty.tracking import seeds as S
from tests.conftest import TINY


def _entries(table: dict[str, list[float]], metric: str = "nll", first_seed: int = 42) -> list[dict]:
    return [{"model": name, "seed": first_seed + i, "run_id": f"{name}-{i}", "metrics": {metric: v, "acc": 1 - v}}
            for name, values in table.items() for i, v in enumerate(values)]


def test_mean_and_sample_std_over_seeds():
    spreads = S.aggregate(_entries({"a": [0.10, 0.20, 0.30], "b": [0.5]}))
    assert spreads["a"]["nll"].mean == pytest.approx(0.2)
    assert spreads["a"]["nll"].std == pytest.approx(0.1)  # sample std (n - 1): sqrt((0.01 + 0 + 0.01) / 2)
    assert spreads["a"]["nll"].cell() == "0.2000 ± 0.1000"
    assert math.isnan(spreads["b"]["nll"].std) and spreads["b"]["nll"].cell() == "0.5000"  # one seed: no ±
    assert S.means(spreads)["a"]["acc"] == pytest.approx(0.8)


def test_non_finite_values_are_left_out_of_the_mean():
    entries = _entries({"a": [0.1, 0.3]})
    entries.append({"model": "a", "seed": 44, "run_id": "x", "metrics": {"nll": float("nan")}})
    assert S.aggregate(entries)["a"]["nll"].values == [0.1, 0.3]


def test_the_registered_run_is_the_median_seed_not_the_best():
    runs = S.by_family(_entries({"a": [0.30, 0.10, 0.20]}))["a"]
    assert S.median_seed(runs, "nll", "min")["run_id"] == "a-2"  # 0.20
    assert S.median_seed(runs, "acc", "max")["run_id"] == "a-2"
    two = S.by_family(_entries({"a": [0.30, 0.10]}))["a"]
    assert S.median_seed(two, "nll", "min")["run_id"] == "a-1"  # even: the better of the middle two


def test_a_consistent_lead_is_beyond_seed_noise():
    # differences b - a: 0.10, 0.12, 0.11 -> mean 0.11, sd 0.01, t(0.975, 2) = 4.3027
    entries = _entries({"a": [0.20, 0.21, 0.22], "b": [0.30, 0.33, 0.33]})
    (lead,) = S.leads(entries, "a", "nll", "min")
    assert lead.differences == pytest.approx([0.10, 0.12, 0.11])
    assert lead.mean == pytest.approx(0.11)
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert (lead.low, lead.high) == (pytest.approx(0.11 - half, abs=1e-6), pytest.approx(0.11 + half, abs=1e-6))
    assert lead.wins == 3 and lead.beyond_noise is True
    text = S.noise_verdict("a", "nll", [lead])
    assert "better on 3 of 3 seeds: beyond seed noise" in text and "[0.0852, 0.1348]" in text


def test_a_lead_that_flips_sign_across_seeds_is_within_noise():
    entries = _entries({"a": [0.20, 0.30, 0.25], "b": [0.30, 0.25, 0.27]})  # differences 0.10, -0.05, 0.02
    (lead,) = S.leads(entries, "a", "nll", "min")
    assert lead.wins == 2 and lead.low < 0 < lead.high and lead.beyond_noise is False
    assert "within seed noise" in S.noise_verdict("a", "nll", [lead])


def test_pairs_follow_the_seed_and_max_metrics_flip_the_sign():
    entries = _entries({"a": [0.9, 0.8]}, metric="acc2") + _entries({"b": [0.7]}, metric="acc2", first_seed=43)
    (lead,) = S.leads(entries, "a", "acc2", "max")
    assert lead.differences == pytest.approx([0.1])  # only seed 43 is shared: 0.8 - 0.7


def test_one_seed_says_noise_is_not_measured():
    entries = _entries({"a": [0.2], "b": [0.3]})
    found = S.leads(entries, "a", "nll", "min")
    assert found[0].beyond_noise is None
    assert S.noise_verdict("a", "nll", found).startswith("One seed: noise not measured")


def test_the_markdown_shows_mean_and_std_and_the_registered_seed():
    entries = _entries({"a": [0.20, 0.21, 0.22], "b": [0.30, 0.33, 0.33]})
    spreads = S.aggregate(entries)
    text = S.spread_markdown(spreads, ["nll", "acc"], "a", "nll", "min", S.median_seed(entries[:3], "nll", "min"),
                             "noise.", "gate.")
    assert "| a | 3 | 0.2100 ± 0.0100 |" in text
    assert "lowest nll: 0.2100 mean over 3 seeds" in text and "median seed, 43 (run a-1)" in text


def test_branches_cover_every_family_times_every_seed():
    found = branches(["bnn", "mc_dropout_dnn"], 3, 42)
    assert found == [{"model": m, "seed": s, "fold": -1} for m in ("bnn", "mc_dropout_dnn") for s in (42, 43, 44)]
    assert branch_label("bnn", 43, 3) == "bnn-seed43" and branch_label("bnn", 42, 1) == "bnn"


@pytest.mark.parametrize("key", ["pipeline.seeds", "tune.seeds"])
def test_zero_seeds_is_refused_naming_the_key(key):
    with pytest.raises(UserError, match=rf"^{key} must be >= 1 .*got 0$"):
        load_config([f"{key}=0"])


def test_make_run_seeds_0_is_one_line_naming_the_key(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    installed = tmp_path / "installed"  # newer than pyproject.toml: make installs nothing
    installed.touch()
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "run", "SEEDS=0", f"PY={sys.executable}",
                           f"INSTALLED={installed}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "pipeline.seeds" in line]
    assert len(errors) == 1 and "pipeline.seeds must be >= 1" in errors[0]


def test_a_tuning_trial_averages_its_objective_over_tune_seeds(tmp_path, monkeypatch):
    import optuna

    from dl_uncertainty.training.loop import train_model
    from dl_uncertainty.training.tuning import Sweep, _splits, apply, run_trial

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config([*TINY, "model=mc_dropout_dnn", "train.epochs=2", "tune.seeds=2", "tune.pruner=none"])
    from dl_uncertainty.tracking.store import setup

    setup(cfg)
    study = optuna.create_study(direction="minimize")
    (value,) = run_trial(study.ask(), Sweep(cfg, "s", None, 1), {})
    import json

    from omegaconf import OmegaConf

    train, val = _splits(json.dumps(OmegaConf.to_container(cfg.data, resolve=True)), cfg.seed)
    each = [train_model(apply(cfg, {"seed": cfg.seed + i}), train, val, quiet=True).best["val_nll"] for i in (0, 1)]
    assert each[0] != pytest.approx(each[1])  # the seeds differ, so the mean is not either one
    assert value == pytest.approx(sum(each) / 2, rel=1e-5)
