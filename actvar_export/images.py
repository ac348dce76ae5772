"""Labelled PNG grids of generated images."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .fsutil import atomic_write


def to_uint8(images_B3HW) -> np.ndarray:
    """Images in [0, 1] (B, 3, H, W; a torch tensor or a float32 array) as uint8 (B, H, W, 3): clamp,
    ×255 in float32, round half to even. The one conversion every path uses (CLI, Triton models)."""
    x = images_B3HW.detach().float().cpu().numpy() if hasattr(images_B3HW, "detach") else np.asarray(images_B3HW, np.float32)
    return np.rint(np.clip(x, 0, 1) * np.float32(255)).astype(np.uint8).transpose(0, 2, 3, 1)


def to_uint8_tensor(images_B3HW):
    """to_uint8 on a torch tensor where it lives (e.g. the GPU): the same clamp, ×255 in float32 and round half to
    even, bit for bit; uint8 (B, H, W, 3) as a permuted view (copy it into a buffer or call .contiguous())."""
    import torch
    return images_B3HW.float().clamp(0, 1).mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1)


def _uint8(images) -> np.ndarray:
    return images if isinstance(images, np.ndarray) and images.dtype == np.uint8 else to_uint8(images)


def save_raw(images, out: Path) -> Path:
    """The images as one uint8 (B, H, W, 3) .npy (what `actvar-run --raw` and `request --raw` write), atomically.
    `images` are floats in [0, 1] (B, 3, H, W) or already uint8 (B, H, W, 3)."""
    imgs = np.ascontiguousarray(_uint8(images))
    def write(tmp):
        with open(tmp, "wb") as f:             # a file object: np.save adds no ".npy" to the temporary name
            np.save(f, imgs)
    return atomic_write(out, write)


def save_grid(images, out: Path, labels: Optional[Sequence[str]] = None,
              title: Optional[str] = None, cols: Optional[int] = None) -> Path:
    """Write a grid with one caption under each image (and an optional title) atomically. `images`
    are floats in [0, 1] (B, 3, H, W) or already uint8 (B, H, W, 3)."""
    from PIL import Image, ImageDraw
    imgs = _uint8(images)
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
