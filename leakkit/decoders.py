"""Decoders: map recovered vectors back to something a person can look at."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from leakkit.registry import Registry

# vectors [B, n, d], embedding table [V, d], allowed token ids [K] -> token ids [B, n]
TokenDecoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TOKEN_DECODERS: Registry[TokenDecoder] = Registry("token decoder")


def to_uint8_images(pixels: torch.Tensor) -> list[np.ndarray]:
    """Pixels in [0, 1], shape [B, C, H, W] -> list of H x W x 3 uint8 arrays (grey repeated)."""
    arr = pixels.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    out = []
    for im in arr:
        im = np.transpose(im, (1, 2, 0))
        out.append(np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im)
    return out


def grid(rows: list[list[np.ndarray]], *, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile equally sized H x W x 3 uint8 images into one picture, each scaled up by `scale`."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    H, W = h * scale, w * scale
    canvas = np.full((len(rows) * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            big = np.kron(im, np.ones((scale, scale, 1), np.uint8))
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            canvas[y : y + H, x : x + W] = big
    return canvas


def _nearest(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return allowed[scores.argmax(-1)]


@TOKEN_DECODERS.register("cosine", description="nearest token by cosine similarity")
def nearest_cosine(vectors: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Token whose embedding has the largest cosine with each vector. Shape: [B, n, d] -> [B, n]."""
    rows = nn_normalize(table[allowed])
    return _nearest(nn_normalize(vectors) @ rows.T, allowed)


@TOKEN_DECODERS.register("centered-cosine", description="cosine after removing the mean embedding (ignores the shared offset)")
def nearest_centered_cosine(vectors: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Cosine similarity after subtracting the table's mean embedding from both sides."""
    mean = table.mean(0)
    rows = nn_normalize(table[allowed] - mean)
    return _nearest(nn_normalize(vectors - mean) @ rows.T, allowed)


@TOKEN_DECODERS.register("l2", description="nearest token by Euclidean distance")
def nearest_l2(vectors: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Token whose embedding is closest in L2."""
    rows = table[allowed]
    dist = vectors.pow(2).sum(-1, keepdim=True) - 2 * vectors @ rows.T + rows.pow(2).sum(-1)
    return _nearest(-dist, allowed)


def nn_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
