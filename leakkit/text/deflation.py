"""A found sentence's own share of a layer's gradient, for each label it may carry.

A batch's weight gradient is the sum of its sentences' gradients. Once the search has a sentence
that fits, its share can be recomputed and subtracted, so that the layer's span holds only the
sentences still missing (`leakkit.text.attack._SentenceSearch.deflate`). The share depends on
the sentence's label, which the attacker does not know: each task lists the shares its labels can
give, the likeliest first, and the caller keeps the one that lowers the gradient's rank by exactly
the sentence's length (a wrong label leaves the rank where it was).
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Iterator, Sequence

import torch

from leakkit.client.observation import Observation
from leakkit.engine.spans import span_residual
from leakkit.tasks.text import MaskedLanguageModeling, SequenceClassification, TextLayout, TextTask
from leakkit.text import analytic as ta

LABEL_CHOICES = 8  # labels per masked position tried, the likeliest by the decoder's gradient rows
LABEL_TRIES = 256  # masked-label assignments tried per sentence before giving it up

Share = tuple[list[torch.Tensor], Any]  # the sentence's gradient at each weight, and the label that gives it
ShareFn = Callable[[TextTask, Observation, Sequence[int], list[str], int], Iterator[Share]]


def deflatable(task: TextTask, observation: Observation) -> bool:
    """Whether `shares` can list this task's shares for this update: a mean or summed loss (a
    FedAvg update is several steps, not one sum), and for the masked LM the gradients its labels
    are read from (the decoder's and the layer feeding it)."""
    if observation.reduction not in ("mean", "sum"):
        return False
    if isinstance(task, SequenceClassification):
        return True
    if isinstance(task, MaskedLanguageModeling):
        head, (weight, _) = task.transform_name(), task.classifier_parameter_names()
        return head is not None and f"{head}.weight" in observation.gradients and weight in observation.gradients
    return False


def shares(task: TextTask, observation: Observation, row: Sequence[int], names: list[str], batch: int) -> Iterator[Share]:
    """The shares sentence `row` would have in the gradients `names` under each label it may carry,
    the likeliest label first, scaled as the update's loss weighs one sentence.

    Args:
        task: the attacker's copy (float64 for a rank test at float32's floor).
        row: the sentence's token ids, [CLS] and [SEP] included.
        names: 2-D weights whose gradients are deflated.
        batch: the update's batch size.
    Yields:
        (one gradient per name, the label): a class id, or a tuple of (position, token) pairs
        for the masked LM.
    """
    for kind, fn in _SHARES:
        if isinstance(task, kind):
            yield from fn(task, observation, row, names, batch)
            return


def _params(task: TextTask, names: list[str]) -> list[torch.nn.Parameter]:
    params = dict(task.parameters())
    return [params[n] for n in names]


def _classification(task: TextTask, observation: Observation, row: Sequence[int], names: list[str], batch: int) -> Iterator[Share]:
    # classes the batch holds first: each pulls the output bias gradient down by 1/B
    bias = observation.gradients.get(task.classifier_parameter_names()[1] or "")
    order = bias.double().argsort().tolist() if bias is not None else list(range(task.num_classes))
    scale = 1.0 / batch if observation.reduction == "mean" else 1.0
    one = task.with_layout(TextLayout(lengths=[len(row)]))
    dev = next(task.model.parameters()).device
    ids, params = torch.tensor([list(row)], device=dev), _params(task, names)
    for c in order:
        loss = one.loss(ids, torch.tensor([c], device=dev), reduction="sum")
        yield [scale * g for g in torch.autograd.grad(loss, params)], c


def _masked_lm(task: TextTask, observation: Observation, row: Sequence[int], names: list[str], batch: int) -> Iterator[Share]:
    """The masked LM's share is linear in its labels: with p the model's probabilities and J_m the
    Jacobian of position m's logits, it is sum_m J_m^T (p_m - e_{y_m}), over the masked positions.
    Those are the positions whose state lies in the span of the decoder-feeding layer's gradient
    (its rank is the batch's masked count M, the mean's divisor). Each position's labels are
    ranked by the decoder's gradient rows (row v is sum_i (p_iv - y_iv) t_i / M over masked states
    t_i, solved here over this sentence's states alone), among the tokens the decoder bias
    gradient marks as labels, the position's top predictions and its own input token (BERT
    leaves one chosen token in ten unchanged); assignments are then yielded best-first."""
    assert isinstance(task, MaskedLanguageModeling)
    grads = observation.gradients
    head = task.transform_name()
    weight, bias_name = task.classifier_parameter_names()
    basis = ta.input_span(observation, [f"{head}.weight"])
    count = basis.shape[1]
    scale = 1.0 / count if observation.reduction == "mean" else 1.0
    one = task.with_layout(TextLayout(lengths=[len(row)]))
    dev = next(task.model.parameters()).device
    ids, params = torch.tensor([list(row)], device=dev), _params(task, names)
    decoder = task.model.get_output_embeddings()
    box: dict[str, torch.Tensor] = {}
    hooks = [
        task.model.get_submodule(head).register_forward_pre_hook(lambda _m, a: box.__setitem__("h", a[0].detach())),
        decoder.register_forward_pre_hook(lambda _m, a: box.__setitem__("t", a[0].detach())),
    ]
    try:
        logits = one.encoder_outputs(ids).logits[0]  # [n, V]
    finally:
        for h in hooks:
            h.remove()
    fits = span_residual(box["h"][0], basis.to(box["h"])) < ta.SPAN_TOL
    masked = [j for j in range(len(row)) if bool(fits[j])]
    if not masked:
        return
    probs = torch.softmax(logits.detach(), -1)
    V = logits.shape[-1]
    bias = grads.get(bias_name or "")
    pool = set((bias[:V] < 0).nonzero().flatten().tolist()) if bias is not None else set(range(V))
    # each position's likeliest labels: the decoder rows' estimate of its one-hot label
    states = box["t"][0, masked].double()
    estimate = probs[masked].double().T - (1.0 / scale) * (grads[weight][:V].double().to(dev) @ torch.linalg.pinv(states))  # [V, m]
    choices: list[list[int]] = []
    special = task.special_ids()  # [MASK] and the like are never labels, and their rows hold input parts
    for i, j in enumerate(masked):
        options = sorted((pool | set(logits[j].detach().topk(5).indices.tolist()) | {row[j]}) - special)
        ranked = sorted(options, key=lambda v: -float(estimate[v, i]))
        choices.append(ranked[:LABEL_CHOICES])
    flat = [(i, v) for i, c in enumerate(choices) for v in c]
    # one gather: a select per label would give each batched backward a [n, V] zero tensor per label
    picked = logits[[masked[i] for i, _ in flat], [v for _, v in flat]]
    # J_m^T p_m for every masked position, and J_m^T e_v for each label tried there
    soft = torch.autograd.grad((probs[masked] * logits[masked]).sum(), params, retain_graph=True)
    hard = torch.autograd.grad(picked, params, grad_outputs=torch.eye(len(flat), dtype=picked.dtype, device=dev), is_grads_batched=True)
    where = {key: k for k, key in enumerate(flat)}
    for pick in _best_first([len(c) for c in choices], LABEL_TRIES):
        keys = [where[(i, choices[i][r])] for i, r in enumerate(pick)]
        share = [scale * (s - h[keys].sum(0)) for s, h in zip(soft, hard)]
        yield share, tuple((masked[i], choices[i][r]) for i, r in enumerate(pick))


def _best_first(sizes: list[int], limit: int) -> Iterator[tuple[int, ...]]:
    """Up to `limit` index tuples (one index below sizes[i] per position), by the sum of their indices."""
    start = (0,) * len(sizes)
    heap, seen = [(0, start)], {start}
    for _ in range(limit):
        if not heap:
            return
        total, pick = heapq.heappop(heap)
        yield pick
        for i in range(len(sizes)):
            if pick[i] + 1 < sizes[i]:
                nxt = pick[:i] + (pick[i] + 1,) + pick[i + 1 :]
                if nxt not in seen:
                    seen.add(nxt)
                    heapq.heappush(heap, (total + 1, nxt))


_SHARES: list[tuple[type, ShareFn]] = [(SequenceClassification, _classification), (MaskedLanguageModeling, _masked_lm)]
