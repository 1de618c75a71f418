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
miss. Labels are part of the state. It needs the word and position embedding gradients, and a
classification or masked-LM loss.

The masked LM (`_MaskedSearch`) differs in three ways. Its labels are read off the decoder bias
gradient (`label_multiset`) and given to positions by the moves. BERT's decoder shares the word
table, so every row also holds the decoder's part, which the placement projects away. And a
labelled position's input gradient is some 40 times another's (SST-2, batch 4): at each position
that holds one the least squares places nothing reliably (the placement leaves those positions to
[MASK] and the search), the moves weigh each row by its error relative to its size, and they
also drop or insert a token anywhere and move a sentence's end by several positions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from leakkit.client.observation import Observation
from leakkit.tasks.layers import input_of
from leakkit.tasks.text import MaskedLanguageModeling, SequenceClassification, TextLayout, TextTask
from leakkit.text import analytic as ta

MATCH_BUDGET = 40_000  # hypothesis sentences whose gradients `match_batch` recomputes at most
PLACED = 4  # tokens per position proposed from the least-squares placement
PROPOSED = 8  # tokens per slot proposed by how well they fill what the rows still miss
SHIFT = 3  # how far a token moves within its sentence in one step
CHUNK = 64  # hypotheses per batched backward
END_SHARE = 0.5  # a separator peak counts as a sentence's end from this fraction of the longest one's
MIN_GAIN = 1e-4  # a round gaining less than this fraction of the distance ends a phase
BLUR = 5.0  # a position row this many times the median one holds a labelled position (masked LM)
RELATIVE_FLOOR = 0.01  # masked LM: rows weigh 1 / (their energy + this x the mean row's)
FLOOR_SLACK = 1.05  # the noise's energy over the observed rows varies by well under 1 % (tens of thousands of entries)


@dataclass
class Matched:
    """What `match_batch` returns: the input sentences (special tokens included), their labels, and the
    distance that remains against the observed rows, relative to their energy."""

    rows: list[list[int]]
    labels: torch.Tensor  # [B] classes, or [B, n] masked-LM labels with -100 where a position carries none
    distance: float
    evaluated: int


