import numpy as np
import torch

from dl_uncertainty.families.base import build_model as get_model
from dl_uncertainty.families.registry import NAMES
from dl_uncertainty.reports.saliency import grad_cam


def test_grad_cam_maps_every_conv_model_and_skips_mlps(tiny_cfg, digits_splits):
    x = digits_splits["test"].x[:5]
    target = np.arange(5) % 8
    for name in NAMES:  # every registered family
        model = get_model(tiny_cfg(f"model={name}", "model.arch=cnn").model, [1, 8, 8], 8)
        cams = grad_cam(model, x, target, [1, 8, 8], samples=3)
        assert cams.shape == (5, 8, 8)
        assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1 + 1e-6
        assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    mlp = get_model(tiny_cfg("model=bnn").model, [1, 8, 8], 8)
    assert grad_cam(mlp, x, target, [1, 8, 8]) is None


def test_grad_cam_follows_the_evidence():
    """A conv net that only looks at the top-left pixel gets its map peak there."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "mc_dropout_dnn", "arch": "cnn", "hidden_sizes": [4], "conv_channels": [2],
                            "activation": "relu", "dropout": 0.1})
    model = get_model(cfg, [1, 8, 8], 2)
    conv, bn = (m for m in model if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)))
    hidden, out = (m for m in model if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        bn.weight.fill_(1.0)
        conv.weight[0, 0, 1, 1] = 1.0  # channel 0 copies its input pixel
        hidden.weight[0, 0] = 1.0  # first pooled cell of channel 0: the top-left 2x2 block
        out.weight[1, 0] = 1.0
    x = np.zeros((1, 64), dtype=np.float32)
    x[0, 0] = 5.0
    cams = grad_cam(model, x, np.array([1]), [1, 8, 8], samples=2)
    assert np.unravel_index(cams[0].argmax(), (8, 8)) in {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert cams[0][0, 0] == 1.0 and cams[0][2:, 2:].max() < 0.1
