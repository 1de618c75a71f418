"""Exact text leaks: what a BERT-style model's gradient gives away without any optimisation.

All functions read only the observation and the attacker's copy of the model.

- Token set: word-embedding rows with a gradient are the tokens of the batch. With a tied
  masked-LM decoder every row gets a gradient, but the decoder's part is low-rank (rank = number
  of masked positions) and spans the decoder's inputs; rows with a component outside that
  span are exactly the input tokens.
- Layer inputs: the gradient of a linear layer is a sum of (output gradient x input) outer
  products, so its row space is spanned by the inputs the layer saw. A candidate vector lies in
  that span iff it was (generically) one of the inputs: the span check of DAGER.
- Order: the position-embedding row j receives the same gradient as the word row of the token
  at position j, so (batch 1) the word rows are an exact 0/1 combination of the position rows.
- Labels: the output bias gradient is the sum over labelled rows of (probabilities - one-hot);
  with the probabilities recomputed from the recovered input, the label counts follow exactly.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from leakkit.errors import InputError
from leakkit.client.defenses import noise_variance
from leakkit.client.observation import Observation
from leakkit.engine.spans import noise_edge, row_span, span_residual
from leakkit.tasks.layers import input_of, is_conv1d as _is_conv1d, linear_groups

# Relative residual below which a vector counts as inside a gradient's input span. Float32
# gradients put true members near 1e-6; non-members sit near 1.
SPAN_TOL = 1e-3
# Stricter cut for splitting word-embedding rows: a token that is also a label has a row dominated
# by its decoder part, and only its small input part (well above float32 noise, ~1e-6) sets it apart.
ROW_OUTLIER = 8.0
FIT_TOL = 2e-5
FIT_SAMPLE = 2048  # word-embedding rows used to fit the tied decoder's span
LEVERAGE = 0.9  # a sample row above this leverage carries a direction of its own (a token row)
# A noisy tied table's token row stands off the decoder span by this many noise stds (per signal
# direction); MiniLM, SST-2 sentence 1 at std 1e-5: true tokens 0.39-42, the next row 1.2e-3, the 8x cut 2.9e-4.
NOISY_TOKEN_SIGMAS = 8.0
# Span checks on a noisy update: with the span cut at the noise's edge, a true input of the random
# GPT-2-shaped decoder (CoLA, batch 4) lies within 0.03 (first layer) and 0.22 (second layer) of it
# at noise std 1e-4, a wrong one no closer than 0.34 and 0.41; at 3e-4 they overlap (see bench/text.py).
NOISY_SPAN_TOL = 0.3
# A token's first-layer input in an encoder batch: the batch's own (token, position) pairs sit at
# float32's floor (MiniLM, SST-2 and Rotten Tomatoes batches of 4: at most 1.2e-6, 4.1e-6 once in a
# masked-LM batch of 16), pairs let through by LayerNorm's curvature mostly from 1.3e-6 to 5e-4.
# The sentence search tries the pairs below this first, and all of SPAN_TOL's only if that fails.
# Where the batch's pairs form cycles (a long batch, or [MASK] at many positions) the span closes over
# whole token-position components, foreign pairs sit at the floor too, and this tier is no narrower.
TIGHT_SPAN_TOL = 3e-6
NOISY_SPAN_SLACK = 3.0



# --- spans ---------------------------------------------------------------------------------
def estimate_noise_std(matrix: torch.Tensor) -> float:
    """Per-entry noise std of a full-rank [m, d] gradient whose signal has low rank, from its smallest
    singular value: for m > d, i.i.d. noise leaves no singular value below (sqrt(m) - sqrt(d)) times the std."""
    m, d = matrix.shape
    if m < d:
        matrix, (m, d) = matrix.T, (d, m)
    if m == d:
        return 0.0
    s = np.linalg.svd(matrix.double().cpu().numpy(), compute_uv=False)
    return float(s[-1] / (math.sqrt(m) - math.sqrt(d)))


def stacked_rows(observation: Observation, weight_names: Sequence[str], *, model: nn.Module | None = None) -> torch.Tensor:
    """The weight gradients of linear layers fed the same tensor, stacked as rows [sum of outputs, d].

    Args:
        model: the attacker's model, to orient the gradients of GPT-2's Conv1D layers (weight [in, out]).
    """
    def rows(name: str) -> torch.Tensor:
        g = observation.gradients[name].double()
        return g.T if model is not None and _is_conv1d(model.get_submodule(name.rpartition(".")[0])) else g

    return torch.cat([rows(n) for n in weight_names], dim=0)


def input_span(
    observation: Observation, weight_names: Sequence[str], *, rel_tol: float = 1e-6, model: nn.Module | None = None, noise_std: float = 0.0,
) -> torch.Tensor:
    """Span of the inputs of the linear layers `weight_names` (all fed the same tensor); with
    noise_std, only the directions that stand above the noise (see `row_span`)."""
    return row_span(stacked_rows(observation, weight_names, model=model), rel_tol=rel_tol, noise_std=noise_std)


def has_clean_rows(gradient: torch.Tensor) -> bool:
    """Whether a word-embedding gradient [V, d] has rows at exactly 0: noise would fill every row,
    so the update is clean."""
    return bool((gradient == 0).all(dim=1).any())


def update_noise(task: Any, observation: Observation, notes: list[str]) -> float:
    """Per-entry noise std of the update: from its metadata (the recorded defenses), else estimated
    from the second attention layer's gradient when that is full rank (a clean one has low rank)."""
    recorded = math.sqrt(noise_variance(observation))
    if recorded > 0:
        notes.append(f"noise std {recorded:.3g} from the update's metadata: spans keep the directions above it, "
                     "candidates are ranked by their residual, the closest first")
        return recorded
    groups = attention_groups(task)
    if len(groups) < 2 or not group_available(observation, groups[1]):
        return 0.0
    M = stacked_rows(observation, _weights(groups[1]), model=task.model)
    s = torch.linalg.svdvals(M)
    if s[-1] <= s[0] * 1e-5:
        return 0.0
    estimated = estimate_noise_std(M)
    words = observation.gradients.get(task.word_embedding_name())
    if words is not None and has_clean_rows(words):
        # a clean update whose batch has outgrown the layer, which no noise model explains
        used = int((words != 0).any(dim=1).sum())
        notes.append(f"the second attention layer's gradient is full rank although the word-embedding gradient is clean ({used} distinct "
                     f"tokens): the batch holds more tokens than the layer's width {M.shape[-1]}, more than the span checks can tell apart; "
                     f"hypotheses are ranked as under noise (std {estimated:.3g} estimated) and will be approximate. Fewer or shorter "
                     "sentences per update, or a wider model, keep the batch within the width")
    else:
        notes.append(f"the second attention layer's gradient is full rank: noise std estimated from the update as {estimated:.3g}")
    return estimated


