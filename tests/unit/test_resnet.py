"""The ResNet in every model family: MC inference strategies, BatchNorm during sampling, Grad-CAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchbnn

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.families.base import build_model as get_model
from dl_uncertainty.families.networks import ResNet
from dl_uncertainty.families.predict import predict_log_probs
from dl_uncertainty.reports.saliency import grad_cam
from dl_uncertainty.uncertainty.engine import mc_log_probs
from dl_uncertainty.uncertainty.mc_plan import STRATEGIES

SHAPE = [3, 8, 8]


def resnet(name: str, *overrides: str) -> torch.nn.Module:
    cfg = load_config([f"model={name}", "model.arch=resnet", "model.conv_channels=[4,8]", "model.res_blocks=2",
                       "model.ensemble_size=2", *overrides])
    torch.manual_seed(0)
    model = get_model(cfg.model, SHAPE, 3)
    model.train()
    with torch.no_grad():  # some batches through train mode: BatchNorm running stats that are not the init
        for _ in range(3):
            model(torch.randn(16, 192) * 2 + 1)
    return model


def test_every_family_builds_a_resnet_and_keeps_batchnorm_fixed_while_sampling():
    x = torch.randn(5, 192)
    for name in ("bnn", "mc_dropout_dnn", "deep_ensemble"):
        model = resnet(name)
        members = model.members if name == "deep_ensemble" else [model]
        assert all(isinstance(m, ResNet) for m in members)
        stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        log_probs = predict_log_probs(model, x, samples=6)
        assert log_probs.shape == (2 if name == "deep_ensemble" else 6, 5, 3)
        assert torch.isfinite(log_probs).all()
        if name != "deep_ensemble":  # stochastic: the samples differ
            assert log_probs.std(0).max() > 1e-4
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_mc_strategy_matches_eval_mode_when_the_bnn_has_no_noise(strategy):
    """With posterior sigma ~ 0 every strategy must reproduce the plain eval forward exactly:
    residual sums, shortcut convs and BatchNorm handled in the engine's batched row layout."""
    model = resnet("bnn")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torchbnn.BayesConv2d, torchbnn.BayesLinear)):
                m.weight_log_sigma.fill_(-40.0)
                m.bias_log_sigma.fill_(-40.0)
    x = torch.randn(7, 192)
    model.eval()
    with torch.no_grad():
        expected = torch.log_softmax(model(x), -1)
    got = mc_log_probs(model, x, 5, strategy=strategy)
    torch.testing.assert_close(got, expected.expand(5, -1, -1), atol=1e-5, rtol=1e-4)


def test_mc_dropout_strategies_sample_the_same_distribution():
    model = resnet("mc_dropout_dnn", "model.dropout=0.3")
    x = torch.randn(3, 192)
    gen = torch.Generator().manual_seed(1)
    loop = mc_log_probs(model, x, 400, strategy="loop", generator=gen).exp().mean(0)
    auto = mc_log_probs(model, x, 400, strategy="auto", generator=gen).exp().mean(0)
    assert (loop - auto).abs().max() < 0.05


def test_grad_cam_maps_the_resnet_of_every_family():
    x = np.random.default_rng(0).normal(size=(4, 192)).astype(np.float32)
    for name in ("bnn", "mc_dropout_dnn", "deep_ensemble"):
        cams = grad_cam(resnet(name), x, np.array([0, 1, 2, 0]), SHAPE, samples=2)
        assert cams.shape == (4, 8, 8)
        assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1 + 1e-6
