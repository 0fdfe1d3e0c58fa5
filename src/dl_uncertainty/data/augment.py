"""Training-time image augmentation on the device: random flips and padded crops."""

from __future__ import annotations

import torch

# ---------------------------------------------------------------- training-time augmentation


def augment(x: torch.Tensor, shape: list[int], hflip: bool, crop_padding: int,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flips and random crops of zero-padded images, per example, on x's device.

    ``x`` holds flat normalised rows [B, C*H*W]; zero padding is the training mean.
    """
    batch, (channels, height, width) = len(x), shape
    images = x.view(batch, channels, height, width)
    if hflip:
        flip = torch.rand(batch, generator=generator).to(x.device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if crop_padding:
        p = crop_padding
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        dy, dx = (torch.randint(0, 2 * p + 1, (2, batch), generator=generator)).to(x.device)
        rows = (dy[:, None] + torch.arange(height, device=x.device))[:, :, None]
        cols = (dx[:, None] + torch.arange(width, device=x.device))[:, None, :]
        picked = padded[torch.arange(batch, device=x.device)[:, None, None], :, rows, cols]  # [B, H, W, C]
        images = picked.permute(0, 3, 1, 2)
    return images.reshape(batch, -1)