def noisy_span_tol(observation: Observation, weight_names: Sequence[str], noise_std: float, *, model: nn.Module | None = None) -> float:
    """Residual a real input may show against a span cut at the noise: the noise tilts each kept
    direction by about its edge over the direction's singular value (Wedin), so the tolerance is
    NOISY_SPAN_SLACK times the edge over the median kept singular value, between SPAN_TOL and NOISY_SPAN_TOL."""
    if noise_std <= 0:
        return SPAN_TOL
    M = stacked_rows(observation, weight_names, model=model)
    s = np.linalg.svd(M.cpu().numpy(), compute_uv=False)
    edge = noise_edge(M.shape, noise_std)
    kept = s[s > edge]
    if not len(kept):
        return NOISY_SPAN_TOL
    return float(min(max(NOISY_SPAN_SLACK * edge / np.median(kept), SPAN_TOL), NOISY_SPAN_TOL))


def capture_input(model: nn.Module, module_name: str, **forward: Any) -> torch.Tensor:
    """The tensor `module_name` receives in a forward pass (stopped right there)."""
    with torch.no_grad():
        return input_of(model, module_name, lambda: model(**forward))


# --- token set ------------------------------------------------------------------------------
@dataclass
class TokenLeak:
    """Tokens read off the word-embedding gradient.

    tokens: sorted token ids present in the batch.
    input_rows: [len(tokens), d] their rows' input part, projected off the decoder span.
    decoder_span: [d, M] basis of the tied decoder's inputs (M = masked positions), or [d, 0].
    """

    tokens: list[int]
    input_rows: torch.Tensor
    decoder_span: torch.Tensor


