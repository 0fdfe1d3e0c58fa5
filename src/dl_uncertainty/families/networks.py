"""The networks families are built from: MLP, small CNN or small ResNet, deterministic or with
torchbnn's mean-field Gaussian layers.

Every model takes flat features [N, D] and returns logits [N, K]; the CNNs unflatten to the
image shape themselves, so data files and the MLflow model always speak flat rows.
"""

from __future__ import annotations

import math

import torch
import torchbnn
from omegaconf import DictConfig
from torch import nn

from dl_uncertainty.errors import UserError
from dl_uncertainty.families.spectral import apply_spectral_norm

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def _conv_dropout(cfg: DictConfig) -> float:
    """The dropout rate of conv layers: ``model.dropout``, or 0 with ``model.conv_dropout=false``."""
    return cfg.dropout if cfg.get("conv_dropout", True) else 0.0


def _linear(bayesian: bool, cfg: DictConfig, n_in: int, n_out: int) -> nn.Module:
    if bayesian:
        return torchbnn.BayesLinear(cfg.prior_mu, cfg.prior_sigma, n_in, n_out)
    return nn.Linear(n_in, n_out)


def _conv(bayesian: bool, cfg: DictConfig, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Module:
    if bayesian:
        return torchbnn.BayesConv2d(cfg.prior_mu, cfg.prior_sigma, c_in, c_out, kernel, stride=stride,
                                    padding=kernel // 2)
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)


class ResidualBlock(nn.Module):
    """Two 3x3 convs with BatchNorm, plus the input (1x1 conv when the shape changes); dropout last.

    Dropout sits after the sum so both branches of the sum see the same rows: the MC engine can
    then run everything before the first dropout once per example, not once per sample.
    """

    def __init__(self, bayesian: bool, cfg: DictConfig, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = _conv(bayesian, cfg, c_in, c_out, stride=stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv(bayesian, cfg, c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = ACTIVATIONS[cfg.activation]()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(_conv(bayesian, cfg, c_in, c_out, kernel=1, stride=stride),
                                          nn.BatchNorm2d(c_out))
        self.dropout = nn.Dropout(_conv_dropout(cfg)) if _conv_dropout(cfg) > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.dropout(self.act(out + self.shortcut(x)))


class ResNet(nn.Module):
    """Stem conv, ``res_blocks`` residual blocks per stage (``conv_channels`` wide, each stage after
    the first halving the resolution), global average pooling, one linear layer."""

    def __init__(self, cfg: DictConfig, feature_shape: list[int], num_classes: int, bayesian: bool):
        super().__init__()
        channels = cfg.conv_channels[0]
        self.unflatten = nn.Unflatten(1, tuple(feature_shape))
        self.stem = nn.Sequential(_conv(bayesian, cfg, feature_shape[0], channels), nn.BatchNorm2d(channels),
                                  ACTIVATIONS[cfg.activation]())
        blocks = []
        for stage, width in enumerate(cfg.conv_channels):
            for i in range(cfg.res_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(ResidualBlock(bayesian, cfg, channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        # without dropout in the blocks (model.conv_dropout=false), one dropout before the last layer
        drop = [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 and not _conv_dropout(cfg) else []
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), *drop,
                                  _linear(bayesian, cfg, channels, num_classes))

    @property
    def cam_layer(self) -> nn.Module:
        """Where Grad-CAM looks: the last block's output, the finest map the prediction is pooled from."""
        return self.blocks[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(self.unflatten(x))))


def build_network(cfg: DictConfig, feature_shape: list[int], num_classes: int, bayesian: bool) -> nn.Module:
    """An MLP, small CNN or ResNet (``cfg.arch``) from flat rows to logits; torchbnn layers if ``bayesian``;
    with ``model.spectral_norm``, every layer but the last spectrally normalised to that coefficient."""
    net = _build(cfg, feature_shape, num_classes, bayesian)
    coeff = cfg.get("spectral_norm")
    if coeff:
        if bayesian:
            raise UserError("model.spectral_norm applies to deterministic networks, not the BNN's "
                            "torchbnn layers; set model.spectral_norm=null")
        apply_spectral_norm(net, float(coeff))
        net.eval()  # one pass fixes every conv's input shape, so its power-iteration state is in the state_dict
        with torch.no_grad():
            net(torch.zeros(1, math.prod(feature_shape)))
        net.train()
    return net


def _build(cfg: DictConfig, feature_shape: list[int], num_classes: int, bayesian: bool) -> nn.Module:
    act = ACTIVATIONS[cfg.activation]
    layers: list[nn.Module] = []
    if cfg.arch != "mlp" and len(feature_shape) != 3:
        raise UserError(
            f"model.arch={cfg.arch} needs image data [C, H, W], got features {feature_shape}; "
            "set data.image_shape or use model.arch=mlp"
        )
    if cfg.arch == "resnet":
        return ResNet(cfg, feature_shape, num_classes, bayesian)
    if cfg.arch == "cnn":
        channels, height, width = feature_shape
        layers.append(nn.Unflatten(1, tuple(feature_shape)))
        for out_channels in cfg.conv_channels:
            layers.append(_conv(bayesian, cfg, channels, out_channels))
            # pooling first: BatchNorm and the activation then touch a quarter of the values (a
            # training step ~0.6x as long; without BatchNorm the function is the same either way)
            if min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            if not bayesian:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(act())
            if _conv_dropout(cfg) > 0:
                layers.append(nn.Dropout(cfg.dropout))
            channels = out_channels
        layers.append(nn.Flatten())
        width_in = channels * height * width
    else:
        layers.append(nn.Flatten())
        width_in = math.prod(feature_shape)
    for hidden in cfg.hidden_sizes:
        layers += [_linear(bayesian, cfg, width_in, hidden), act()]
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        width_in = hidden
    layers.append(_linear(bayesian, cfg, width_in, num_classes))
    return nn.Sequential(*layers)


def last_linear(model: nn.Module) -> nn.Module:
    """The layer that maps penultimate features to logits (every network here ends in one)."""
    if isinstance(model, nn.Sequential):
        return model[-1]
    if isinstance(model, ResNet):
        return model.head[-1]
    raise TypeError(f"no known last layer in {type(model).__name__}")


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the last linear layer for rows ``x``, in eval mode (dropout off)."""
    captured: list[torch.Tensor] = []
    hook = last_linear(model).register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(x)
    finally:
        hook.remove()
        model.train(was_training)
    return captured[0].float()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here; use device=auto or cpu")
    return torch.device(name)


def image_shape_of(model: nn.Module) -> list[int] | None:
    """The [C, H, W] a CNN/ResNet unflattens its rows to; None for an MLP."""
    for module in model.modules():
        if isinstance(module, nn.Unflatten):
            return list(module.unflattened_size)
    return None


def bayesian_head(net: nn.Module, cfg: DictConfig, last_only: bool = False) -> nn.Module:
    """``net`` with its fully connected layers (``last_only``: its output layer alone) swapped for
    torchbnn BayesLinear layers of the same shapes: a "last layers Bayesian" network whose
    convolutions stay deterministic, BatchNorm included."""
    linears = [(parent, name, child) for parent in net.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name, child in linears[-1:] if last_only else linears:
        setattr(parent, name, _linear(True, cfg, child.in_features, child.out_features))
    return net
