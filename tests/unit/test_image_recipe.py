"""The image recipe: lr schedules, gradient accumulation, conv dropout, spectral normalisation, the
feature density every family gets (fitted, bundled, served, evaluated) and the generated far-OOD kinds."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.rows import to_images, to_rows
from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import build_model
from dl_uncertainty.families.feature_density import density_of, fit_feature_density, log_density
from dl_uncertainty.families.predict import predict_log_probs
from dl_uncertainty.families.spectral import lipschitz_bound
from dl_uncertainty.training import loop
from dl_uncertainty.training.schedule import lr_factor, step_groups
from dl_uncertainty.uncertainty import metrics as M
from dl_uncertainty.uncertainty.far_ood import FAR_KINDS, far_ood


def test_lr_schedules_at_known_steps():
    assert [lr_factor("none", s, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    # cosine, 10 % warm-up over 100 steps: linear to 1 at step 9, then half a cosine to 0
    cos = [lr_factor("cosine", s, 100, 0.1) for s in (0, 4, 9, 10, 55, 99)]
    assert cos == pytest.approx([0.1, 0.5, 1.0, 1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 89 / 90))])
    assert lr_factor("cosine", 0, 100) == 1.0  # no warm-up: starts at the full rate
    one = [lr_factor("onecycle", s, 101, 0.1) for s in (0, 10, 55, 100)]
    assert one == pytest.approx([1 / 25, 1.0, 1e-4 + (1 - 1e-4) * 0.5, 1e-4])


def test_step_groups_weight_every_batch_by_its_share_of_the_step():
    assert step_groups(10, 3, 2) == [6, 6, 4, 4]  # batches 3, 3 | 3, 1
    assert step_groups(10, 3, 1) == [3, 3, 3, 1]


def test_the_schedule_reaches_the_optimizer_once_per_step(tiny_cfg, digits_splits):
    cfg = tiny_cfg("model=mc_dropout_dnn", "train.epochs=2", "train.lr_schedule=cosine", "train.warmup_fraction=0.5",
                   "train.batch_size=256", "train.accumulate_grad_batches=2")
    seen = []
    real = loop.make_scheduler

    def spy(train_cfg, optimizer, n):
        scheduler = real(train_cfg, optimizer, n)
        seen.append(scheduler)
        return scheduler

    loop.make_scheduler = spy
    try:
        loop.train_model(cfg, digits_splits["train"], digits_splits["val"], quiet=True)
    finally:
        loop.make_scheduler = real
    steps = 2 * math.ceil(math.ceil(len(digits_splits["train"].y) / 256) / 2)
    assert seen[0].last_epoch == steps


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_equals_one_big_batch(tiny_cfg, digits_splits):
    train, val = digits_splits["train"], digits_splits["val"]
    common = ("model=deep_ensemble", "model.ensemble_size=1", "train.epochs=2", "train.optimizer=sgd", "train.lr=0.05")
    big = loop.train_model(tiny_cfg(*common, "train.batch_size=128"), train, val, quiet=True)
    small = loop.train_model(tiny_cfg(*common, "train.batch_size=32", "train.accumulate_grad_batches=4"),
                             train, val, quiet=True)
    for key, value in _weights(big.model).items():
        torch.testing.assert_close(_weights(small.model)[key], value, atol=1e-5, rtol=1e-4)


def test_accumulation_counts_the_bnn_kl_once_per_optimizer_step(tiny_cfg, digits_splits, monkeypatch):
    """Only the ELBO's KL term: after one step of 4 accumulated batches, SGD moved the weights by
    lr * kl_w * grad(KL), as one big batch would, not 4 times that."""
    from dl_uncertainty.families.bnn import kl_divergence

    train, val = digits_splits["train"], digits_splits["val"]
    n = len(train.y)
    cfg = tiny_cfg("model=bnn", "train.epochs=1", "train.optimizer=sgd", "train.momentum=0.0", "train.lr=0.1",
                   f"train.batch_size={math.ceil(n / 4)}", "train.accumulate_grad_batches=4")
    loop.seed_everything(cfg.seed)  # the initial weights train_model starts from
    initial = build_model(cfg.model, train.schema.feature_shape, len(train.schema.class_names))
    kl_w = loop.kl_scale(cfg.model, 1, n)
    kl_divergence(initial).backward()
    expected = {name: p.detach() - 0.1 * kl_w * p.grad for name, p in initial.named_parameters()}

    def kl_only(model, x, y, cfg, kl_w, mix=None):
        kl = kl_divergence(model).squeeze()
        return {"loss": kl_w * kl, "nll": kl * 0, "kl": kl}

    monkeypatch.setattr(loop, "loss_terms", kl_only)
    trained = loop.train_model(cfg, train, val, quiet=True).model
    for name, p in trained.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], atol=1e-6, rtol=1e-5)


def test_conv_dropout_false_keeps_dropout_out_of_the_conv_layers(tiny_cfg):
    shape = [1, 8, 8]
    for flag, expected in (("true", 3), ("false", 1)):
        cfg = tiny_cfg("model=mc_dropout_dnn", "model.arch=cnn", f"model.conv_dropout={flag}")
        model = build_model(cfg.model, shape, 10)
        flat = next(i for i, m in enumerate(model) if isinstance(m, nn.Flatten))
        assert sum(isinstance(m, nn.Dropout) for m in model) == expected
        assert all(not isinstance(m, nn.Dropout) for m in list(model)[:flat]) == (flag == "false")


def test_spectral_norm_keeps_every_feature_layer_within_its_coefficient(tiny_cfg):
    cfg = tiny_cfg("model=mc_dropout_dnn", "model.arch=cnn", "model.conv_channels=[8,8]", "model.spectral_norm=1.5")
    shape = [1, 8, 8]
    torch.manual_seed(5)  # the power iteration's start: 1.29x over the coefficient in eval before it settled
    model = build_model(cfg.model, shape, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=g) * 5, torch.randint(0, 10, (64,), generator=g)
    for _ in range(40):  # inputs 5x the unit scale push the weights up
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    sizes, h = [], 8
    for m in model:
        if isinstance(m, nn.Conv2d):
            sizes.append((m, [m.in_channels, h, h]))
        if isinstance(m, nn.MaxPool2d):
            h //= 2
    for m, input_shape in sizes:
        assert lipschitz_bound(m, input_shape) <= 1.5 * 1.05
    for linear in [m for m in model if isinstance(m, nn.Linear)][:-1]:  # the output layer stays free
        assert lipschitz_bound(linear) <= 1.5 * 1.05
    # the power-iteration state is in the state_dict: a freshly built model takes it, and MC sampling runs
    again = build_model(cfg.model, shape, 10)
    again.load_state_dict(model.state_dict())
    assert predict_log_probs(again, x[:5], 4, seed=0).shape == (4, 5, 10)
    with pytest.raises(UserError, match="model.spectral_norm"):
        build_model(tiny_cfg("model=bnn", "model.spectral_norm=1.0").model, shape, 10)


@pytest.mark.parametrize("family", ["bnn", "mc_dropout_dnn", "deep_ensemble"])
def test_the_feature_density_separates_generated_far_ood_inputs(tiny_cfg, digits_splits, family):
    train, val, test = digits_splits["train"], digits_splits["val"], digits_splits["test"]
    cfg = tiny_cfg(f"model={family}", "train.epochs=4", "model.ensemble_size=2")
    model = loop.train_model(cfg, train, val, quiet=True).model
    fitted = density_of(model)
    assert fitted is not None and fitted.target_rate == 0.95
    s_val = log_density(model, val.x)
    assert np.mean(s_val >= fitted.threshold) >= 0.95
    s_test = log_density(model, test.x)
    s_test_again = log_density(model, test.x)
    np.testing.assert_array_equal(s_test, s_test_again)  # one deterministic answer, a BNN's too
    images = to_images(test.x, test.schema)
    for kind in ("uniform", "constant"):
        s_far = log_density(model, to_rows(far_ood(kind, images, seed=1), test.schema))
        assert M.ood_metrics(-s_test, -s_far)["auroc"] > 0.9, kind


def test_a_singular_density_fit_names_the_ridge_key(tiny_cfg, digits_splits):
    train, val = digits_splits["train"], digits_splits["val"]
    cfg = tiny_cfg("model=mc_dropout_dnn", "train.epochs=1", "model.hidden_sizes=[256]")
    model = loop.train_model(cfg, train, val, quiet=True).model
    few = type(train)(train.x[:40], np.arange(40) % len(train.schema.class_names), train.schema)
    with pytest.raises(UserError, match="evaluate.density_ridge"):
        fit_feature_density(model, few, val, load_config(["evaluate.density_ridge=0"]))


def test_the_served_row_carries_evaluations_feature_density(tiny_cfg, digits_splits, tmp_path):
    from dl_uncertainty.reports.evaluation import evaluate_model
    from dl_uncertainty.serve import info
    from dl_uncertainty.tracking.bundle import load_bundle, save_bundle
    from dl_uncertainty.tracking.runs import UncertaintyModel
    from dl_uncertainty.uncertainty.calibration import Calibration

    train, val, test = digits_splits["train"], digits_splits["val"], digits_splits["test"]
    cfg = tiny_cfg("model=mc_dropout_dnn", "evaluate.abstain_on=density")
    model = loop.train_model(cfg, train, val, quiet=True).model
    ev = evaluate_model(model, cfg, test, digits_splits["ood"], val, with_figures=False)
    for key in ("auroc_density", "auroc_energy", "far_auroc_density", *(f"far_{k}_auroc_density" for k in FAR_KINDS)):
        assert 0 <= ev.metrics[key] <= 1, key
    assert {"auroc_density", "auroc_energy"} <= set(ev.shift[0])
    save_bundle(model, cfg, train.schema, tmp_path, calibration=ev.calibration)
    wrapper = UncertaintyModel()
    wrapper.model, wrapper.cfg, wrapper.schema, meta = load_bundle(tmp_path)
    wrapper.calibration = Calibration.from_dict(meta["calibration"])
    out = wrapper.predict_rows(test.x[:20])
    np.testing.assert_allclose(out["feature_density"], ev.predictions["feature_density"][:20], rtol=1e-5)
    np.testing.assert_array_equal(out["abstain"], ev.predictions["abstain"][:20])
    served = info(wrapper)["feature_density"]
    assert served == {"threshold": pytest.approx(density_of(model).threshold), "target_rate": 0.95,
                      "abstain_on": "density"}


def test_far_ood_kinds_have_the_images_shape_and_range():
    images = np.random.default_rng(0).uniform(0.2, 0.8, (10, 3, 12, 12)).astype(np.float32)
    for kind in FAR_KINDS:
        out = far_ood(kind, images, seed=3)
        assert out.shape == images.shape and out.dtype == np.float32, kind
        assert out.min() >= 0.2 - 1e-6 and out.max() <= 0.8 + 1e-6, kind
        np.testing.assert_array_equal(out, far_ood(kind, images, seed=3))
    with pytest.raises(UserError, match="far-OOD kind"):
        far_ood("stripes", images)


def test_image_data_selects_the_recipe_and_digits_keeps_its_defaults():
    digits = load_config([])
    assert (digits.model.arch, list(digits.model.hidden_sizes), digits.train.epochs, digits.train.lr_schedule) == \
        ("mlp", [256, 256], 60, "none")
    mnist = load_config(["data=mnist", "model=bnn"])
    assert (mnist.model.arch, list(mnist.model.conv_channels), list(mnist.model.hidden_sizes)) == ("cnn", [32, 64], [128])
    assert (mnist.model.conv_dropout, mnist.model.kl_weight, mnist.train.epochs) == (False, 0.1, 30)
    assert (mnist.data.crop_padding, load_config(["data=mnist", "model=mc_dropout_dnn"]).model.dropout) == (2, 0.1)
    assert load_config(["model=mc_dropout_dnn"]).model.dropout == 0.25  # digits' tables keep the family's dropout
    assert (mnist.train.lr_schedule, mnist.train.warmup_fraction, mnist.train.early_stopping_patience) == ("cosine", 0.05, 0)
    assert (mnist.train.keep_epoch, digits.train.keep_epoch) == ("last", "best")  # cosine to 0: the final weights
    assert load_config(["data=mnist", "train.epochs=3"]).train.epochs == 3  # a command-line value wins
    assert load_config(["data=cifar10"]).model.arch == "resnet"