def token_leak(word_grad: torch.Tensor, *, tied: bool, rel_tol: float = 1e-6, noise_std: float = 0.0) -> TokenLeak:
    """Separate the input tokens from a word-embedding gradient [V, d].

    Untied (or classification): the non-zero rows. Tied masked LM: every row of the decoder part
    lies in an M-dimensional span S (M = masked positions); a token row adds a direction of its own.
    S is fitted on a fixed sample of the normalised rows, after dropping the sample rows with
    leverage near 1 (a row whose removal lowers the rank carries a direction no other row has:
    a token row). Rows with a component off S are then exactly the input tokens, including a
    token that is also a label (its row mixes both parts). One SVD of a FIT_SAMPLE x d matrix per
    pass: well under a second for BERT's 30k-row table.

    noise_std: per-entry std of noise the client added (from the update's metadata). A noisy tied
    table, declared or found (the clean fit then fills the whole width), goes to `_noisy_tied_leak`.
    """
    g = word_grad.double()
    norms = g.norm(dim=1)
    d = g.shape[1]
    if not tied:
        nz = torch.nonzero(used_rows(norms)).flatten()
        return TokenLeak(nz.tolist(), g[nz], torch.zeros(d, 0, dtype=torch.float64))
    if noise_std > 0:
        return _noisy_tied_leak(g, norms, noise_std)
    nz = torch.nonzero(norms > 0).flatten()
    unit = (g[nz] / norms[nz, None]).cpu().numpy()
    # tens of thousands of decoder rows repeat the same M directions: a fixed sample spans S
    rng = np.random.default_rng(0)
    sample = unit[np.sort(rng.choice(len(unit), FIT_SAMPLE, replace=False))] if len(unit) > FIT_SAMPLE else unit
    for _ in range(3):
        u, s, vt = np.linalg.svd(sample, full_matrices=False)
        r = int((s > rel_tol * s[0]).sum()) if s.size and s[0] > 0 else 0
        unique = (u[:, :r] ** 2).sum(1) > LEVERAGE
        if not unique.any() or unique.all():
            break
        sample = sample[~unique]
    if r >= d:  # every direction looks like the decoder's: noise the metadata did not declare
        return _noisy_tied_leak(g, norms, None)
    basis_np = np.ascontiguousarray(vt[:r].T)
    outliers = np.sqrt(np.clip(1 - ((unit @ basis_np) ** 2).sum(1), 0, None)) > FIT_TOL
    return _leak(g, nz[torch.from_numpy(outliers)], torch.from_numpy(basis_np).to(g))


def _leak(g: torch.Tensor, rows: torch.Tensor, decoder: torch.Tensor) -> TokenLeak:
    """The token rows of table `g`, their input parts projected off the decoder span [d, M]."""
    return TokenLeak(rows.tolist(), g[rows] - (g[rows] @ decoder) @ decoder.T, decoder)


