"""Spectral normalisation with a coefficient (SNGP, Liu et al. 2020; DDU, Mukhoti et al. 2021):
each linear or conv layer's weight is scaled so that the layer's Lipschitz constant (its spectral
norm as an operator) is at most ``coeff``, which keeps distances in feature space from collapsing,
so a feature-space density can tell far-away inputs from the data.

``torch.nn.utils.parametrizations.spectral_norm`` divides a weight by its norm (a hard norm of 1)
and, for a conv, bounds the reshaped [out, in*k*k] matrix, not the convolution: the conv's operator
norm can be larger. Here the constraint is soft (``W / max(1, sigma / coeff)``: a layer already
below ``coeff`` is untouched), and a conv's sigma is estimated by power iteration on the
convolution itself at its input shape (seen on the first forward). Both use
``torch.nn.utils.parametrize``, so the state (the power-iteration vectors) lives in the module's
state_dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SETTLE_ITERATIONS = 50  # power-iteration steps on the weights training ended with
_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _normalised(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


def _conv_op(module: nn.Module):
    fn = next(f for cls, f in _CONV_FN.items() if isinstance(module, cls))
    return lambda x, w: fn(x, w, None, module.stride, module.padding, module.dilation, module.groups)


class _SpectralBound(nn.Module):
    """Parametrization W -> W / max(1, sigma(W) / coeff), sigma by power iteration (updated in
    training mode only, ``n_power_iterations`` steps per forward; ``eval()`` converges them on the
    final weights, and eval reuses them)."""

    def __init__(self, module: nn.Module, coeff: float, n_power_iterations: int, input_shape=None):
        super().__init__()
        if not coeff > 0:
            raise ValueError(f"the spectral coefficient must be > 0, got {coeff}")
        self.coeff, self.iters = float(coeff), int(n_power_iterations)
        self._weight = None  # the unconstrained weight, given by spectral_normalize (not a submodule)
        self.is_conv = isinstance(module, _CONVS)
        self._op = _conv_op(module) if self.is_conv else None
        weight = module.weight.detach()
        self.register_buffer("sigma", torch.ones((), dtype=weight.dtype))
        if self.is_conv:
            self.register_buffer("v", torch.empty(0, dtype=weight.dtype))  # input-shaped, made lazily
            if input_shape is not None:
                self.set_input_shape(input_shape)
        else:
            self.register_buffer("v", _normalised(torch.randn(weight.shape[1], dtype=weight.dtype)))

    def set_input_shape(self, shape) -> None:
        shape = (1, *tuple(int(s) for s in shape))
        if tuple(self.v.shape) != shape:
            self.v = _normalised(torch.randn(shape, dtype=self.sigma.dtype, device=self.sigma.device))

    def train(self, mode: bool = True):
        # One power-iteration step per training forward lags behind the weights (the norm in eval was up
        # to 1.29x the coefficient after 40 Adam steps): when training ends, converge on the final weights.
        if self.training and not mode and self._weight is not None and self.v.numel():
            with torch.inference_mode(False):  # eval() may come inside inference mode
                self._power_iterate(self._weight().detach(), SETTLE_ITERATIONS)
        return super().train(mode)

    @torch.no_grad()
    def _power_iterate(self, w: torch.Tensor, steps: int) -> None:
        v = self.v
        for _ in range(steps):
            v = _normalised(self._adjoint(w, _normalised(self._apply_op(w, v))))
        self.v.copy_(v)

    def _apply_op(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._op(v, w) if self.is_conv else w @ v

    def _adjoint(self, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return w.t() @ u
        with torch.enable_grad():  # the exact adjoint of the conv, whatever its stride and padding
            v = torch.zeros_like(self.v, requires_grad=True)
            (grad,) = torch.autograd.grad((self._op(v, w) * u).sum(), v)
        return grad

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.is_conv and self.v.numel() == 0:
            # no input shape seen yet: the matrix norm times sqrt(kernel size) bounds the conv's norm
            k = weight[0, 0].numel()
            sigma = torch.linalg.matrix_norm(weight.flatten(1), 2) * k**0.5
            return weight / torch.clamp(sigma / self.coeff, min=1.0)
        w = weight.detach()
        if self.training:
            self._power_iterate(w, max(self.iters, 1))
        u = _normalised(self._apply_op(w, self.v)).detach()
        sigma = (u * self._apply_op(weight, self.v)).sum()  # differentiable in weight
        if self.training:
            self.sigma.copy_(sigma.detach())
        return weight / torch.clamp(sigma / self.coeff, min=1.0)


def spectral_normalize(module: nn.Module, coeff: float = 1.0, n_power_iterations: int = 1,
                       input_shape=None) -> nn.Module:
    """Constrain ``module`` (Linear or Conv) so its spectral norm is at most ``coeff``; in place.

    A conv's norm depends on its input's spatial size: pass ``input_shape`` ([C, H, W]), or it is
    taken from the first forward. Returns the module.
    """
    if not isinstance(module, (nn.Linear, *_CONVS)):
        raise TypeError(f"spectral_normalize takes Linear or Conv layers, got {type(module).__name__}")
    bound = _SpectralBound(module, coeff, n_power_iterations, input_shape)
    parametrize.register_parametrization(module, "weight", bound)
    object.__setattr__(bound, "_weight", lambda: module.parametrizations.weight.original)
    if bound.is_conv:
        def _record_shape(mod, args):
            bound.set_input_shape(args[0].shape[1:])
        module.register_forward_pre_hook(_record_shape)
    return module


def apply_spectral_norm(model: nn.Module, coeff: float = 1.0, n_power_iterations: int = 1,
                        skip_last: bool = True) -> nn.Module:
    """Spectral-normalise every Linear/Conv in ``model`` (by default not the output layer, which
    SNGP/DDU leave free so logits can grow). Returns the model."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, *_CONVS))]
    if skip_last and layers and isinstance(layers[-1], nn.Linear):
        layers = layers[:-1]
    for layer in layers:
        spectral_normalize(layer, coeff, n_power_iterations)
    return model


@torch.no_grad()
def lipschitz_bound(module: nn.Module, input_shape=None, iters: int = 200, seed: int = 0) -> float:
    """The layer's actual spectral norm as an operator (bias ignored), by power iteration on the
    weight it uses now: the matrix for a Linear, the convolution at ``input_shape`` ([C, H, W]) for a conv."""
    weight = module.weight.detach()  # the parametrized (constrained) weight if there is one
    g = torch.Generator().manual_seed(seed)
    if isinstance(module, _CONVS):
        if input_shape is None:
            raise ValueError("a conv's spectral norm needs its input_shape [C, H, W]")
        op = _conv_op(module)
        v = _normalised(torch.randn((1, *input_shape), generator=g, dtype=weight.dtype))
        sigma = 0.0
        for _ in range(iters):
            u = op(v, weight)
            sigma = float(u.norm())
            with torch.enable_grad():
                x = torch.zeros_like(v, requires_grad=True)
                (v,) = torch.autograd.grad((op(x, weight) * u).sum(), x)
            v = _normalised(v)
        return float(op(v, weight).norm()) if iters else sigma
    return float(torch.linalg.matrix_norm(weight, 2))
