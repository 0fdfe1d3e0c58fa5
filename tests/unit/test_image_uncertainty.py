"""Image uncertainty: outlier exposure with synthetic outliers, the last-layers Bayesian CNN, the
k-nearest-neighbour feature density, and the clear error when a model has no density to abstain on."""

import math

import numpy as np
import pytest
import torch
import torchbnn
from torch import nn

from dl_uncertainty.data.rows import to_images, to_rows
from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import build_model, family_of
from dl_uncertainty.families.feature_density import (
    DENSITY_ATTR,
    FeatureDensity,
    density_of,
    log_density,
)
from dl_uncertainty.families.outliers import (
    _jigsaw,
    _permuted,
    _smeared,
    synthetic_outliers,
    uniform_loss,
)
from dl_uncertainty.families.predict import predict_log_probs
from dl_uncertainty.training import loop
from dl_uncertainty.uncertainty import metrics as M
from dl_uncertainty.uncertainty.far_ood import far_ood
from dl_uncertainty.uncertainty.knn_density import KNNDensity

CNN = ["model.arch=cnn", "model.conv_channels=[8,16]", "model.conv_dropout=false"]


def _images(split, n=32):
    return torch.as_tensor(np.asarray(split.x[:n], np.float32)).reshape(n, *split.schema.feature_shape)


def test_outliers_keep_the_pixels_but_not_the_shape(digits_splits):
    images = _images(digits_splits["test"])
    for scramble in (_permuted, _jigsaw):
        out = scramble(images)
        assert out.shape == images.shape
        flat, before = out.reshape(len(out), -1), images.reshape(len(images), -1)
        torch.testing.assert_close(flat.sort(dim=1).values, before.sort(dim=1).values)  # same pixel values
        assert (flat != before).any(dim=1).float().mean() > 0.9  # ... in other places
    smeared = _smeared(images)
    # a box blur of a two-image average: far less pixel-to-pixel variation than either image
    assert smeared.diff(dim=-1).abs().mean() < 0.6 * images.diff(dim=-1).abs().mean()
    rows = synthetic_outliers(images.reshape(len(images), -1), list(images.shape[1:]), 10)
    assert rows.shape == (10, images[0].numel()) and torch.isfinite(rows).all()


def test_uniform_loss_is_zero_exactly_at_the_uniform_prediction():
    assert uniform_loss(torch.zeros(4, 10)).item() == pytest.approx(0.0, abs=1e-6)
    confident = torch.tensor([[10.0, 0.0, 0.0]])
    expected = -torch.log_softmax(confident, -1).mean().item() - math.log(3)
    assert uniform_loss(confident).item() == pytest.approx(expected) and expected > 1


@pytest.mark.parametrize("family", ["bnn", "mc_dropout_dnn", "deep_ensemble"])
def test_every_family_adds_the_outlier_term_only_when_asked(tiny_cfg, digits_splits, family):
    x = torch.as_tensor(np.asarray(digits_splits["train"].x[:16], np.float32))
    y = torch.as_tensor(digits_splits["train"].y[:16])
    for weight in (0.0, 1.0):
        cfg = tiny_cfg(f"model={family}", *CNN, "model.ensemble_size=2", f"model.outlier_exposure={weight}")
        model = build_model(cfg.model, digits_splits["train"].schema.feature_shape, 10)
        terms = family_of(model).loss_terms(model, x, y, cfg, 0.0)  # kl weight 0: the BNN's loss is its data terms
        members = 2 if family == "deep_ensemble" else 1  # the ensemble's loss sums its members' losses
        outlier = terms.get("outlier", torch.zeros(())).item()
        assert ("outlier" in terms) == (weight > 0) and (outlier > 0) == (weight > 0)
        assert terms["loss"].item() == pytest.approx(members * (terms["nll"].item() + weight * outlier), rel=1e-5)


def test_outlier_exposure_pushes_scrambled_test_images_toward_the_uniform_prediction(tiny_cfg, digits_splits):
    train, val, test = digits_splits["train"], digits_splits["val"], digits_splits["test"]
    torch.manual_seed(1)
    far = synthetic_outliers(torch.as_tensor(test.x), test.schema.feature_shape, 200)  # from images never trained on
    entropy, acc = {}, {}
    for weight in (0.0, 1.0):
        cfg = tiny_cfg("model=mc_dropout_dnn", *CNN, "train.epochs=6", f"model.outlier_exposure={weight}")
        model = loop.train_model(cfg, train, val, quiet=True).model
        p_test = predict_log_probs(model, torch.as_tensor(test.x), 8, seed=0).exp().mean(0)
        acc[weight] = (p_test.argmax(1).numpy() == test.y).mean()
        p_far = predict_log_probs(model, far, 8, seed=0).exp().mean(0)
        entropy[weight] = -(p_far * p_far.clamp_min(1e-12).log()).sum(1).mean().item()
    assert entropy[1.0] > entropy[0.0] + 0.2 and entropy[1.0] > 0.8 * math.log(10), entropy
    assert acc[1.0] > acc[0.0] - 0.03, acc