def _noisy_tied_leak(g: torch.Tensor, norms: torch.Tensor, noise_std: float | None) -> TokenLeak:
    """`token_leak` on a noisy tied table [V, d]: every row is non-zero and the normalised rows fill
    the width, so the decoder span is cut at the noise's edge instead.

    The candidates are the norm outliers (token, label and likely-predicted rows). The rows below
    them carry only the decoder's small per-token share plus noise: their directions above the
    noise edge are the decoder span (those the noise leaves visible). A candidate is a token when,
    inside the candidates' own signal subspace (also cut at the edge), it stands off that span by
    more than NOISY_TOKEN_SIGMAS noise stds per direction. noise_std None: estimated from the rows
    below the candidates.
    """
    d = g.shape[1]
    candidates = torch.nonzero(used_rows(norms)).flatten()
    rest = torch.ones(len(g), dtype=torch.bool)
    rest[candidates] = False
    nothing = TokenLeak([], g[:0], torch.zeros(d, 0, dtype=torch.float64))
    if not len(candidates) or int(rest.sum()) <= d:
        return nothing
    if noise_std is None:
        noise_std = estimate_noise_std(g[rest])
    if noise_std <= 0:
        return nothing
    decoder = row_span(g[rest], noise_std=noise_std)
    signal = row_span(g[candidates], noise_std=noise_std)
    coords = g[candidates] @ signal
    inside = signal.T @ decoder
    off = (coords - (coords @ inside) @ inside.T).norm(dim=1)
    return _leak(g, candidates[off > NOISY_TOKEN_SIGMAS * noise_std * math.sqrt(max(signal.shape[1], 1))], decoder)


# --- order (batch 1) -------------------------------------------------------------------------
def order_from_positions(token_rows: torch.Tensor, position_rows: torch.Tensor, decoder_span: torch.Tensor) -> torch.Tensor:
    """Which token sits at which position, for one sentence.

    Args:
        token_rows: [T, d] input part of the word-embedding gradient rows of the T tokens.
        position_rows: [n, d] position-embedding gradient rows of the n positions.
        decoder_span: [d, M] directions to remove from both (the tied decoder's inputs).
    Returns:
        [T, n] assignment, 1.0 where token t is at position j (float; exact rows are 0/1).
    Raises:
        InputError: more positions than the embedding width (the solve is underdetermined).
    """
    P = position_rows.double()
    if decoder_span.shape[1]:
        P = P - (P @ decoder_span) @ decoder_span.T
    if P.shape[0] > P.shape[1] - decoder_span.shape[1]:
        raise InputError(
            f"{P.shape[0]} positions against {P.shape[1] - decoder_span.shape[1]} free directions (embedding width {P.shape[1]} "
            f"less the tied decoder's span of {decoder_span.shape[1]}, which noise can fill): order is not identifiable from the position gradient"
        )
    # token_rows = S @ P; P has independent rows, so S = token_rows @ pinv(P)
    return token_rows.double() @ torch.linalg.pinv(P)


def nonzero_positions(position_grad: torch.Tensor) -> list[int]:
    """Indices of position-embedding rows that received a gradient (see `used_rows`)."""
    return torch.nonzero(used_rows(position_grad.double().norm(dim=1))).flatten().tolist()


def used_rows(norms: torch.Tensor) -> torch.Tensor:
    """Which embedding rows the batch used, from their gradient norms.

    A clean update leaves unused rows exactly zero. When every row is non-zero (a noise
    defense; a real batch never uses the whole table), the used rows are the norm outliers:
    above the median by ROW_OUTLIER robust standard deviations (1.4826 x the median absolute
    deviation).
    """
    nonzero = norms > 0
    if not bool(nonzero.all()):
        return nonzero
    med = norms.median()
    spread = 1.4826 * (norms - med).abs().median()
    return norms > med + ROW_OUTLIER * spread


# --- layout ---------------------------------------------------------------------------------
def infer_layout(task: Any, observation: Observation) -> Any:
    """Sequence length (and, for batches, per-example lengths when they can be read) from the gradient.

    Uses the position-embedding gradient when it is shared, otherwise the first attention layer's
    input span over the whole vocabulary.
    """
    from leakkit.tasks.text import TextLayout

    B = observation.batch_size
    pos_name = task.position_embedding_name()
    if pos_name and pos_name in observation.gradients:
        rows = nonzero_positions(observation.gradients[pos_name])
        if not rows:
            raise InputError("the position-embedding gradient is all zero: nothing to attack")
        n = rows[-1] - rows[0] + 1
    else:
        n = len(position_candidates(task, observation, tokens=None))
    return TextLayout(lengths=[n] * B)


