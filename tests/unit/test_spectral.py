import pytest
import torch
from torch import nn

from dl_uncertainty.families.spectral import (
    apply_spectral_norm,
    lipschitz_bound,
    spectral_normalize,
)


def _train_steps(layer, x, steps=30):
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    layer.train()
    for _ in range(steps):  # the power iteration converges as training runs
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("stride", [1, 2])
def test_a_conv_keeps_its_operator_norm_below_the_coefficient(stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=stride, padding=1)
    with torch.no_grad():
        conv.weight.mul_(5)
    shape = (3, 10, 10)
    assert lipschitz_bound(conv, shape) > 2.0  # the test can fail: the raw conv is far above
    spectral_normalize(conv, coeff=0.9)
    _train_steps(conv, torch.randn(4, *shape))
    conv.eval()
    assert lipschitz_bound(conv, shape) <= 0.9 * 1.02
    assert lipschitz_bound(conv, shape) >= 0.9 * 0.9  # scaled to the bound, not far below it


def test_a_linear_keeps_its_bound_and_a_layer_below_it_is_untouched():
    torch.manual_seed(0)
    big = nn.Linear(20, 10)
    with torch.no_grad():
        big.weight.mul_(10)
    spectral_normalize(big, coeff=2.0)
    _train_steps(big, torch.randn(16, 20))
    big.eval()
    assert lipschitz_bound(big) <= 2.0 * 1.02

    small = nn.Linear(20, 10)
    with torch.no_grad():
        small.weight.mul_(0.01)
        raw = small.weight.clone()
    spectral_normalize(small, coeff=2.0)
    small.train()
    small(torch.randn(4, 20))
    torch.testing.assert_close(small.weight, raw)


def test_the_whole_model_trains_and_stores_its_power_iteration_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 8),
                          nn.ReLU(), nn.Linear(8, 3))
    apply_spectral_norm(model, coeff=1.0)
    assert not hasattr(model[-1], "parametrizations")  # the output layer stays free
    _train_steps(model, torch.randn(8, 1, 6, 6), steps=5)
    state = model.state_dict()
    assert any(k.endswith("parametrizations.weight.0.v") for k in state)
    assert model[0].parametrizations.weight[0].v.shape == (1, 1, 6, 6)
    model.eval()
    v_before = model[0].parametrizations.weight[0].v.clone()
    model(torch.randn(2, 1, 6, 6))
    torch.testing.assert_close(model[0].parametrizations.weight[0].v, v_before)  # eval: no updates
