"""Behaviours the rest of the suite relied on without checking: each test fails when its behaviour breaks."""

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.rows import to_images, to_rows, unscaled
from dl_uncertainty.data.tables import prepare
from dl_uncertainty.families.deep_ensemble import Ensemble
from dl_uncertainty.families.predict import predict_log_probs
from dl_uncertainty.reports import plots
from dl_uncertainty.reports.evaluation import evaluate_model
from dl_uncertainty.train import train_and_log
from dl_uncertainty.training.loop import train_model
from dl_uncertainty.uncertainty import metrics as M
from tests.conftest import TINY


def test_a_deep_ensemble_trains_distinct_members_and_predicts_one_sample_per_member(tiny_cfg, digits_splits):
    cfg = tiny_cfg("model=deep_ensemble", "model.ensemble_size=3")
    test = digits_splits["test"]
    model = train_model(cfg, digits_splits["train"], digits_splits["val"], quiet=True).model
    assert isinstance(model, Ensemble) and len(model.members) == 3
    first_layers = [next(m.parameters()).detach() for m in model.members]
    assert not torch.equal(first_layers[0], first_layers[1]) and not torch.equal(first_layers[1], first_layers[2])

    log_probs = predict_log_probs(model, test.x, samples=50).numpy()  # members are the samples, not 50
    assert log_probs.shape == (3, len(test.y), len(test.schema.class_names))
    assert np.allclose(np.exp(log_probs).sum(-1), 1, atol=1e-5)
    assert np.abs(log_probs[0] - log_probs[1]).max() > 1e-3  # members disagree somewhere
    assert M.accuracy(log_probs, test.y) > 0.8


def test_the_confusion_matrix_has_true_classes_as_rows_and_predictions_as_columns():
    labels, preds = [0, 0, 0, 1, 2], [1, 1, 0, 1, 1]  # true 0 predicted as 1 twice; nothing predicted as 2
    fig = plots.confusion_matrix_plot(labels, preds, ["a", "b", "c"])
    ax = fig.axes[0]
    assert np.asarray(ax.images[0].get_array()).tolist() == [[1, 2, 0], [0, 1, 0], [0, 1, 0]]
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("true class", "predicted class")


def test_the_served_models_predicted_class_is_the_name_of_its_most_probable_class(in_tmp):
    cfg = load_config([*TINY, "model=mc_dropout_dnn", "data.ood_classes=[0,1]"])  # class i is named str(i + 2)
    splits = prepare(cfg.data, cfg.seed)
    run_id = train_and_log(cfg, splits["train"], splits["val"], splits["calib"]).run_id
    test = splits["test"]
    raw = pd.DataFrame(unscaled(test.x[:60], test.schema), columns=test.schema.feature_names)
    frame = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(raw)
    columns = [c for c in frame.columns if c.startswith("prob_")]
    assert [c.removeprefix("prob_") for c in columns] == test.schema.class_names
    expected = [columns[i].removeprefix("prob_") for i in frame[columns].to_numpy().argmax(1)]
    assert frame["predicted_class"].tolist() == expected
    truth = [test.schema.class_names[i] for i in test.y[:60]]
    assert np.mean(frame["predicted_class"].to_numpy() == np.array(truth)) > 0.5


def test_accuracy_at_a_coverage_that_is_not_a_whole_number_of_examples_rounds_up():
    confidence = np.linspace(1.0, 0.1, 10)  # already most confident first
    correct = np.array([1, 1, 1, 1, 1, 0, 1, 0, 0, 0])
    # 0.55 of 10 examples is 5.5: the 6 most confident are kept (5 right); 5 would give 1.0, 7 would give 6/7
    assert M.accuracy_at_coverage(confidence, correct, 0.55) == pytest.approx(5 / 6)
    assert M.accuracy_at_coverage(confidence, correct, 0.5) == pytest.approx(1.0)
    # 4.5 and 6.5 examples: round() (to even) and floor keep 4 and 6, the rule (ceil) keeps 5 and 7
    assert M.accuracy_at_coverage(confidence, correct, 0.65) == pytest.approx(6 / 7)
    fifth_wrong = np.array([1, 1, 1, 1, 0, 0, 1, 0, 0, 0])
    assert M.accuracy_at_coverage(confidence, fifth_wrong, 0.45) == pytest.approx(4 / 5)


def test_images_and_rows_round_trip_through_the_training_scaler(digits_splits):
    test = digits_splits["test"]
    images = to_images(test.x, test.schema)
    assert images.shape == (len(test.x), 1, 8, 8)
    assert images.min() >= -1e-4 and images.max() <= 16 + 1e-4 and images.max() > 15  # digits' pixels: 0..16
    assert np.allclose(to_rows(images, test.schema), test.x, atol=1e-5)


class _Recorder(nn.Module):
    """A deterministic classifier that keeps every input it is given."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.seen: list[np.ndarray] = []

    def forward(self, x):
        self.seen.append(x.detach().numpy().copy())
        return self.linear(x)


def test_far_ood_and_shifted_inputs_reach_the_model_scaled_like_the_training_data(tiny_cfg, digits_splits):
    test, ood = digits_splits["test"], digits_splits["ood"]
    center, scale = (np.asarray(test.schema.cleaning[k]) for k in ("center", "scale"))
    model = _Recorder(test.x.shape[1], len(test.schema.class_names))
    cfg = tiny_cfg()
    result = evaluate_model(model, cfg, test, ood, with_figures=False)
    from dl_uncertainty.uncertainty.far_ood import FAR_KINDS

    sets = 3 + len(M.CORRUPTIONS) * 5 + len(FAR_KINDS)
    # test, far-OOD, OOD, every shifted set and every generated far-OOD kind, each T times (a network no
    # family declares deterministic), plus one point-estimate pass each for the energy score
    assert len(model.seen) == sets * (cfg.evaluate.mc_samples + 1)
    for rows in model.seen:  # un-scaled with the training scaler, every input is a digits image (pixels 0..16)
        pixels = rows * scale + center
        assert pixels.min() >= -1e-3 and pixels.max() <= 16 + 1e-3
    far = result.predictions["far_ood_x"]
    assert any(np.array_equal(far, rows) for rows in model.seen)
    assert (far * scale + center).max() > 15  # uniform over the whole pixel range, then scaled


def test_npz_labels_stored_as_whole_floats_name_the_same_classes_as_integers(tmp_path):
    x = np.random.default_rng(0).random((160, 4))
    for name, y, classes in (("whole", np.repeat([0.0, 1.0, 2.0, 3.0], 40), ["0", "1", "3"]),
                             ("halves", np.repeat([0.5, 1.0, 2.0, 3.0], 40), ["0.5", "1.0", "3.0"])):
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
        ood = "2" if name == "whole" else "2.0"
        cfg = load_config(["data=npz", f"data.path={tmp_path / name}.npz", f"data.ood_classes=[{ood}]"])
        schema = prepare(cfg.data, cfg.seed)["ood"].schema
        assert (schema.class_names, schema.ood_class_names) == (classes, [ood])