def usable(task: TextTask, observation: Observation) -> bool:
    """Whether `match_batch` can run on this update: a classification or masked-LM loss summed or
    averaged over one batch, with the word and position embedding gradients shared (and the
    decoder bias's, for the masked LM), and sentences that start and end with special tokens."""
    pname = task.position_embedding_name()
    masked = isinstance(task, MaskedLanguageModeling) and task.tokenizer.mask_token_id is not None and (task.classifier_parameter_names()[1] or "") in observation.gradients
    return (
        (isinstance(task, SequenceClassification) or masked)
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
    search = next(kind for head, kind in _SEARCHES if isinstance(task, head))(task, observation, n_max)
    search.start(notes)
    search.run(budget, floor=FLOOR_SLACK * noise_std**2 * (search.observed.shape[0] - 1) * search.observed.shape[1])
    notes.append(
        f"noisy batch: sentences matched to the embedding gradients ({search.evaluated} hypotheses scored, "
        f"rows left at {search.relative():.3g} of their energy)"
    )
    return Matched(rows=[search._inputs(h) for h in search.hyp], labels=search.result_labels(), distance=search.relative(), evaluated=search.evaluated)


class _Search:
    """Classification: one label per sentence, the word rows hold the input side alone."""

    chunk = CHUNK
    # tokens dropped or inserted anywhere and ends moved by several positions: on a noisy
    # classification batch (SST-2 1409-1412, std 1e-5) they spent the whole budget and broke two
    # near misses up further; the masked LM's blurred positions need them
    edits = False

    def __init__(self, task: TextTask, observation: Observation, n_max: int) -> None:
        grads = observation.gradients
        words = grads[task.word_embedding_name()].double()
        places = grads[task.position_embedding_name() or ""].double()
        self.task, self.B, self.n = task, observation.batch_size, n_max
        self.scale = self._scale(observation)
        self.start_id, self.end_id = (int(x) for x in task.boundary_ids())  # type: ignore[arg-type]
        width = words.shape[1]
        keep = self._extra_rows()
        # what the placement sees: the word rows less any part that is not the inputs' own
        seen_words, seen_places = self._input_side(words), self._input_side(places)
        # the rows above the noise (a pool with rows inside it placed noise tokens at every position:
        # SST-2, batch 4, std 1e-5: none of 4 sentences, against 3 of 4 from these rows alone)
        norms = seen_words.norm(dim=1)
        pool = torch.nonzero(ta.used_rows(norms)).flatten()
        # below the width, so that the least squares placement is determined
        pool = self._cut(norms, pool[norms[pool].argsort(descending=True)[: width - 1 - len(keep)]], n_max)
        self.pool = sorted(set(pool.tolist()) | set(keep))
        self.index = {t: i for i, t in enumerate(self.pool)}
        self.placed = token_positions(seen_words[self.pool], seen_places[:n_max])  # [n, T]
        # observed rows: pool tokens, positions, and a last row for tokens off the pool (observed as 0)
        self.table = task.embedding_matrix().detach()
        self.observed = torch.cat([words[self.pool], places[:n_max], torch.zeros(1, width, dtype=words.dtype)]).to(self.table.dtype)
        self.energy = float((self.observed.double() ** 2).sum())
        self.weights = self._weights()
        self.dev = next(task.model.parameters()).device
        self.evaluated = 0
        self.bias = grads.get(task.classifier_parameter_names()[1] or "")  # type: ignore[attr-defined]

    # --- what differs between heads ----------------------------------------------------------
    def _scale(self, observation: Observation) -> float:
        return 1.0 / self.B if observation.reduction == "mean" else 1.0

    def _extra_rows(self) -> list[int]:
        """Token rows observed whatever their norm."""
        return []

    def _input_side(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def _cut(self, norms: torch.Tensor, pool: torch.Tensor, n_max: int) -> torch.Tensor:
        """The pool's rows to keep (`pool` is ordered by norm, largest first)."""
        return pool

    def _blurred(self) -> list[int]:
        """Positions whose placement is not to be trusted."""
        return []

    def _weights(self) -> torch.Tensor:
        """[rows]: each observed row's weight in the moves' choice (1: the noise's likelihood)."""
        return torch.ones(self.observed.shape[0], dtype=torch.float64)

    def _mask_token(self) -> int:
        return -1

    def _inputs(self, row: Sequence[int]) -> list[int]:
        """A hypothesis sentence's input tokens."""
        return list(row)

    def _variants(self, token: int) -> list[int]:
        """The entries a proposed token can become in a hypothesis sentence."""
        return [token]

    def _label_moves(self) -> list[list[tuple[tuple[int, list[int], int], ...]]]:
        """Groups of label moves; the best of each group is taken."""
        return [[((b, self.hyp[b], c),) for c in self.classes if c != self.labels[b]] for b in range(self.B)]

    def _start_labels(self, hyp: list[list[int]]) -> list[list[int]]:
        """Labels from the output bias: the classes the batch holds pull it below 0 (by about 1/B each)."""
        classes = int(getattr(self.task, "num_classes", 2))
        order = self.bias.double().argsort().tolist() if self.bias is not None else list(range(classes))
        self.classes = [c for c in order if self.bias is None or float(self.bias[c]) < 0][: self.B] or order[:1]
        self.labels = [self.classes[0]] * self.B
        return hyp

    def _embedding_grads(self, rows: Sequence[Sequence[int]], labels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[K, m, d]: the loss's gradient at each position's embedding sum, as the update weighs one
        sentence; and any part of the pool's rows that is not an input's (None here)."""
        ids = torch.tensor([list(r) for r in rows], device=self.dev)
        one = self.task.with_layout(TextLayout(lengths=[ids.shape[1]] * ids.shape[0]))
        x = self.table[ids].clone().requires_grad_(True)
        loss = one.loss(x, torch.tensor(list(labels), device=self.dev), reduction="sum")
        return self.scale * torch.autograd.grad(loss, x)[0].detach(), None

    def result_labels(self) -> torch.Tensor:
        return torch.tensor(self.labels)

    # --- scoring ---------------------------------------------------------------------------
    def _shares(self, rows: Sequence[Sequence[int]], labels: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each hypothesis sentence's dense share of the observed rows [T + n + 1, d], and its
        embedding gradients [m, d]."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.empty(0), torch.empty(0))] * len(rows)
        by_length: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_length.setdefault(len(r), []).append(i)
        for m, members in by_length.items():
            for k in range(0, len(members), self.chunk):
                part = members[k : k + self.chunk]
                g, dense = self._embedding_grads([rows[i] for i in part], [labels[i] for i in part])
                g = g.cpu()
                slots = torch.tensor([[self.index.get(t, len(self.pool) + self.n) for t in self._inputs(rows[i])] for i in part])
                share = torch.zeros(len(part), self.observed.shape[0], g.shape[-1], dtype=g.dtype)
                share.scatter_add_(1, slots[..., None].expand_as(g), g)
                share[:, len(self.pool) : len(self.pool) + m] += g
                if dense is not None:
                    share[:, : len(self.pool)] += dense.cpu()
                for i, s, gi in zip(part, share, g):
                    out[i] = (s, gi)
        self.evaluated += len(rows)
        return out

    def relative(self) -> float:
        return self.distance() / max(self.energy, 1e-300)

    # --- start -----------------------------------------------------------------------------
    def start(self, notes: list[str]) -> None:
        """Lengths from the separator's column, tokens from the placement, labels (`_start_labels`)."""
        end = self.placed[:, self.index[self.end_id]].clone() if self.end_id in self.index else torch.zeros(self.n)
        # the longest sentence ends at the last position row above the noise; the others where the
        # separator's column peaks, at least half as high as at that end (each end's weight is its
        # share of the separator's row). Two sentences of one length share a peak: fewer peaks
        # than sentences give the highest one again
        last = float(end[self.n - 1])
        blurred = self._blurred()
        end[: min(2, self.n)] = -float("inf")
        end[self.n - 1] = -float("inf")
        end[blurred] = -float("inf")
        peaks = [int(j) for j in end.argsort(descending=True)[: self.B - 1] if float(end[j]) >= END_SHARE * last] or [self.n - 1]
        peaks += [peaks[0]] * (self.B - 1 - len(peaks))
        self.lengths = sorted([self.n] + [j + 1 for j in peaks], reverse=True)
        notes.append(f"noisy batch: sentence lengths {self.lengths} read off the separator's placement")
        hyp: list[list[int]] = [[self.start_id] + [-1] * (L - 2) + [self.end_id] for L in self.lengths]
        special = {self.start_id, self.end_id}
        clear = [j for j in range(self.n) if j not in blurred]
        # tokens no clear position holds: the blurred positions' (or repeated ones)
        strays = [self.pool[i] for i in self.placed[clear].max(0).values.argsort().tolist() if float(self.placed[clear, i].max()) < 0.5] if blurred else []
        for j in range(1, self.n):
            # each position's best placed tokens, longest sentence first: which sentence a token
            # belongs to is left to the exchanges (dealing them out by how alike their rows are
            # did worse: none of 4 where this found 3)
            open_ = [b for b in range(self.B) if j < self.lengths[b] - 1]
            if j in blurred:
                ranked = iter([self._mask_token()] + [strays.pop(0) for _ in open_[1:] if strays])
            else:
                ranked = self._ranked(j)
            for b, t in zip(open_, (t for t in ranked if t not in special)):
                hyp[b][j] = t
        self.hyp = self._start_labels(hyp)
        self.shares, self.grads = (list(x) for x in zip(*self._shares(hyp, self.labels)))
        self.left = self.observed - sum(self.shares)

    # --- moves -----------------------------------------------------------------------------
    def run(self, budget: int, *, floor: float = 0.0) -> None:
        phase = 1
        while self.evaluated < budget and self.distance() > floor:
            before = self._score(self.left)
            moved = self._round(phase, budget)
            if not moved or before - self._score(self.left) < MIN_GAIN * before:
                if phase == 3:
                    return
                phase += 1

    def _ranked(self, j: int) -> Iterator[int]:
        """Position j's placed tokens, best first, other than the boundaries."""
        return (t for t in (self.pool[i] for i in self.placed[j].argsort(descending=True).tolist()) if t not in (self.start_id, self.end_id))

    def _best(self, j: int) -> int:
        return next(self._ranked(j))

    def distance(self) -> float:
        return float((self.left.double() ** 2).sum())

    def _score(self, left: torch.Tensor) -> float:
        """What the moves lower: the distance, each row weighed by `weights`."""
        return float(((left.double() ** 2).sum(1) * self.weights).sum())

    def _round(self, phase: int, budget: int) -> int:
        """One pass over the positions; at each, the move that lowers the distance most is taken."""
        moved = 0
        for group in self._label_moves():
            moved += self._try(group)
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
        for b in (b for b in range(self.B) if self.edits and len(hyp[b]) <= j):
            # a sentence that ends before j ends at j instead, the positions between filled with
            # their best placed tokens (the separator's placement misreads ends at blurred positions)
            fill = [self._variants(self._best(k))[0] for k in range(len(hyp[b]) - 1, j)]
            moves.append(((b, hyp[b][:-1] + fill + hyp[b][-1:], labels[b]),))
        for b in here:
            h = hyp[b]
            if j == len(h) - 1:  # a sentence one token shorter, or longer by a token placed here
                if j > 2:
                    moves.append(((b, h[: j - 1] + h[j:], labels[b]),))
                moves.extend(((b, h[:j] + [v] + h[j:], labels[b]),) for t in placed if t not in special for v in self._variants(t))
        missing = [self.pool[i] for i in self.left[: len(self.pool)].norm(dim=1).argsort(descending=True).tolist()[:PLACED]] if phase > 2 else []
        for b in inner:
            h = hyp[b]
            # a token fewer here, or one the rows still miss put in here: the rest moves along
            if self.edits and len(h) > 3:
                moves.append(((b, h[:j] + h[j + 1 :], labels[b]),))
                if j > 1:  # or the sentence ends here
                    moves.append(((b, h[:j] + h[-1:], labels[b]),))
            if self.edits:
                moves.extend(((b, h[:j] + [v] + h[j:], labels[b]),) for t in missing if t not in special for v in self._variants(t))
            g = self.grads[b][j]
            # the tokens whose rows still lack this slot's gradient
            fill = [self.pool[i] for i in (self.left[: len(self.pool)] @ g).argsort(descending=True).tolist()[:PROPOSED]]
            for t in (v for u in dict.fromkeys(placed + fill) if u not in special for v in self._variants(u)):
                if t != h[j]:
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
                    for t in (v for u in missing if u not in special for v in self._variants(u)):
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
        cur = self._score(self.left)
        best, choice, k = cur * (1 - 1e-9), None, 0
        for m in moves:
            left = self.left.clone()
            for b, _, _ in m:
                left += self.shares[b] - new[k][0]
                k += 1
            v = self._score(left)
            if v < best:
                best, choice = v, (m, left, k - len(m))
        if choice is None:
            return 0
        m, left, at = choice
        for i, (b, r, c) in enumerate(m):
            self.hyp[b], self.labels[b], (self.shares[b], self.grads[b]) = list(r), c, new[at + i]
        self.left = left
        return 1


class _MaskedSearch(_Search):
    """The masked LM: a sentence's entries are codes, token + V * (label + 1) at a position that
    carries a label and the token alone elsewhere, so that every move carries labels with their
    tokens. BERT's decoder shares the word table, so each label's row also holds
    -(1 - p) t / M, the decoder's input t at its masked position (M masked positions in the
    batch); and every row holds p t / M. Those parts lie in the span of the decoder's inputs,
    which the label rows span: the placement looks at the rest of each row."""

    chunk = CHUNK // 2  # each hypothesis also holds its labelled positions' logits
    edits = True

    def __init__(self, task: TextTask, observation: Observation, n_max: int) -> None:
        assert isinstance(task, MaskedLanguageModeling)
        self.V = int(task.vocab_size)
        self.mask_id = int(task.tokenizer.mask_token_id)
        self.tied = task.tied_decoder()
        grads = observation.gradients
        bias = grads[task.classifier_parameter_names()[1] or ""].double()[: self.V]
        self.count, self.M = label_multiset(bias, reduction=observation.reduction)
        words = grads[task.word_embedding_name()].double()
        labels = sorted(self.count)
        # the label rows' directions (the decoder's inputs at the masked positions)
        self.basis = torch.linalg.svd(words[labels].T, full_matrices=False)[0] if (self.tied and labels) else None
        self.decoder = task.model.get_output_embeddings()
        self.decoder_name = next(name for name, m in task.model.named_modules() if m is self.decoder)
        super().__init__(task, observation, n_max)
        self.pool_index = torch.tensor(self.pool)

    def _scale(self, observation: Observation) -> float:
        return 1.0 / self.M if observation.reduction == "mean" else 1.0

    def _extra_rows(self) -> list[int]:
        return sorted(self.count)

    def _input_side(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.basis is None else rows - (rows @ self.basis) @ self.basis.T

    def _inputs(self, row: Sequence[int]) -> list[int]:
        return [c % self.V for c in row]

    def _blurred(self) -> list[int]:
        # a labelled position's input gradient is some 40 times another's (SST-2, batch 4): its
        # share of a position row drowns the other sentences' tokens there in the least squares
        norms = self.observed[len(self.pool) : len(self.pool) + self.n].double().norm(dim=1)
        return [j for j in range(1, self.n) if float(norms[j]) > BLUR * float(norms[1:].median())]

    def _mask_token(self) -> int:
        return self.mask_id

    def _weights(self) -> torch.Tensor:
        # the labelled positions' rows hold most of the energy and change with every token of their
        # sentence, so that one right token moved the plain distance less than the rest of its
        # sentence's errors: each row counts by its error relative to its size
        energy = (self.observed.double() ** 2).sum(1)
        return 1.0 / (energy + RELATIVE_FLOOR * float(energy.mean()))

    def _cut(self, norms: torch.Tensor, pool: torch.Tensor, n_max: int) -> torch.Tensor:
        # every row holds p t / M, so the outliers of the rows run on into the tokens the head
        # predicts; the inputs' rows end at the largest drop in norm (SST-2, batch 4, std 1e-5:
        # the smallest input row 0.054, the largest predicted one 0.0027)
        kept = norms[pool]
        if len(kept) <= n_max // 2 + 1:
            return pool
        drops = kept[:-1] / kept[1:].clamp_min(1e-300)
        drops[: n_max // 2] = 0
        return pool[: int(drops.argmax()) + 1]

    def _variants(self, token: int) -> list[int]:
        # [MASK] never stands without a label
        return [token] if token != self.mask_id else [self.mask_id + self.V * (y + 1) for y in self.count]

    def _label_of(self, code: int) -> int:
        return code // self.V - 1

    def _start_labels(self, hyp: list[list[int]]) -> list[list[int]]:
        """Each placed [MASK] takes a label of the bias's multiset: the one whose row is most like -t,
        t the decoder's input at that position (one forward of the starting batch)."""
        self.classes, self.labels = [], [0] * self.B
        wanted = [y for y, k in self.count.items() for _ in range(k)]
        where = [(b, j) for b, h in enumerate(hyp) for j, t in enumerate(h) if t == self.mask_id]
        if not where:
            return hyp
        states = []
        for b in sorted({b for b, _ in where}):
            states.append(self._states(hyp[b], [j for c, j in where if c == b]))
        t = torch.cat(states)  # [S, d]
        rows = self.observed[[self.index[y] for y in wanted]].double()  # [L, d]
        from scipy.optimize import linear_sum_assignment

        # a label's row is about -t / M: the assignment minimises the cosine
        score = torch.nn.functional.normalize(t.double(), dim=1) @ torch.nn.functional.normalize(rows, dim=1).T
        got, pick = linear_sum_assignment(score.numpy())
        for s_, k in zip(got.tolist(), pick.tolist()):
            b, j = where[s_]
            hyp[b][j] = self.mask_id + self.V * (wanted[k] + 1)
        for b, j in where:  # more [MASK]s than labels: the likeliest label again
            if hyp[b][j] == self.mask_id:
                hyp[b][j] = self.mask_id + self.V * (wanted[int(score[where.index((b, j))].argmin())] + 1)
        return hyp

    def _states(self, row: Sequence[int], at: list[int]) -> torch.Tensor:
        """The decoder's inputs at positions `at` of one sentence [len(at), d]."""
        ids = torch.tensor([self._inputs(row)], device=self.dev)
        one = self.task.with_layout(TextLayout(lengths=[len(row)]))
        with torch.no_grad():
            t = input_of(self.task.model, self.decoder_name, lambda: one.encoder_outputs(self.table[ids]))
        return t[0, at].cpu()

    def _label_moves(self) -> list[list[tuple[tuple[int, list[int], int], ...]]]:
        """Labels traded between two labelled positions; and, while the batch holds fewer of a label
        than the bias says, that label given to a labelled position or to an unlabelled one (BERT
        leaves some chosen tokens as they are, or replaces them by random ones)."""
        hyp, V = self.hyp, self.V
        at = [(b, j) for b, h in enumerate(hyp) for j, c in enumerate(h) if c >= V]
        held: dict[int, int] = {}
        for b, j in at:
            held[self._label_of(hyp[b][j])] = held.get(self._label_of(hyp[b][j]), 0) + 1
        short = [y for y, k in self.count.items() if held.get(y, 0) < k]
        trades: list[tuple[tuple[int, list[int], int], ...]] = []
        for (b, j), (c, k) in itertools.combinations(at, 2):
            x, y = hyp[b][j], hyp[c][k]
            if x // V == y // V:
                continue
            hb = list(hyp[b])
            hb[j] = x % V + V * (y // V)
            hc = hb if b == c else list(hyp[c])
            hc[k] = y % V + V * (x // V)
            trades.append(((b, hb, 0),) if b == c else ((b, hb, 0), (c, hc, 0)))
        given: list[tuple[tuple[int, list[int], int], ...]] = []
        for b, h in enumerate(hyp):
            for j in range(1, len(h) - 1):
                for y in short:
                    r = list(h)
                    r[j] = h[j] % V + V * (y + 1)
                    given.append(((b, r, 0),))
        return [trades, given]

    def _embedding_grads(self, rows: Sequence[Sequence[int]], labels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        codes = torch.tensor([list(r) for r in rows], device=self.dev)
        ids, target = codes % self.V, codes // self.V - 1
        one = self.task.with_layout(TextLayout(lengths=[ids.shape[1]] * ids.shape[0]))
        chosen = target >= 0
        if not bool(chosen.any()):
            return torch.zeros(*ids.shape, self.table.shape[1], device=self.dev, dtype=self.table.dtype), None
        box: dict[str, torch.Tensor] = {}

        def labelled_only(_m: torch.nn.Module, a: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            # the decoder is most of the cost: it only needs the labelled positions (a hook on the
            # attacker's own copy, removed below)
            box["t"] = a[0][chosen]
            return (box["t"], *a[1:])

        hook = self.decoder.register_forward_pre_hook(labelled_only)
        x = self.table[ids].clone().requires_grad_(True)
        try:
            picked = one.encoder_outputs(x).logits  # [S, V]
        finally:
            hook.remove()
        loss = torch.nn.functional.cross_entropy(picked, target[chosen], reduction="sum")
        g = self.scale * torch.autograd.grad(loss, x)[0].detach()
        if not self.tied:
            return g, None
        # the decoder's part of the pool's rows: sum over labelled positions of (p - e_y) t
        pool = self.pool_index.to(self.dev)
        coef = torch.softmax(picked.detach(), -1)[:, pool]  # [S, P]
        hit = pool[None, :] == target[chosen][:, None]
        coef = coef - hit.to(coef.dtype)
        states = box["t"].detach()  # [S, d]
        owner = torch.nonzero(chosen)[:, 0]
        dense = torch.zeros(ids.shape[0], len(self.pool), states.shape[-1], device=self.dev, dtype=states.dtype)
        dense.index_add_(0, owner, coef[:, :, None] * states[:, None, :])
        return g, self.scale * dense

    def result_labels(self) -> torch.Tensor:
        n = max(len(h) for h in self.hyp)
        out = torch.full((self.B, n), -100, dtype=torch.long)
        for b, h in enumerate(self.hyp):
            for j, c in enumerate(h):
                if c >= self.V:
                    out[b, j] = self._label_of(c)
        return out


def label_multiset(bias: torch.Tensor, *, reduction: str) -> tuple[dict[int, int], int]:
    """The masked LM's labels and their counts, from its decoder bias gradient, and the number of
    labelled positions M.

    With p the model's probabilities, bias row v is (sum_i p_iv - count_v) / M (mean) or without
    the / M (sum): only labels go below 0. Taking p as small against 1 (an untrained or briefly
    trained head; a confident head would lower the counts), the counts are the smallest M at
    which every label's -M * row rounds to a whole count and the counts add up to M.

    Args:
        bias: [V] the decoder bias gradient.
    Returns:
        ({label: count}, M).
    """
    values = bias.double()
    spread = 1.4826 * (values - values.median()).abs().median()
    labels = torch.nonzero(values < values.median() - 10 * spread).flatten().tolist()
    depth = -values[labels]
    if not labels:
        return {}, 0
    if reduction == "sum":
        counts = depth.round().clamp_min(1).long()
        return dict(zip(labels, counts.tolist())), int(counts.sum())
    unit = float(depth.min())
    for M in range(len(labels), 4 * int(round(1 / unit)) + len(labels) + 1):
        counts = (depth * M).round().clamp_min(1).long()
        if int(counts.sum()) == M:
            return dict(zip(labels, counts.tolist())), M
    counts = (depth / unit).round().clamp_min(1).long()
    return dict(zip(labels, counts.tolist())), int(counts.sum())


_SEARCHES: list[tuple[type, type[_Search]]] = [(SequenceClassification, _Search), (MaskedLanguageModeling, _MaskedSearch)]
