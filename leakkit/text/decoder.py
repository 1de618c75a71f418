"""Exact batches from a causal LM's gradient: DAGER's left-to-right search (Petrov et al., NeurIPS 2024).

In a decoder, the input of the second attention layer at position j depends only on tokens 0..j.
So a prefix can be checked on its own: it is a prefix of some sentence in the batch iff its last
position's second-layer input lies in the span that layer's weight gradient reveals. Growing
every surviving prefix by every candidate token and keeping the ones that pass recovers the whole
batch, one position at a time, with at most (sentences x candidates) checks per position.

Candidates come from the word-embedding gradient (`token_leak`: the tied output layer's part is
low-rank), or, when that gradient is withheld, from the first layer's span over the vocabulary.
Nothing here reads the client's data: only the update and the attacker's copy of the model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from leakkit.client.observation import Observation
from leakkit.errors import ConfigError, InputError
from leakkit.tasks.text import CausalLanguageModeling, TextTask
from leakkit.text import analytic as ta

# prefixes checked in one forward pass (memory bound: chunk x length x width floats)
CHUNK = 512


@dataclass
class PrefixSearch:
    """What the left-to-right search found.

    sentences: complete token sequences (start to end token), in the order found.
    residuals: their largest per-position span residual (0 for a sentence the client sent).
    prefixes: every prefix that passed and was extended (a sentence may also end there).
    checked: prefixes scored; positions: how far the search went; notes: what a user should know.
    """

    sentences: list[list[int]]
    residuals: list[float]
    prefixes: list[list[int]] = field(default_factory=list)
    checked: int = 0
    positions: int = 0
    notes: list[str] = field(default_factory=list)


def candidate_tokens(task: CausalLanguageModeling, observation: Observation, notes: list[str]) -> list[int] | None:
    """Token ids the batch may contain: the word-embedding leak, or None (scan the vocabulary)."""
    name = task.word_embedding_name()
    if name not in observation.gradients:
        notes.append("word-embedding gradient withheld: candidate tokens come from the first layer's span over the vocabulary")
        return None
    leak = ta.token_leak(observation.gradients[name], tied=task.tied_decoder())
    if not leak.tokens:
        notes.append("the word-embedding gradient shows no input rows (its output part is full rank): scanning the vocabulary")
        return None
    return leak.tokens


def search(
    task: CausalLanguageModeling, observation: Observation, candidates: list[list[int]], *,
    tol: float = ta.SPAN_TOL, max_alive: int = 4096, noise_std: float = 0.0,
) -> PrefixSearch:
    """Grow prefixes left to right, keeping those whose newest position passes the second layer's span check.

    Args:
        task: the attacker's copy of the decoder (any dtype; float32 is enough for the check).
        candidates: per position, the tokens allowed there (from the first layer).
        tol: largest relative span residual that passes (SPAN_TOL for a clean update; under noise at most `ta.noisy_span_tol`).
        max_alive: most prefixes kept per position; the lowest residuals win when more pass (noisy updates).
        noise_std: the update's per-entry noise: the span keeps only the directions above it.
    Returns:
        The complete sentences: prefixes no candidate extends, with the end token appended. A
        sentence's last token is only ever predicted, never read, so no span shows it; without an
        end token in the tokenizer the last real token of each sentence is not recovered.
    """
    groups = ta.attention_groups(task)
    if len(groups) < 2 or not ta.group_available(observation, groups[1]):
        raise ConfigError("the decoder search needs the second attention layer's gradient")
    model = task.model
    dev = next(model.parameters()).device
    basis = second_layer_span(task, observation, noise_std).to(device=dev, dtype=next(model.parameters()).dtype)
    if noise_std > 0:
        tol = min(tol, ta.noisy_span_tol(observation, ta._weights(groups[1]), noise_std, model=model))
        out_tol = f"second layer: span residuals below {tol:.3g} pass"
    else:
        out_tol = ""
    if basis.shape[1] >= basis.shape[0] - 1:
        # every vector lies in a full-rank span: the check would pass everything and the search explode
        raise InputError(
            f"the second attention layer's gradient has full rank ({basis.shape[1]} of {basis.shape[0]}) above the noise: "
            "the batch holds more tokens than the model is wide, or the noise is larger than recorded"
        )
    _, end = task.boundary_ids()
    out = PrefixSearch(sentences=[], residuals=[], notes=[out_tol] if out_tol else [])
    # (prefix, its worst residual so far, the first layer's keys and values for it [heads, j, head_dim])
    alive: list[tuple[list[int], float, Any]] = [([], 0.0, None)]
    for j, allowed in enumerate(candidates):
        trials = [(k, t) for k in range(len(alive)) for t in allowed]
        if not trials:
            break
        residual = torch.empty(len(trials), dtype=torch.float64)
        kv: list[Any] = [None] * len(trials)
        for start in range(0, len(trials), CHUNK):
            part = trials[start : start + CHUNK]
            x, caches = _newest_inputs(model, groups[1][0], [alive[k] for k, _ in part], [t for _, t in part], dev)
            r = ta.span_residual(x, basis).cpu()
            residual[start : start + len(part)] = r
            # only prefixes that pass keep their keys and values: a noisy search tries many more than pass
            kv[start : start + len(part)] = [c if float(r[i]) < tol else None for i, c in enumerate(caches)]
        out.checked += len(trials)
        out.positions = j + 1
        passed = sorted((float(residual[i]), i) for i in range(len(trials)) if residual[i] < tol)
        if len(passed) > max_alive:
            out.notes.append(f"{len(passed)} prefixes passed at position {j}; kept the {max_alive} closest")
            passed = passed[:max_alive]
        # a prefix that nothing extends is a whole sentence: its last token never feeds the loss
        # (it is only predicted), so it leaves no input in any span; the end token is appended
        extended = {trials[i][0] for _, i in passed}
        out.prefixes += [alive[k][0] for k in sorted(extended) if alive[k][0]]
        for k, (p, worst, _) in enumerate(alive):
            if p and k not in extended:
                out.sentences.append(p + ([end] if end is not None else []))
                out.residuals.append(worst)
        alive = [(alive[k][0] + [t], max(alive[k][1], r), kv[i]) for r, i in passed for k, t in [trials[i]]]
        if not alive:
            break
    for p, worst, _ in alive:  # ran out of positions
        out.sentences.append(p + ([end] if end is not None else []))
        out.residuals.append(worst)
    return out


def multiplicities(task: CausalLanguageModeling, observation: Observation, options: list[list[int]], batch: int) -> list[int] | None:
    """How many times the client's batch holds each option (sentences ending in the end token).

    The end token's row of the output layer's gradient is (1/N) sum over predicted positions i of
    (p_i[end] - [label_i = end]) h_i, with h_i the output layer's input. Each sentence s adds
    c_s = sum_i p_i[end] h_i - h_last(s); the c_s of distinct sentences are independent when fewer
    than the width, so a least-squares fit of the observed row gives weights proportional to the
    counts. This finds sentences that are a prefix of another (the span search cannot: their last
    token is only predicted) and duplicates. Returns None when it does not apply or does not fit.

    Args:
        options: candidate sentences (found ones, and found prefixes with the end token appended).
        batch: the batch size (the counts must sum to it).
    """
    _, end = task.boundary_ids()
    weight, _ = task.classifier_parameter_names()
    grads = observation.gradients
    if end is None or weight not in grads or not options or len(options) >= task.hidden:
        return None
    if any(end in o[:-1] for o in options):
        return None  # the end token is also read as an input: its row mixes in an input part
    head = task.model.get_output_embeddings()
    dev = next(task.model.parameters()).device
    ids, lengths = task.pad([list(o) for o in options])
    n = ids.shape[1]
    box: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, a: box.append(a[0]))
    try:
        with torch.no_grad():
            logits = task.model(input_ids=ids.to(dev), attention_mask=(torch.arange(n)[None] < torch.tensor(lengths)[:, None]).long().to(dev)).logits
    finally:
        handle.remove()
    h, p_end = box[-1].double(), torch.softmax(logits.double(), -1)[..., end]
    cols = []
    for k, o in enumerate(options):
        last = len(o) - 2  # the position that predicts the end token
        cols.append((p_end[k, : last + 1, None] * h[k, : last + 1]).sum(0) - h[k, last])
    C = torch.stack(cols, 1).cpu().numpy()  # [d, options]
    y = grads[weight][end].double().cpu().numpy()
    import numpy as np

    w, *_ = np.linalg.lstsq(C, y, rcond=None)
    fit = np.linalg.norm(C @ w - y) / max(np.linalg.norm(y), 1e-300)
    if not np.isfinite(w).all() or fit > 1e-3 or w.sum() <= 0:
        return None
    counts = np.rint(w * batch / w.sum()).astype(int)
    if counts.min() < 0 or counts.sum() != batch or np.abs(w * batch / w.sum() - counts).max() > 0.1:
        return None
    return counts.tolist()


def _newest_inputs(model: torch.nn.Module, module: str, parents: list[tuple[list[int], float, Any]], tokens: list[int], dev: torch.device) -> tuple[torch.Tensor, list[Any]]:
    """The second-layer input at the newest position of each parent prefix grown by one token.

    The parents' first-layer keys and values are reused (the model's own cache), so each check
    costs one position, not the whole prefix. Returns ([N, d] inputs, the grown prefixes' caches).
    """
    from transformers import DynamicCache

    n = len(tokens)
    new = torch.tensor(tokens, device=dev)[:, None]
    cache = DynamicCache()
    length = 1
    if parents[0][2] is not None:
        cache.update(torch.stack([p[2][0] for p in parents]), torch.stack([p[2][1] for p in parents]), 0)
        length += parents[0][2][0].shape[1]
    # transformers 5 renamed past_key_values to cache; older models still take the old name
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    mask = torch.ones(n, length, dtype=torch.long, device=dev)
    x = ta.capture_input(model, module, input_ids=new, attention_mask=mask, use_cache=True, **{key: cache})
    layer = cache.layers[0]
    return x[:, -1], [(layer.keys[i], layer.values[i]) for i in range(n)]


def second_layer_span(task: CausalLanguageModeling, observation: Observation, noise_std: float = 0.0) -> torch.Tensor:
    """Orthonormal basis [d, r] of the second attention layer's inputs (above the noise)."""
    groups = ta.attention_groups(task)
    return ta.input_span(observation, ta._weights(groups[1]), model=task.model, noise_std=noise_std)


def position_limit(observation: Observation, task: TextTask) -> int | None:
    """Sequence length read off the position-embedding gradient when it is shared."""
    name = task.position_embedding_name()
    if name and name in observation.gradients:
        rows = ta.nonzero_positions(observation.gradients[name])
        return rows[-1] + 1 if rows else None
    return None


__all__ = ["PrefixSearch", "candidate_tokens", "search", "multiplicities", "position_limit"]
