"""K-fold cross-validation: the folds, their bad inputs, and the fold models scored together."""

import numpy as np
import pytest

from dl_uncertainty.config.compose import branch_label, branches, load_config
from dl_uncertainty.data.folds import (
    check_folds,
    fold_positions,
    fold_splits,
    pooled_labels,
    refit_scaling,
    rescaled,
)
from dl_uncertainty.data.rows import unscaled
from dl_uncertainty.data.splits import Schema, Split
from dl_uncertainty.errors import UserError
from dl_uncertainty.tracking import folds as F
from dl_uncertainty.tracking import seeds as S
from dl_uncertainty.uncertainty import metrics as M


def test_folds_are_disjoint_stratified_and_hold_out_every_training_row_exactly_once(digits_splits):
    train, val = digits_splits["train"], digits_splits["val"]
    labels = pooled_labels(train, val)
    held = fold_positions(labels, 5, seed=42)
    counted = np.bincount(np.concatenate(held), minlength=len(labels))
    assert len(held) == 5 and (counted == 1).all()  # disjoint, and together every row once
    per_class = np.array([np.bincount(labels[h], minlength=labels.max() + 1) for h in held])
    assert (per_class.max(0) - per_class.min(0) <= 1).all()  # stratified: each class spread evenly
    pooled = raw(np.concatenate([train.x, val.x]), train.schema)
    seen = []
    for k in range(5):
        fold_train, fold_val = fold_splits(train, val, 5, k, seed=42)
        assert len(fold_train.y) + len(fold_val.y) == len(labels)
        np.testing.assert_array_equal(raw(fold_val.x, fold_val.schema), pooled[held[k]])
        rows = {r.tobytes() for r in raw(fold_val.x, fold_val.schema)}
        assert not rows & {r.tobytes() for r in raw(fold_train.x, fold_train.schema)}  # no held-out row is trained on
        seen.extend(raw(fold_val.x, fold_val.schema))
    assert sorted(r.tobytes() for r in seen) == sorted(r.tobytes() for r in pooled)
    assert not all(np.array_equal(a, b) for a, b in zip(held, fold_positions(labels, 5, seed=7), strict=True))


def raw(x: np.ndarray, schema) -> np.ndarray:
    """Rows back to the data's own values (digits: whole numbers 0-16), whatever scaling they are in."""
    return np.round(unscaled(np.asarray(x, np.float64), schema), 3) + 0.0


def test_each_fold_refits_the_scaler_on_its_own_training_part(digits_splits):
    train, val = digits_splits["train"], digits_splits["val"]
    fold_train, fold_val = fold_splits(train, val, 5, 2, seed=42)
    values = raw(fold_train.x, fold_train.schema)  # digits: one mean and std over every pixel ("global")
    assert fold_train.schema.cleaning["center"][0] == pytest.approx(values.mean(), rel=1e-6)
    assert fold_train.schema.cleaning["scale"][0] == pytest.approx(values.std(), rel=1e-6)
    assert fold_train.schema.cleaning["center"] != train.schema.cleaning["center"]
    assert fold_val.schema.cleaning == fold_train.schema.cleaning
    assert abs(float(np.mean(fold_train.x))) < 1e-5  # centred on its own rows, not on the train split's
    test = rescaled(digits_splits["test"], fold_train.schema)  # what the fold model is scored on
    np.testing.assert_array_equal(raw(test.x, test.schema), raw(digits_splits["test"].x, digits_splits["test"].schema))
    assert rescaled(test, fold_train.schema) is test and rescaled(train, train.schema) is train


