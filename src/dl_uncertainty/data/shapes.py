"""A generated image folder every machine can make: circles, squares and triangles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# ---------------------------------------------------------------- a generated data set


PER_CLASS = 300  # 900 images: enough that one test image is 0.6 % of accuracy and far-OOD AUROC 0.99 is measurable


def make_shapes(folder: str | Path, per_class: int = PER_CLASS, size: int = 32, seed: int = 0) -> Path:
    """``folder/{circle,square,triangle}/*.png``: one bright filled shape per image on a dark
    background, random size, place and colours, so a model must learn the outline, not a colour."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for shape in ("circle", "square", "triangle"):
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background = tuple(int(v) for v in rng.integers(0, 90, 3))
            image = Image.new("RGB", (size, size), background)
            draw = ImageDraw.Draw(image)
            radius = rng.uniform(0.25, 0.45) * size
            cx, cy = rng.uniform(radius, size - radius, 2)
            colour = tuple(int(v) for v in rng.integers(140, 256, 3))
            if shape == "circle":
                draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
            elif shape == "square":
                draw.rectangle([cx - radius * 0.8, cy - radius * 0.8, cx + radius * 0.8, cy + radius * 0.8],
                               fill=colour)
            else:
                angle = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
                draw.polygon(list(zip(cx + radius * np.cos(angle), cy + radius * np.sin(angle), strict=True)),
                             fill=colour)
            image.save(folder / shape / f"{shape}_{i:04d}.png")
    return folder
