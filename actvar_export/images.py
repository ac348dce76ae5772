"""Labelled PNG grids of generated images."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .fsutil import atomic_write


def to_uint8(images_B3HW: torch.Tensor) -> np.ndarray:
    return (images_B3HW.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def save_raw(images_B3HW: torch.Tensor, out: Path) -> Path:
    """The images as one uint8 NHWC .npy (what `actvar-run --raw` writes), atomically."""
    imgs = to_uint8(images_B3HW)
    return atomic_write(out, lambda tmp: np.save(tmp, imgs), suffix=".npy")   # tmp ends in .npy: saved as named


def save_grid(images_B3HW: torch.Tensor, out: Path, labels: Optional[Sequence[str]] = None,
              title: Optional[str] = None, cols: Optional[int] = None) -> Path:
    """Write a grid with one caption under each image (and an optional title) atomically."""
    imgs = to_uint8(images_B3HW)
    B, H, W, _ = imgs.shape
    cols = cols or min(B, 4)
    rows = math.ceil(B / cols)
    cap, top, pad = 16, (18 if title else 0), 4
    canvas = Image.new("RGB", (cols * (W + pad) + pad, top + rows * (H + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 3), title, fill="black")
    for i in range(B):
        r, c = divmod(i, cols)
        x, y = pad + c * (W + pad), top + pad + r * (H + cap + pad)
        canvas.paste(Image.fromarray(imgs[i]), (x, y))
        if labels:
            draw.text((x + 2, y + H + 2), str(labels[i]), fill="black")
    return atomic_write(out, lambda tmp: canvas.save(tmp, format="PNG"))