def position_candidates(
    task: Any, observation: Observation, *, tokens: Sequence[int] | None, n_max: int | None = None, chunk: int = 2048,
    noise_std: float = 0.0, tol: float = SPAN_TOL, most: int | None = None, least: int = 0,
) -> list[list[int]]:
    """For each position j, the tokens t whose first-layer input x(t, j) lies in the span the first
    attention layer's gradient reveals, in token-id order (`scored_position_candidates` has the
    residuals, closest first)."""
    scored = scored_position_candidates(task, observation, tokens=tokens, n_max=n_max, chunk=chunk, noise_std=noise_std, tol=tol, most=most, least=least)
    return token_lists(scored)


def token_lists(scored: list[list[tuple[float, int]]]) -> list[list[int]]:
    """Each position's token ids, in id order, from (residual, token) pairs."""
    return [sorted(t for _, t in h) for h in scored]


def tight_candidates(scored: list[list[tuple[float, int]]], tol: float = TIGHT_SPAN_TOL) -> list[list[int]]:
    """Each position's candidates within `tol` (all of them where none is): the first-layer inputs
    that sit at float32's floor, not at LayerNorm's curvature just above it."""
    return [sorted(t for r, t in h if r < tol) or ids for h, ids in zip(scored, token_lists(scored))]


def scored_position_candidates(
    task: Any, observation: Observation, *, tokens: Sequence[int] | None, n_max: int | None = None, chunk: int = 2048,
    noise_std: float = 0.0, tol: float = SPAN_TOL, most: int | None = None, least: int = 0,
) -> list[list[tuple[float, int]]]:
    """For each position j, (residual, token) for the tokens t whose first-layer input x(t, j) lies
    in the span the first attention layer's gradient reveals, closest first. Positions are
    scanned until one has no candidate.

    In a batch this is a superset: when one token sits at positions i and j, the span holds (up to
    LayerNorm's small curvature) the difference of the two position embeddings, so every token at i
    also passes at j. An encoder batch of 4 gives up to ~40 candidates per position, the separator
    at positions where no sentence ends among them (`leakkit.text.attack.assemble` sorts them out).

    Args:
        tokens: token ids to test (None: the whole vocabulary, for withheld word-embedding gradients).
        n_max: positions to scan (default: the model's limit).
        noise_std: the update's noise (the span keeps only directions above it).
        tol: largest relative residual that passes (under noise, at most `noisy_span_tol`).
        most: keep at most this many candidates per position, the closest (a noisy update).
        least: keep at least this many per position, the closest, even above `tol`: under noise a
            ranking degrades gradually where a threshold stops the scan at the first position
            whose tokens the noise pushed over it (the scan then runs to `n_max`).
    """
    model = task.model
    groups = attention_groups(task)
    basis = input_span(observation, _weights(groups[0]), model=model, noise_std=noise_std)
    if noise_std > 0:
        tol = min(tol, noisy_span_tol(observation, _weights(groups[0]), noise_std, model=model))
    vocab = torch.tensor(tokens if tokens is not None else range(task.embedding_matrix().shape[0]), dtype=torch.long)
    n_max = n_max or task.max_length
    out: list[list[tuple[float, int]]] = []
    step = 16
    j = 0
    dev = next(model.parameters()).device
    while j < n_max:
        width = min(step, n_max - j) + j
        hits: list[list[tuple[float, int]]] = [[] for _ in range(width - j)]
        for start in range(0, len(vocab), chunk):
            ids = vocab[start : start + chunk]
            grid = ids[:, None].expand(-1, width).to(dev)
            x = capture_input(model, groups[0][0], input_ids=grid, attention_mask=torch.ones_like(grid))
            res = span_residual(x[:, j:width], basis.to(dev)).cpu()  # [chunk, width - j]
            for k in range(width - j):
                keep = res[:, k] < tol
                if least:
                    keep[res[:, k].argsort()[:least]] = True
                hits[k] += zip(res[keep, k].tolist(), ids[keep].tolist())
        for h in hits:
            if not h:
                return out
            h.sort()
            if least:  # each chunk added its closest: keep those passing, or the `least` closest overall
                h = h[: max(least, sum(1 for x in h if x[0] < tol))]
            out.append(h[:most])
        j = width
    return out