def test_the_last_layers_bayesian_cnn_keeps_deterministic_convolutions_with_batchnorm(tiny_cfg, digits_splits):
    cfg = tiny_cfg("model=bnn", *CNN, "model.bayesian_layers=head")
    model = build_model(cfg.model, digits_splits["train"].schema.feature_shape, 10)
    kinds = [type(m) for m in model.modules()]
    assert torchbnn.BayesConv2d not in kinds and nn.Conv2d in kinds and nn.BatchNorm2d in kinds
    assert kinds.count(torchbnn.BayesLinear) == 2 and nn.Linear not in kinds
    x = torch.as_tensor(np.asarray(digits_splits["test"].x[:6], np.float32))
    samples = predict_log_probs(model, x, 4, seed=0)
    assert samples.shape == (4, 6, 10) and not torch.allclose(samples[0], samples[1])  # weight draws differ
    last = build_model(tiny_cfg("model=bnn", *CNN, "model.bayesian_layers=last").model, [1, 8, 8], 10)
    kinds = [type(m) for m in last.modules()]
    assert kinds.count(torchbnn.BayesLinear) == 1 and kinds.count(nn.Linear) == 1
    assert isinstance(last[-1], torchbnn.BayesLinear)
    with pytest.raises(UserError, match="model.bayesian_layers"):
        build_model(tiny_cfg("model=bnn", "model.bayesian_layers=conv").model, [1, 8, 8], 10)


def test_knn_density_ranks_far_inputs_below_the_training_distribution(tiny_cfg, digits_splits):
    train, val, test = digits_splits["train"], digits_splits["val"], digits_splits["test"]
    cfg = tiny_cfg("model=mc_dropout_dnn", *CNN, "evaluate.density=knn")
    model = loop.train_model(cfg, train, val, quiet=True).model
    fitted = density_of(model)
    assert isinstance(fitted.density, KNNDensity) and fitted.density.k == 1  # fewer than 2,000 rows
    s_test = log_density(model, test.x)
    images = to_images(test.x, test.schema)
    for kind in ("uniform", "constant"):
        s_far = log_density(model, to_rows(far_ood(kind, images, seed=1), test.schema))
        assert M.ood_metrics(-s_test, -s_far)["auroc"] > 0.9, kind
    again = FeatureDensity.from_state(fitted.state())  # what the bundle stores and loads
    np.testing.assert_allclose(again.density.log_density(np.eye(64)[:3]), fitted.density.log_density(np.eye(64)[:3]))


def test_knn_distance_is_the_kth_neighbour_of_normalised_features():
    bank = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    density = KNNDensity(k=2).fit(bank)
    # (1, 1) normalised is 45 degrees from both (1, 0) and (0, 1): both at distance 2 sin(22.5 deg)
    np.testing.assert_allclose(density.log_density([[1.0, 1.0]]), [-2 * math.sin(math.pi / 8)])
    assert KNNDensity().fit(np.random.default_rng(0).normal(size=(5000, 4))).k == 5  # one per thousand rows


def test_abstaining_on_density_without_a_fitted_density_is_one_clear_error(tiny_cfg, digits_splits, tmp_path):
    from dl_uncertainty.reports.evaluation import evaluate_model
    from dl_uncertainty.tracking.bundle import DENSITY, load_bundle, save_bundle
    from dl_uncertainty.tracking.runs import UncertaintyModel

    train, val, test = digits_splits["train"], digits_splits["val"], digits_splits["test"]
    cfg = tiny_cfg("model=mc_dropout_dnn", "evaluate.abstain_on=density", "train.epochs=1")
    model = loop.train_model(cfg, train, val, quiet=True).model
    save_bundle(model, cfg, train.schema, tmp_path)
    (tmp_path / DENSITY).unlink()  # as a bundle saved before the density existed
    wrapper = UncertaintyModel()
    wrapper.model, wrapper.cfg, wrapper.schema, _ = load_bundle(tmp_path)
    wrapper.calibration = None
    assert density_of(wrapper.model) is None
    with pytest.raises(UserError, match="abstain_on=density but this model carries no feature density"):
        wrapper.predict_rows(test.x[:3])
    delattr(model, DENSITY_ATTR)
    with pytest.raises(UserError, match="abstain_on=density"):
        evaluate_model(model, cfg, test, digits_splits["ood"], val, with_figures=False)