def test_images_refit_each_channels_mean_and_std():
    rng = np.random.default_rng(0)
    pixels = rng.random((50, 2, 3, 3)) * np.array([1.0, 0.3]).reshape(1, 2, 1, 1)  # two channels, [0, 1]
    center, scale = np.repeat([0.4, 0.2], 9), np.repeat([0.25, 0.1], 9)
    schema = Schema([2, 3, 3], ["a", "b"], [], "npz", {"scaling": "per-channel mean/std (fitted on train)",
                                                         "center": center.tolist(), "scale": scale.tolist()})
    split = Split(((pixels.reshape(50, 18) - center) / scale).astype(np.float32), np.arange(50) % 2, schema)
    fit = refit_scaling(split)
    assert fit["center"][:9] == pytest.approx([pixels[:, 0].mean()] * 9, rel=1e-5)
    assert fit["scale"][9:] == pytest.approx([pixels[:, 1].std()] * 9, rel=1e-4)
    given = Split(split.x, split.y, Schema(**{**schema.__dict__, "cleaning": {**schema.cleaning,
                                                                            "scaling": "per-channel mean/std (given)"}}))
    assert refit_scaling(given) is None


def test_more_folds_than_rows_of_the_smallest_class_is_one_line_naming_the_key():
    labels = np.array([0] * 10 + [1] * 3)
    check_folds(labels, 3, ["cat", "dog"])
    with pytest.raises(UserError, match=r"^pipeline.folds=4 is more than the 3 training rows .* of class 'dog'.*"
                                        r"lower pipeline.folds to at most 3$"):
        check_folds(labels, 4, ["cat", "dog"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["pipeline.folds=1"], "pipeline.folds must be 0 (no cross-validation) or at least 2 (K-fold cross-validation), got 1"),
    (["pipeline.folds=-2"], "pipeline.folds must be 0"),
    (["pipeline.folds=5", "pipeline.seeds=3"], "pipeline.folds=5 with pipeline.seeds=3: cross-validation trains one "
                                               "model seed per fold; set pipeline.seeds=1 or pipeline.folds=0"),
    (["pipeline.folds=2", "pipeline.fold=2"], "pipeline.fold must be -1 (none) or a fold 0 .. pipeline.folds - 1"),
])
def test_bad_fold_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(UserError) as info:
        load_config(overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_branches_cover_every_family_times_every_fold():
    found = branches(["bnn", "mc_dropout_dnn"], 1, 42, folds=3)
    assert found == [{"model": m, "seed": 42, "fold": k} for m in ("bnn", "mc_dropout_dnn") for k in range(3)]
    assert branch_label("bnn", 42, 1, fold=2) == "bnn-fold2"


def _fold_predictions(tmp_path, rng, name, k, val_rows, test_labels, ood_n):
    def probs(n):
        p = rng.dirichlet(np.ones(3), size=n)
        return p.astype(np.float32)

    pred = {"val_probs": probs(len(val_rows)), "val_labels": val_rows, "probs": probs(len(test_labels)),
            "labels": test_labels, "ood_probs": probs(ood_n)}
    path = tmp_path / f"{name}-{k}.npz"
    np.savez(path, **pred)
    log = {key: np.log(pred[key])[None] for key in ("val_probs", "probs")}
    metrics = {**M.summarize(log["probs"], test_labels, np.log(pred["ood_probs"])[None]),
               **{f"val_{m}": v for m, v in M.summarize(log["val_probs"], val_rows).items()}}
    return {"model": name, "seed": 42, "fold": k, "run_id": f"{name}-{k}", "metrics": metrics,
            "predictions": str(path)}, pred


def test_out_of_fold_metrics_pool_every_fold_and_the_fold_ensemble_averages_on_test(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 30)
    held = fold_positions(labels, 3, seed=1)
    test_labels = rng.integers(0, 3, 12)
    made = [_fold_predictions(tmp_path, rng, "a", k, labels[h], test_labels, 8) for k, h in enumerate(held)]
    entries = [e for e, _ in made]
    (found,) = F.cross_validation(entries).values()
    pooled = np.concatenate([p["val_probs"] for _, p in made])
    assert found["rows"] == 30 and found["folds"] == 3
    assert found["out_of_fold"]["nll"] == pytest.approx(-np.mean(np.log(pooled[np.arange(30), labels[np.concatenate(held)]])),
                                                        rel=1e-5)
    assert found["per_fold"]["nll"].mean == pytest.approx(np.mean([e["metrics"]["val_nll"] for e in entries]))
    ensemble = np.mean([p["probs"] for _, p in made], axis=0)
    assert found["ensemble"]["acc"] == pytest.approx(np.mean(ensemble.argmax(1) == test_labels))
    assert 0 <= found["ensemble"]["auroc_entropy"] <= 1
    text = F.cv_markdown({"a": found})
    assert "## 3-fold cross-validation" in text and "| a | out of fold, pooled | 30 | " in text
    assert "| a | test, the 3 fold models as one ensemble | 12 | " in text


def test_the_html_comparison_carries_the_cross_validation_table(tmp_path):
    from dl_uncertainty.reports.render import format_value
    from dl_uncertainty.tracking.compare import comparison_html

    rng = np.random.default_rng(1)
    labels, test_labels = rng.integers(0, 3, 30), rng.integers(0, 3, 12)
    made = [_fold_predictions(tmp_path, rng, "a", k, labels[h], test_labels, 8)
            for k, h in enumerate(fold_positions(labels, 3, seed=1))]
    found = F.cross_validation([e for e, _ in made])
    page = comparison_html({"a": {"val_nll": 0.5, "nll": 0.6}}, ["nll"], "a", "val_nll", "min",
                           {"a": {"probs": made[0][1]["probs"], "labels": test_labels}},
                           cross_validation=F.cv_section(found))
    assert "<h2>3-fold cross-validation</h2>" in page and "not registered" in page
    ensemble_acc = format_value(found["a"]["ensemble"]["acc"])
    row = next(r for r in page.split("<tr>") if "fold models as one ensemble" in r)
    assert f">{ensemble_acc}</td>" in row and ">12</td>" in row


def test_folds_pair_the_families_fold_by_fold():
    entries = [{"model": m, "seed": 42, "fold": k, "run_id": f"{m}{k}", "metrics": {"nll": v}}
               for m, values in {"a": [0.1, 0.2, 0.3], "b": [0.2, 0.4, 0.3]}.items() for k, v in enumerate(values)]
    (lead,) = S.leads(entries, "a", "nll", "min")
    assert lead.differences == pytest.approx([0.1, 0.2, 0.0])  # with one seed, only folds tell them apart
    verdict = S.noise_verdict("a", "nll", [lead], over=S.axis(entries))
    assert "3 paired folds" in verdict and "Folds share training rows" in verdict


def test_a_plain_training_run_with_pipeline_fold_early_stops_on_that_fold(tiny_cfg, digits_splits, tmp_path):
    from dl_uncertainty.data.folds import prepare_run_splits
    from dl_uncertainty.train import train_and_log
    from dl_uncertainty.training.loop import evaluate_split

    cfg = tiny_cfg("model=mc_dropout_dnn", "train.epochs=1", "train.val_mc_samples=0", "pipeline.folds=3",
                   "pipeline.fold=1", f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                   f"train.checkpoint_dir={tmp_path / 'ckpt'}")
    splits = prepare_run_splits(cfg)
    fold_val = fold_splits(digits_splits["train"], digits_splits["val"], 3, 1, cfg.seed)[1]
    np.testing.assert_array_equal(splits["val"].x, fold_val.x)
    assert all(split.schema.cleaning == fold_val.schema.cleaning for split in splits.values())  # one scaling
    trained = train_and_log(cfg)  # as `python -m dl_uncertainty.train pipeline.folds=3 pipeline.fold=1` does
    epoch_nll = trained.result.history["val_nll"][0]
    assert epoch_nll == pytest.approx(evaluate_split(trained.model, fold_val, 0)["nll"], abs=1e-6)
    assert epoch_nll != pytest.approx(evaluate_split(trained.model, digits_splits["val"], 0)["nll"], abs=1e-6)


def test_preprocess_refuses_more_folds_than_a_class_has_rows_as_the_pipeline_does(tmp_path):
    from dl_uncertainty.preprocess import _task

    with pytest.raises(UserError, match=r"^pipeline.folds=200 is more than the \d+ training rows"):
        _task(load_config([f"data_dir={tmp_path}", "pipeline.folds=200"]))
    assert not list(tmp_path.iterdir())  # refused before any split is written
