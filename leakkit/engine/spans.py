"""Spans of linear layers' inputs, read off their weight gradients.

A linear layer's weight gradient is a sum of (error x input) outer products, so its row space
is spanned by the inputs the layer saw: a candidate input belongs to the batch only if it lies
in that span. Shared by the exact text attacks and the engine's `subspace` objective.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

NOISE_MARGIN = 1.2  # singular values kept above this multiple of the noise's largest one


def noise_edge(shape: Sequence[int], noise_std: float) -> float:
    """Largest singular value expected of an [m, d] matrix of i.i.d. N(0, noise_std^2) entries,
    sqrt(m) + sqrt(d) times the std (Bai-Yin), with NOISE_MARGIN to spare: directions below it are
    indistinguishable from the noise."""
    m, d = shape
    return NOISE_MARGIN * noise_std * (math.sqrt(m) + math.sqrt(d))


def row_span(matrix: torch.Tensor, *, rel_tol: float = 1e-6, noise_std: float = 0.0) -> torch.Tensor:
    """Orthonormal basis [d, r] of the row space of `matrix` [m, d]: singular values above rel_tol * max
    and, for a noisy gradient, above the noise's edge (`noise_edge`)."""
    m = matrix.double()
    if m.abs().max() == 0:
        return torch.zeros(m.shape[1], 0, dtype=torch.float64)
    # numpy's LAPACK: torch's CPU SVD/eigh are an order of magnitude slower on these shapes
    _, s, vh = np.linalg.svd(m.cpu().numpy(), full_matrices=False)
    r = int((s > max(rel_tol * s[0], noise_edge(m.shape, noise_std))).sum())
    return torch.from_numpy(np.ascontiguousarray(vh[:r].T)).to(m.device)


def span_residual(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Relative distance of each vector [..., d] from span(basis [d, r]); shape [...]."""
    v = vectors.double()
    b = basis.to(v)
    rest = v - (v @ b) @ b.T
    return rest.norm(dim=-1) / v.norm(dim=-1).clamp_min(1e-300)
