"""Grad-CAM for the conv models: where in the image the evidence for a class comes from.

For stochastic models the map is averaged over MC samples (dropout on, fresh weights per pass),
and over the members of an ensemble, so it explains the averaged prediction.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchbnn
from torch import nn

from dl_uncertainty.families.base import family_of
from dl_uncertainty.uncertainty.mc_plan import mc_mode

CONV_TYPES = (nn.Conv2d, torchbnn.BayesConv2d)


def _cam_layer(model: nn.Module) -> nn.Module | None:
    """The model's own choice (``cam_layer``, e.g. a ResNet's last block), else its last conv."""
    if hasattr(model, "cam_layer"):
        return model.cam_layer
    convs = [m for m in model.modules() if isinstance(m, CONV_TYPES)]
    return convs[-1] if convs else None


def _cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, samples: int) -> torch.Tensor | None:
    conv = _cam_layer(model)
    if conv is None:
        return None
    captured: list[torch.Tensor] = []
    hook = conv.register_forward_hook(lambda _m, _i, out: captured.append(out))
    cams = []
    try:
        with mc_mode(model), torch.enable_grad():
            for _ in range(samples):
                captured.clear()
                score = model(x).gather(1, target[:, None]).sum()
                (grad,) = torch.autograd.grad(score, captured[0])
                weights = grad.mean(dim=(2, 3), keepdim=True)
                cams.append(F.relu((weights * captured[0]).sum(1)).detach())
    finally:
        hook.remove()
    return torch.stack(cams).mean(0)


def grad_cam(model: nn.Module, x: np.ndarray, target: np.ndarray, image_shape: list[int],
             samples: int = 8) -> np.ndarray | None:
    """Maps [N, H, W] in [0, 1] for class ``target`` of each flat input row, or None (no conv layer)."""
    device = next(model.parameters()).device
    inputs = torch.as_tensor(x, dtype=torch.float32, device=device)
    labels = torch.as_tensor(target, dtype=torch.long, device=device)
    members = family_of(model).networks(model)
    maps = [m for m in (_cam(member, inputs, labels, samples) for member in members) if m is not None]
    if not maps:
        return None
    cam = torch.stack(maps).mean(0)[:, None]
    cam = F.interpolate(cam, size=tuple(image_shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (cam / peak).cpu().numpy()