def test_auto_density_takes_the_gaussian_only_with_enough_rows_per_feature():
    from dl_uncertainty.families.feature_density import ROWS_PER_FEATURE, density_kind

    assert density_kind("auto", (ROWS_PER_FEATURE * 128, 128)) == "gaussian"
    assert density_kind("auto", (195, 128)) == "knn"  # the generated shapes' training split
    assert density_kind("knn", (10**6, 2)) == "knn" and density_kind("gaussian", (3, 128)) == "gaussian"


@pytest.mark.parametrize("share, rows", [(0.25, 4), (0.5, 8), (1.0, 16)])
def test_outlier_share_sets_the_outlier_rows_per_batch_row(tiny_cfg, digits_splits, share, rows):
    from dl_uncertainty.families.outliers import with_outliers

    cfg = tiny_cfg("model=mc_dropout_dnn", *CNN, "model.outlier_exposure=0.5", f"model.outlier_share={share}")
    model = build_model(cfg.model, digits_splits["train"].schema.feature_shape, 10)
    x = torch.as_tensor(np.asarray(digits_splits["train"].x[:16], np.float32))
    batch, n = with_outliers(model, x, cfg)
    assert n == 16 and len(batch) == 16 + rows and torch.equal(batch[:16], x)


@pytest.mark.parametrize("share", [0, 1.5])
def test_an_outlier_share_outside_0_1_names_the_key(tiny_cfg, share):
    with pytest.raises(UserError, match="model.outlier_share"):
        tiny_cfg(f"model.outlier_share={share}")


def test_the_density_of_a_small_augmented_split_is_also_fitted_on_augmented_copies(tiny_cfg, digits_splits):
    from dl_uncertainty.families.feature_density import MAX_COPIES, fit_rows

    train = digits_splits["train"]  # 8x8 images, one channel
    assert train.schema.feature_shape == [1, 8, 8]
    x, y = fit_rows(train, tiny_cfg("data.hflip=true", "data.crop_padding=0"))
    n = len(train.y)
    assert x.shape == ((MAX_COPIES + 1) * n, train.x.shape[1]) and (y == np.tile(train.y, MAX_COPIES + 1)).all()
    np.testing.assert_array_equal(x[:n], train.x)
    flat = np.asarray(train.x, np.float32).reshape(n, 8, 8)
    for copy in x[n:].reshape(MAX_COPIES, n, 8, 8):  # each row is its image or that image mirrored
        same, mirrored = (copy == flat).all((1, 2)), (copy == flat[:, :, ::-1]).all((1, 2))
        assert (same | mirrored).all() and 0.2 < mirrored.mean() < 0.8
    x_plain, _ = fit_rows(train, tiny_cfg("data.hflip=false", "data.crop_padding=0"))
    assert len(x_plain) == n


def test_outlier_kinds_choose_which_generators_make_the_outliers(digits_splits):
    images = _images(digits_splits["test"])
    rows, shape = images.reshape(len(images), -1), list(images.shape[1:])
    permuted = synthetic_outliers(rows, shape, 200, ("permuted",))
    # every pixel-permuted row holds one source row's values: its sorted values are one of theirs
    sources = rows.sort(dim=1).values
    assert all((sources == row).all(dim=1).any() for row in permuted.sort(dim=1).values)
    smeared = synthetic_outliers(rows, shape, 200, ("smeared",))
    assert not any((sources == row).all(dim=1).any() for row in smeared.sort(dim=1).values)


def test_an_unknown_outlier_kind_names_the_key(tiny_cfg):
    with pytest.raises(UserError, match="model.outlier_kinds"):
        tiny_cfg("model.outlier_kinds=[blur]")


def test_image_training_leaves_the_weights_in_the_default_memory_layout(tiny_cfg, digits_splits):
    """The training pass runs channels-last on the CPU; nothing after it may see that layout."""
    cfg = tiny_cfg("model=mc_dropout_dnn", *CNN, "train.epochs=1", "model.outlier_exposure=0.5")
    result = loop.train_model(cfg, digits_splits["train"], digits_splits["val"], quiet=True)
    assert all(p.is_contiguous() for p in result.model.parameters())
    assert all(t.is_contiguous() for t in result.model.state_dict().values())
    assert math.isfinite(result.history["train_loss"][0]) and result.history["train_loss"][0] > 0
