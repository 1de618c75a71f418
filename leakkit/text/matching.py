"""Encoder batches under noise: the sentences whose embedding gradients add up to the update's.

Under noise the span tests that split a clean batch into sentences (`leakkit.text.attack.assemble`)
lose their edge: the first layer's span, cut at the noise, ranks a position's true tokens among
dozens of others, and one-token changes of a long sentence fit the second layer as well as the
sentence (SST-2, batch 4, std 1e-5: 279 of 3,002 changes of a 40-token sentence). The embedding
gradients keep it. With g[b, j] the loss's gradient at the embedding sum of sentence b's position j, the word table's row t is the sum of g over t's occurrences and the
position table's row j the sum over sentences, each plus the noise. So

- a token that occurs once is seen alone in its row, and the position rows are sums of token
  rows: least squares of the position rows on the token rows (`token_positions`) places most
  tokens (SST-2, batch 4, noise std 1e-5: the right set at 31 of 40 positions; the separator's
  column peaks at the sentences' last positions);
- a hypothesis batch's rows can be recomputed exactly (one backward per sentence to its
  embeddings), and the squared distance to the observed rows is the noise's log-likelihood up to
  a constant: the true batch left 4.6e-6 where a search's best wrong one left 4.9e-5, and among
  80 one-token changes of a sentence none came closer with the other sentences known.

`match_batch` starts from the least-squares placement (each position's best tokens, given to
the sentences still open there) and then improves the whole batch by local moves scored by that
distance: exchanges of a token or a tail between two sentences, then substitutions, moves within
a sentence, a token more or less at a sentence's end, and insertions of the tokens the rows still
miss. Labels are part of the state. It needs the word and position embedding gradients and a
classification loss (a masked LM's share needs its masked labels).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch

from leakkit.client.observation import Observation
from leakkit.tasks.text import SequenceClassification, TextLayout, TextTask
from leakkit.text import analytic as ta

MATCH_BUDGET = 40_000  # hypothesis sentences whose gradients `match_batch` recomputes at most
PLACED = 4  # tokens per position proposed from the least-squares placement
PROPOSED = 8  # tokens per slot proposed by how well they fill what the rows still miss
SHIFT = 3  # how far a token moves within its sentence in one step
CHUNK = 64  # hypotheses per batched backward
END_SHARE = 0.5  # a separator peak counts as a sentence's end from this fraction of the longest one's
MIN_GAIN = 1e-4  # a round gaining less than this fraction of the distance ends a phase
FLOOR_SLACK = 1.05  # the noise's energy over the observed rows varies by well under 1 % (tens of thousands of entries)


@dataclass
class Matched:
    """What `match_batch` returns: the sentences (special tokens included), their labels, and the
    distance that remains against the observed rows, relative to their energy."""

    rows: list[list[int]]
    labels: list[int]
    distance: float
    evaluated: int


def usable(task: TextTask, observation: Observation) -> bool:
    """Whether `match_batch` can run on this update: a classification loss summed or averaged over
    one batch, with the word and position embedding gradients shared, and sentences that start
    and end with special tokens."""
    pname = task.position_embedding_name()
    return (
        isinstance(task, SequenceClassification)
        and None not in task.boundary_ids()
        and observation.reduction in ("mean", "sum")
        and task.word_embedding_name() in observation.gradients
        and bool(pname) and pname in observation.gradients
    )


def token_positions(words: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """How much of each token row each position row holds, by least squares.

    Args:
        words: [T, d] word-embedding gradient rows of the candidate tokens (T < d).
        positions: [n, d] position-embedding gradient rows.
    Returns:
        [n, T]: near 1 where a token that occurs once in the batch sits, near 0 elsewhere; a
        repeated token's weight is shared among its positions.
    """
    return positions.double() @ torch.linalg.pinv(words.double())


def match_batch(
    task: TextTask, observation: Observation, *, n_max: int, noise_std: float, notes: list[str], budget: int = MATCH_BUDGET,
) -> Matched:
    """Sentences and labels of a classification batch whose embedding gradients reproduce the
    update's (see the module's docstring).

    Args:
        task: the attacker's copy (float32 is enough: the noise is far above its rounding).
        n_max: the longest sentence's length (the last position row above the noise).
        noise_std: the update's per-entry noise: the search stops once what is left of the rows is
            no more than the noise would leave of the true batch.
        budget: at most this many hypothesis sentences are scored.
    Returns:
        `Matched`, the sentences in no particular order.
    """
    search = _Search(task, observation, n_max)
    search.start(notes)
    search.run(budget, floor=FLOOR_SLACK * noise_std**2 * (search.observed.shape[0] - 1) * search.observed.shape[1])
    notes.append(
        f"noisy batch: sentences matched to the embedding gradients ({search.evaluated} hypotheses scored, "
        f"rows left at {search.relative():.3g} of their energy)"
    )
    return Matched(rows=[list(h) for h in search.hyp], labels=list(search.labels), distance=search.relative(), evaluated=search.evaluated)


class _Search:
    def __init__(self, task: TextTask, observation: Observation, n_max: int) -> None:
        grads = observation.gradients
        words = grads[task.word_embedding_name()].double()
        places = grads[task.position_embedding_name() or ""].double()
        self.task, self.B, self.n = task, observation.batch_size, n_max
        self.scale = 1.0 / self.B if observation.reduction == "mean" else 1.0
        # the rows above the noise (a pool with rows inside it placed noise tokens at every position:
        # SST-2, batch 4, std 1e-5: none of 4 sentences, against 3 of 4 from these rows alone)
        pool = torch.nonzero(ta.used_rows(words.norm(dim=1))).flatten()
        width = words.shape[1]
        # below the width, so that the least squares placement is determined
        self.pool = pool[words[pool].norm(dim=1).argsort(descending=True)[: width - 1]].sort().values.tolist()
        self.index = {t: i for i, t in enumerate(self.pool)}
        self.start_id, self.end_id = (int(x) for x in task.boundary_ids())  # type: ignore[arg-type]
        self.placed = token_positions(words[self.pool], places[:n_max])  # [n, T]
        # observed rows: pool tokens, positions, and a last row for tokens off the pool (observed as 0)
        self.observed = torch.cat([words[self.pool], places[:n_max], torch.zeros(1, width, dtype=words.dtype)]).float()
        self.energy = float((self.observed.double() ** 2).sum())
        self.dev = next(task.model.parameters()).device
        self.table = task.embedding_matrix().detach()
        self.evaluated = 0
        self.bias = grads.get(task.classifier_parameter_names()[1] or "")  # type: ignore[attr-defined]

    # --- scoring ---------------------------------------------------------------------------
    def _shares(self, rows: Sequence[Sequence[int]], labels: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each hypothesis sentence's dense share of the observed rows [T + n + 1, d], and its
        embedding gradients [m, d]."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.empty(0), torch.empty(0))] * len(rows)
        by_length: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_length.setdefault(len(r), []).append(i)
        for m, members in by_length.items():
            for k in range(0, len(members), CHUNK):
                part = members[k : k + CHUNK]
                ids = torch.tensor([list(rows[i]) for i in part], device=self.dev)
                g = self._embedding_grads(ids, torch.tensor([labels[i] for i in part], device=self.dev)).cpu()
                slots = torch.tensor([[self.index.get(t, len(self.pool) + self.n) for t in rows[i]] for i in part])
                share = torch.zeros(len(part), self.observed.shape[0], g.shape[-1])
                share.scatter_add_(1, slots[..., None].expand_as(g), g)
                share[:, len(self.pool) : len(self.pool) + m] += g
                for i, s, gi in zip(part, share, g):
                    out[i] = (s, gi)
        self.evaluated += len(rows)
        return out

    def _embedding_grads(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[K, m, d]: the loss's gradient at each position's embedding sum, as the update weighs one sentence."""
        one = self.task.with_layout(TextLayout(lengths=[ids.shape[1]] * ids.shape[0]))
        x = self.table[ids].clone().requires_grad_(True)
        loss = one.loss(x, labels, reduction="sum")
        return self.scale * torch.autograd.grad(loss, x)[0].detach()

    def relative(self) -> float:
        return self.distance() / max(self.energy, 1e-300)

    # --- start -----------------------------------------------------------------------------
    def start(self, notes: list[str]) -> None:
        """Lengths from the separator's column, labels from the output bias, tokens from the placement."""
        end = self.placed[:, self.index[self.end_id]].clone() if self.end_id in self.index else torch.zeros(self.n)
        # the longest sentence ends at the last position row above the noise; the others where the
        # separator's column peaks, at least half as high as at that end (each end's weight is its
        # share of the separator's row). Two sentences of one length share a peak: fewer peaks
        # than sentences give the highest one again
        last = float(end[self.n - 1])
        end[: min(2, self.n)] = -float("inf")
        end[self.n - 1] = -float("inf")
        peaks = [int(j) for j in end.argsort(descending=True)[: self.B - 1] if float(end[j]) >= END_SHARE * last] or [self.n - 1]
        peaks += [peaks[0]] * (self.B - 1 - len(peaks))
        self.lengths = sorted([self.n] + [j + 1 for j in peaks], reverse=True)
        notes.append(f"noisy batch: sentence lengths {self.lengths} read off the separator's placement")
        # the classes the batch holds pull the output bias gradient below 0 (by about 1/B each)
        classes = int(getattr(self.task, "num_classes", 2))
        order = self.bias.double().argsort().tolist() if self.bias is not None else list(range(classes))
        self.classes = [c for c in order if self.bias is None or float(self.bias[c]) < 0][: self.B] or order[:1]
        self.labels = [self.classes[0]] * self.B
        hyp: list[list[int]] = [[self.start_id] + [-1] * (L - 2) + [self.end_id] for L in self.lengths]
        special = {self.start_id, self.end_id}
        for j in range(1, self.n):
            # each position's best placed tokens, longest sentence first: which sentence a token
            # belongs to is left to the exchanges (dealing them out by how alike their rows are
            # did worse: none of 4 where this found 3)
            open_ = [b for b in range(self.B) if j < self.lengths[b] - 1]
            ranked = (self.pool[i] for i in self.placed[j].argsort(descending=True).tolist())
            for b, t in zip(open_, (t for t in ranked if t not in special)):
                hyp[b][j] = t
        self.hyp = hyp
        self.shares, self.grads = (list(x) for x in zip(*self._shares(hyp, self.labels)))
        self.left = self.observed - sum(self.shares)

    # --- moves -----------------------------------------------------------------------------
    def run(self, budget: int, *, floor: float = 0.0) -> None:
        phase = 1
        while self.evaluated < budget and self.distance() > floor:
            before = self.distance()
            moved = self._round(phase, budget)
            if not moved or before - self.distance() < MIN_GAIN * before:
                if phase == 3:
                    return
                phase += 1

    def distance(self) -> float:
        return float((self.left.double() ** 2).sum())

    def _round(self, phase: int, budget: int) -> int:
        """One pass over the positions; at each, the move that lowers the distance most is taken."""
        moved = 0
        for b in range(self.B):
            moved += self._try([((b, self.hyp[b], c),) for c in self.classes if c != self.labels[b]])
        for j in range(1, self.n):
            if self.evaluated >= budget:
                break
            moved += self._try(self._moves(j, phase))
        return moved

    def _moves(self, j: int, phase: int) -> list[tuple[tuple[int, list[int], int], ...]]:
        """The moves at position j: exchanges between sentences (phase 1), then substitutions, trades
        of places with a proposed token, shifts and length changes (phase 2), then insertions of
        the tokens whose rows are furthest off (phase 3)."""
        hyp, labels, special = self.hyp, self.labels, {self.start_id, self.end_id}
        here = [b for b in range(self.B) if j < len(hyp[b])]
        moves: list[tuple[tuple[int, list[int], int], ...]] = []
        for b, c in itertools.combinations(here, 2):
            last = j in (len(hyp[b]) - 1, len(hyp[c]) - 1)
            if hyp[b][j] != hyp[c][j] and not last:
                hb, hc = list(hyp[b]), list(hyp[c])
                hb[j], hc[j] = hc[j], hb[j]
                moves.append(((b, hb, labels[b]), (c, hc, labels[c])))
            tails = (hyp[b][:j] + hyp[c][j:], hyp[c][:j] + hyp[b][j:])
            if tails[0] != hyp[b]:
                moves.append(((b, tails[0], labels[b]), (c, tails[1], labels[c])))
        if phase < 2:
            return moves
        inner = [b for b in here if j < len(hyp[b]) - 1]
        placed = [self.pool[i] for i in self.placed[j].argsort(descending=True).tolist()[:PLACED]]
        for b in here:
            h = hyp[b]
            if j == len(h) - 1:  # a sentence one token shorter, or longer by a token placed here
                if j > 2:
                    moves.append(((b, h[: j - 1] + h[j:], labels[b]),))
                moves.extend(((b, h[:j] + [t] + h[j:], labels[b]),) for t in placed if t not in special)
        missing = [self.pool[i] for i in self.left[: len(self.pool)].norm(dim=1).argsort(descending=True).tolist()[:PLACED]] if phase > 2 else []
        for b in inner:
            h = hyp[b]
            g = self.grads[b][j]
            # the tokens whose rows still lack this slot's gradient
            fill = [self.pool[i] for i in (self.left[: len(self.pool)] @ g).argsort(descending=True).tolist()[:PROPOSED]]
            for t in dict.fromkeys(placed + fill):
                if t != h[j] and t not in special:
                    moves.append(((b, h[:j] + [t] + h[j + 1 :], labels[b]),))
                    # or the token trades places with where t stands now (the batch keeps its tokens)
                    for c in range(self.B):
                        for k in (k for k, u in enumerate(hyp[c]) if u == t and (c, k) != (b, j)):
                            if c == b:
                                r = list(h)
                                r[j], r[k] = t, h[j]
                                moves.append(((b, r, labels[b]),))
                            else:
                                hc = list(hyp[c])
                                hc[k] = h[j]
                                moves.append(((b, h[:j] + [t] + h[j + 1 :], labels[b]), (c, hc, labels[c])))
            for k in range(max(1, j - SHIFT), min(len(h) - 1, j + SHIFT + 1)):
                if k != j:
                    r = list(h)
                    r.insert(k, r.pop(j))
                    if r != h:
                        moves.append(((b, r, labels[b]),))
                    for t in missing:
                        if t not in special:
                            r = list(h)
                            r.pop(k)
                            r.insert(j, t)
                            moves.append(((b, r, labels[b]),))
        return moves

    def _try(self, moves: list[tuple[tuple[int, list[int], int], ...]]) -> int:
        """Score every move (each a tuple of (sentence, new tokens, new label)) and take the best
        one if it lowers the distance; returns how many were taken (0 or 1)."""
        if not moves:
            return 0
        flat = [(r, c) for m in moves for _, r, c in m]
        new = self._shares([r for r, _ in flat], [c for _, c in flat])
        cur = self.distance()
        best, choice, k = cur * (1 - 1e-9), None, 0
        for m in moves:
            left = self.left.clone()
            for b, _, _ in m:
                left += self.shares[b] - new[k][0]
                k += 1
            v = float((left.double() ** 2).sum())
            if v < best:
                best, choice = v, (m, left, k - len(m))
        if choice is None:
            return 0
        m, left, at = choice
        for i, (b, r, c) in enumerate(m):
            self.hyp[b], self.labels[b], (self.shares[b], self.grads[b]) = list(r), c, new[at + i]
        self.left = left
        return 1