def attention_groups(task: Any) -> list[list[str]]:
    """Cached `linear_groups` of the task's model."""
    cached = getattr(task, "_linear_groups", None)
    if cached is None:
        dev = next(task.model.parameters()).device
        ids = torch.tensor([[int(task.tokenizer.cls_token_id or 0), int(task.tokenizer.sep_token_id or 1)]], device=dev)
        cached = linear_groups(task.model, ids)
        if not cached:
            raise InputError("could not find attention layers (linear layers sharing one input) in the model")
        task._linear_groups = cached
    return cached


def _weights(group: list[str]) -> list[str]:
    return [f"{n}.weight" for n in group]


def group_available(observation: Observation, group: list[str]) -> bool:
    return all(w in observation.gradients for w in _weights(group))


def layer_span(task: Any, observation: Observation, layer: int, *, noise_std: float = 0.0) -> torch.Tensor:
    """Basis [d, r] of attention layer `layer`'s inputs, as its gradient reveals them (cached on
    `task` per observation, unless a search narrowed it: `set_layer_span`). On a clean update r is
    the batch's token count while it is below d: attention mixes each token's own sentence into its
    input, so no two inputs coincide."""
    key = ("span", layer, noise_std)
    cache = task.__dict__.setdefault("_span_cache", {})
    if key not in cache or cache[key][0] is not observation:
        cache[key] = (observation, input_span(observation, _weights(attention_groups(task)[layer]), model=task.model, noise_std=noise_std))
    return cache[key][1]


def set_layer_span(task: Any, observation: Observation, layer: int, basis: torch.Tensor, *, noise_std: float = 0.0) -> None:
    """Replace the span `layer_span` returns for this observation."""
    task.__dict__.setdefault("_span_cache", {})[("span", layer, noise_std)] = (observation, basis)


def layer_residual(
    task: Any, observation: Observation, layer: int, input_ids: torch.Tensor, lengths: Sequence[int], *, mask: torch.Tensor | None = None,
    noise_std: float = 0.0,
) -> torch.Tensor:
    """Per-example mean span residual of attention layer `layer`'s inputs, for candidate sentences.

    Args:
        input_ids: [S, n] candidate sentences (padded).
        lengths: [S] their lengths.
        mask: [S, n] attention mask to use instead of the lengths' (1 = a known token; a partial
            sentence keeps its tokens at their absolute positions and hides the unknown ones).
        noise_std: the update's noise: the span keeps only the directions above it.
    Returns:
        [S] mean relative residual over each sentence's attended positions (0 for the true sentences).
    """
    groups = attention_groups(task)
    basis = layer_span(task, observation, layer, noise_std=noise_std)
    n = input_ids.shape[1]
    if mask is None:
        mask = torch.stack([torch.arange(n) < L for L in lengths]).long()
    mask = mask.to(input_ids.device)
    x = capture_input(task.model, groups[layer][0], input_ids=input_ids, attention_mask=mask)
    res = span_residual(x, basis.to(x.device)).cpu()
    m = mask.cpu().double()
    return (res * m).sum(1) / m.sum(1)


# --- labels ---------------------------------------------------------------------------------
def label_counts(probs: torch.Tensor, bias_grad: torch.Tensor, rows: int, *, reduction: str) -> torch.Tensor:
    """How often each class is a label, from the output bias gradient and recomputed probabilities.

    Args:
        probs: [R, C] the model's probabilities at the R labelled rows (recomputed by the attacker).
        bias_grad: [C] gradient of the output bias.
        rows: R, the number of labelled rows the loss averaged over.
    Returns:
        [C] counts (rounded; they sum to R when the inputs are right).
    """
    scale = rows if reduction == "mean" else 1
    counts = probs.double().sum(0) - scale * bias_grad.double()
    return counts.round().clamp_min(0).long()
