"""Pixels -> pictures a person can look at: uint8 images and tiled grids."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8_images(pixels: torch.Tensor) -> list[np.ndarray]:
    """Pixels in [0, 1], shape [B, C, H, W] -> list of H x W x 3 uint8 arrays (grey repeated)."""
    arr = pixels.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    out = []
    for im in arr:
        im = np.transpose(im, (1, 2, 0))
        out.append(np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im)
    return out


def grid(rows: list[list[np.ndarray]], *, scale: int = 4, pad: int = 2, captions: list[list[str]] | None = None) -> np.ndarray:
    """Tile equally sized H x W x 3 uint8 images into one picture, each scaled up by `scale`.

    captions: optional text under each image (same shape as `rows`), drawn with Pillow's default font.
    """
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    H, W = h * scale, w * scale
    band = 12 if captions else 0
    canvas = np.full((len(rows) * (H + band + pad) + pad, cols * (W + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            big = np.kron(im, np.ones((scale, scale, 1), np.uint8))
            y, x = pad + r * (H + band + pad), pad + c * (W + pad)
            canvas[y : y + H, x : x + W] = big
    if not captions:
        return canvas
    from PIL import Image, ImageDraw

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for r, line in enumerate(captions):
        for c, text in enumerate(line):
            draw.text((pad + c * (W + pad) + 1, pad + r * (H + band + pad) + H), text[: max(1, W // 6)], fill=(0, 0, 0))
    return np.asarray(picture)
