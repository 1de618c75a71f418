"""Token decoders: recovered word-embedding vectors -> the nearest tokens of the vocabulary."""

from __future__ import annotations

from typing import Callable

import torch

from leakkit.registry import Registry

# vectors [B, n, d], embedding table [V, d], allowed token ids [K] -> token ids [B, n]
TokenDecoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TOKEN_DECODERS: Registry[TokenDecoder] = Registry("token decoder")


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
