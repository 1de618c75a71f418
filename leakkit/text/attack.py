"""Text recovery: from a BERT-style gradient to sentences, by exact leaks or by matching.

Two attack families (registered by name in `leakkit.run.attacks`):
- `exact`: analytic leaks only (token set, span checks, order, labels), then a discrete check
  that the recovered batch reproduces the gradient.
- `match`: the shared engine's continuous search in embedding space (DLG/TAG/LAMP), decoded to
  nearest tokens, optionally followed by discrete refinement (LAMP).
Neither sees ground truth. Their text-only options live in `TextAttackSettings`, not in the
engine's `AttackConfig`.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from leakkit.client.defenses import noise_variance
from leakkit.client.observation import Observation
from leakkit.engine.matching import AttackConfig, StepCallback, reconstruct
from leakkit.engine.objectives import relative_distance
from leakkit.engine.spans import row_span, span_residual
from leakkit.errors import ConfigError, InputError
from leakkit.tasks.text import CausalLanguageModeling, MaskedLanguageModeling, TextLayout, TextTask
from leakkit.text import analytic as ta
from leakkit.text import decoder as dec
from leakkit.text import deflation
from leakkit.text import matching
from leakkit.text.decoders import TOKEN_DECODERS

EXACT_DISTANCE = 1e-5  # relative gradient distance below which a recovered batch reproduces the update
SPACES = ("embeddings", "soft-tokens")  # what the continuous text search optimises (TextAttackSettings.space)


@dataclass
class TextRecovery:
    """Recovered sentences.

    input_ids: [B, n] the inputs the client fed (with [MASK] where it masked), padded.
    lengths: tokens per sentence, special tokens included.
    labels: [B] class ids (classification) or [B, n] token ids, -100 where unlabelled (masked LM).
    token_ids: per sentence, the recovered original tokens (masked positions filled with their labels).
    distance: relative gradient distance of the recovery (matched parameters).
    status: "exact" (distance < EXACT_DISTANCE), "approximate", or the engine's status.
    verified: per sentence, whether its own recomputed gradient fits the update (`verify_sentences`);
        None where that cannot be told (a noisy update, the continuous method).
    """

    input_ids: torch.Tensor
    lengths: list[int]
    labels: torch.Tensor
    token_ids: list[list[int]]
    distance: float
    seconds: float
    status: str
    method: str
    trace: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verified: list[bool] | None = None


# hypotheses the encoder sentence search may score (about a minute on 2 cores for MiniLM)
ASSEMBLE_BUDGET = 150_000
BEAM_PER_SENTENCE = 8  # partial sentences the encoder search keeps per sentence of the batch
BEAM_PER_PARENT = 4  # of which at most this many extend the same partial sentence
LENGTH_STARTS = 3  # local searches per possible sentence length (its closest hypothesis, then random ones)
MOVE_RUN, MOVE_SHIFT = 3, 6  # `_SentenceSearch.improve` moves runs of up to 3 tokens by up to 6 positions
REBEAM_COST = 20_000  # a find that narrows the candidates below this beam cost starts a new beam (`_by_length`)
NOISY_CANDIDATES = 4  # tokens ranked per position and sentence of the batch when the update is noisy


@dataclass
class TextAttackSettings:
    """The text attacks' own options; a recipe sets them under `[attack]` (or `[text]`).

    space: "embeddings" (free word embeddings, decoded to the nearest token; the papers' space) or
    "soft-tokens" (per position, a softmax mixture of the tokens the word-embedding gradient leaks:
    the candidate's own word-embedding gradient is then matched too, and decoding is the argmax);
    decoder: nearest-token rule in TOKEN_DECODERS; restrict_tokens: decode only to tokens the
    word-embedding gradient leaks; discrete_steps: LAMP-style discrete moves after matching (0 = off);
    discrete_score: what a move must lower, a name in DISCRETE_SCORES ("gradient": the gradient
    distance, LAMP's; "span": the second attention layer's span residual, a forward pass to that
    layer instead of a full backward pass, and contextual, so it tells a sentence's order apart);
    search_budget: hypotheses the exact attack's encoder batch search may score (time for success);
    cover_leaked: soft-token decoding places every leaked token at least once (each was in the
    batch), at the positions where that costs the mixtures least, when the batch has room for them.
    """

    space: str = "embeddings"
    decoder: str = "cosine"
    restrict_tokens: bool = False
    discrete_steps: int = 0
    discrete_score: str = "gradient"
    search_budget: int = ASSEMBLE_BUDGET
    cover_leaked: bool = False

    def validate(self) -> None:
        """Raise ConfigError for unknown names or out-of-range numbers."""
        if self.space not in SPACES:
            raise ConfigError(f"unknown attack.space {self.space!r}; valid: {', '.join(SPACES)}")
        TOKEN_DECODERS.get(self.decoder)
        if self.discrete_steps < 0:
            raise ConfigError("attack.discrete_steps must be 0 (off) or positive")
        if self.discrete_score not in DISCRETE_SCORES:
            raise ConfigError(f"unknown attack.discrete_score {self.discrete_score!r}; valid: {', '.join(DISCRETE_SCORES)}")
        if self.search_budget < 1:
            raise ConfigError("attack.search_budget must be at least 1 hypothesis")


def _received(task: TextTask, observation: Observation, method: str) -> Observation:
    """The update as both methods read it: checked against the model, in float64."""
    observation.check_against(task.model)
    if observation.extra.get("fedavg") and method == "exact":
        raise ConfigError("the exact text attack reads a single gradient (FedSGD); a FedAvg update needs attack.method=match")
    return observation.upcast()


def attacker_view(task: TextTask, observation: Observation) -> TextTask:
    """The task as the attacker sees this update: shared gradients and the batch layout read off it."""
    return task.sharing(observation).with_layout(ta.infer_layout(task, observation))


# --- helpers shared by both methods ---------------------------------------------------------
def _attacker_copy(task: TextTask, device: str) -> TextTask:
    return task.copy_to(dtype=torch.float64, device=device)  # type: ignore[return-value]


def gradient_distance(task: TextTask, observation: Observation, input_ids: torch.Tensor, lengths: list[int], labels: torch.Tensor) -> float:
    """Relative distance between the observed gradient and that of a discrete hypothesis."""
    work = task.with_layout(TextLayout(lengths=lengths))
    dev = next(work.model.parameters()).device
    names = [n for n, _ in work.matched_parameters()]
    grads = work.gradients(input_ids.to(dev), labels.to(dev), reduction=observation.reduction, matched=True)
    target = [observation.gradients[n].to(dev) for n in names]  # mixed precision: the difference widens on the fly, no float64 copy
    return relative_distance(grads, target)


VERIFY_TOL = 1e-3  # a sentence's own gradient off the update's row spans: true ones sit below 2e-5 (float32 updates), one wrong token gives 0.1


def verify_sentences(
    task: TextTask, observation: Observation, input_ids: torch.Tensor, lengths: list[int], labels: torch.Tensor,
) -> list[bool] | None:
    """Which sentences of a hypothesis are certainly in the batch, each checked on its own.

    A weight matrix's gradient over a batch is the sum of the sentences' gradients, so a sentence
    the client sent has its own gradient inside the update's row span (the layer's inputs) at
    every layer; one wrong token moves it out at the first layer that sees it, and every layer
    after. The sentence's gradient is recomputed alone and checked at every shared 2-D weight
    whose row span does not fill its width (a batch with more tokens than the layer is wide tells
    nothing there). The column side (backpropagated errors) is not used: the update's smallest
    error directions fall below any rank cut that float32 allows, and a true sentence has parts there.
    Labels are not verified here (the whole batch's gradient distance does that): a masked-LM
    sentence with the right inputs and a misplaced label passes. A sentence whose own gradient is
    zero (a masked-LM hypothesis with no label) lies in every span and is not verified.

    Shape:
        input_ids [B, n], labels [B] or [B, n] (masked LM, -100 where unlabelled).
    Returns:
        [B] verdicts, or None when no shared weight has a span narrower than its width.
    """
    names = [n for n, p in task.matched_parameters() if p.dim() == 2 and "embeddings" not in n]
    spans: dict[str, torch.Tensor] = {}
    for n in names:
        basis = ta.row_span(observation.gradients[n])
        if basis.shape[1] < basis.shape[0]:
            spans[n] = basis
    if not spans:
        return None
    params = dict(task.matched_parameters())
    out = []
    for b, L in enumerate(lengths):
        one = task.with_layout(TextLayout(lengths=[L]))
        dev = next(one.model.parameters()).device
        label = labels[b : b + 1, :L] if labels.dim() == 2 else labels[b : b + 1]
        loss = one.loss(input_ids[b : b + 1, :L].to(dev), label.to(dev), reduction="sum")
        grads = torch.autograd.grad(loss, [params[n] for n in spans])
        worst, checked = 0.0, False
        for g, basis in zip(grads, spans.values()):
            g, basis, norm = g.double(), basis.to(g.device, torch.float64), float(g.norm())
            if norm > 0:
                worst, checked = max(worst, float((g - (g @ basis) @ basis.T).norm()) / norm), True
        out.append(checked and worst < VERIFY_TOL)
    return out


def _fill_labels(input_ids: torch.Tensor, lengths: list[int], labels: torch.Tensor, masked_lm: bool) -> list[list[int]]:
    out = []
    for b, L in enumerate(lengths):
        row = input_ids[b, :L].tolist()
        if masked_lm:
            for j in range(L):
                if int(labels[b, j]) >= 0:
                    row[j] = int(labels[b, j])
        out.append(row)
    return out


# --- exact -------------------------------------------------------------------------------------
def exact(
    task: TextTask, observation: Observation, attack: AttackConfig | None = None, text: TextAttackSettings | None = None, *,
    seed: int = 0, device: str = "cpu", callbacks: Sequence[StepCallback] = (),
) -> TextRecovery:
    """Sentences (and labels) from analytic leaks alone; of `attack`/`text` only `text.search_budget` is used.

    Raises:
        ConfigError: a FedAvg update, or neither the first attention layer's nor the embedding gradients shared.
        InputError: nothing in the vocabulary fits the gradient (another model's update).
    """
    started = time.perf_counter()
    observation = _received(task, observation, "exact")
    if isinstance(task, CausalLanguageModeling):
        return _decoder_exact(task, observation, device=device, started=started)
    work = _attacker_copy(task.sharing(observation), device)
    notes: list[str] = []
    B = observation.batch_size
    masked_lm = isinstance(work, MaskedLanguageModeling)
    grads = observation.gradients
    wname, pname = work.word_embedding_name(), work.position_embedding_name()
    noise = math.sqrt(noise_variance(observation))  # declared in the update's metadata (0 if none)
    leak = ta.token_leak(grads[wname], tied=masked_lm and work.tied_decoder(), noise_std=noise) if wname in grads else None
    if leak is None:
        notes.append("word-embedding gradient withheld: candidate tokens are the whole vocabulary")

    rows: list[list[int]] | None = None
    if B == 1 and leak is not None and pname and pname in grads:
        positions = ta.nonzero_positions(grads[pname])
        if not positions:
            raise InputError("no position-embedding row stands out of the update's noise: the sentence's positions cannot be read")
        S = ta.order_from_positions(leak.input_rows, grads[pname][positions], leak.decoder_span)
        off = float((S - S.round()).abs().max())
        # each position takes the token whose row holds most of it: exact on a clean update, and on
        # a noisy one a ranking that degrades gradually (the span checks below fail outright there)
        rows = [[leak.tokens[int(t)] for t in S.argmax(0)]]
        if off >= 0.05:
            notes.append(f"order read from a noisy position gradient (largest deviation from 0/1: {off:.2f})")
    read: dict[tuple[int, ...], tuple[Any, bool]] = {}  # labels the sentence search read off, and whether the rank drop proved them
    matched: torch.Tensor | None = None  # labels `matching.match_batch` chose with the sentences
    budget = text.search_budget if text is not None else ASSEMBLE_BUDGET
    finder: TextTask | None = None
    probe: tuple[float, list[str]] | None = None  # `analytic.update_noise` and its notes, taken once
    if rows is None and B > 1 and matching.usable(work, observation):
        # a noisy update: the span tests lose their edge, the embedding gradients keep it
        finder = _span_finder(task, observation, device)
        source = "from the update's metadata" if noise > 0 else "estimated"
        if noise == 0:
            probe = _update_noise(finder, observation)
            noise = _undeclared_noise(finder, observation, probe[0], notes)
        if noise > 0:
            notes.append(f"noise std {noise:.3g} {source}: the batch is matched to the word and position embedding gradients")
            limit = dec.position_limit(observation, finder) or finder.max_length
            found = matching.match_batch(finder, observation, n_max=limit, noise_std=noise, notes=notes, budget=min(budget, matching.MATCH_BUDGET))
            rows, matched, finder = found.rows, found.labels, None
    if rows is None:
        groups = ta.attention_groups(work)
        if not ta.group_available(observation, groups[0]):
            raise ConfigError("the exact attack needs the first attention layer's gradient (or word and position embedding gradients)")
        finder = finder if finder is not None else _span_finder(task, observation, device)
        noise, said = probe if probe is not None else _update_noise(finder, observation)
        notes.extend(said)
        if noise > 0:
            # every token's residual rises with the noise: rank them at each position of the batch's length
            limit = dec.position_limit(observation, finder) or finder.max_length
            search = dict(n_max=limit, noise_std=noise, tol=ta.NOISY_SPAN_TOL, most=NOISY_CANDIDATES * B, least=NOISY_CANDIDATES * B)
        else:
            search = {}
        scored = ta.scored_position_candidates(finder, observation, tokens=leak.tokens if leak else None, **search)  # type: ignore[arg-type]
        if not scored:
            raise InputError("no token fits the first layer's input span: is this gradient from this model?")
        candidates = ta.token_lists(scored)
        # a clean update: the batch's own pairs first (under noise every residual sits above float32's floor)
        first = ta.tight_candidates(scored) if noise == 0 else None
        rows = assemble(finder, observation, candidates, B, seed=seed, notes=notes, budget=budget, noise_std=noise, first=first, labels=read)  # type: ignore[arg-type]
        del finder
    input_ids, lengths = work.pad(rows)
    input_ids = input_ids.to(device)
    labels = matched.to(device) if matched is not None else _infer_labels(work, observation, input_ids, lengths, masked_lm=masked_lm, notes=notes)
    if masked_lm:
        # masked labels the rank drop proved are kept whatever the rest of the batch (a missing
        # sentence's stand-in would pull a re-inference off them)
        labels = _with_read(labels, rows, {r: v for r, (v, proven) in read.items() if proven})
    distance = gradient_distance(work, observation, input_ids, lengths, labels)
    guessed = {r: v for r, (v, proven) in read.items() if not proven}
    if masked_lm and matched is None and distance > EXACT_DISTANCE and any(tuple(r) in guessed for r in rows):
        alt = _with_read(labels, rows, guessed)
        d = gradient_distance(work, observation, input_ids, lengths, alt)
        if d < distance:
            labels, distance = alt, d
    if masked_lm and matched is None and distance > EXACT_DISTANCE:
        labels, distance = _swap_labels(work, observation, input_ids, lengths, labels, distance)
    status = "exact" if distance < EXACT_DISTANCE else "approximate"
    if status == "exact":
        verified: list[bool] | None = [True] * B  # the whole batch's gradient is recomputed
    elif noise > 0:
        verified = None
    else:
        verified = [False] if B == 1 else verify_sentences(work, observation, input_ids, lengths, labels)
    if verified is not None and status != "exact":
        notes.append(f"{sum(verified)} of {B} sentence(s) verified on their own (their recomputed gradient fits the update's spans)")
    return TextRecovery(
        input_ids=input_ids.cpu(), lengths=lengths, labels=labels.cpu(),
        token_ids=_fill_labels(input_ids.cpu(), lengths, labels.cpu(), masked_lm),
        distance=distance, seconds=time.perf_counter() - started, status=status, method="exact", notes=notes,
        verified=verified,
    )


def _span_finder(task: TextTask, observation: Observation, device: str) -> TextTask:
    """The attacker's float32 copy for span checks: members of a span sit near 1e-6, non-members near 1,
    so float32 tells them apart at half float64's memory and time."""
    return task.sharing(observation).copy_to(dtype=torch.float32, device=device)  # type: ignore[return-value]


def _update_noise(finder: TextTask, observation: Observation) -> tuple[float, list[str]]:
    """`analytic.update_noise` (declared, else estimated from the update) and the notes it wrote."""
    said: list[str] = []
    return ta.update_noise(finder, observation, said), said


def _undeclared_noise(finder: TextTask, observation: Observation, estimated: float, notes: list[str]) -> float:
    """The noise std of an update whose metadata declares none: `estimated` from the update itself,
    or 0 for a clean one. Word-embedding rows at exactly 0 mean a clean update whose batch outgrew
    the second attention layer (noise would fill every row): 0 there."""
    if estimated == 0 or ta.has_clean_rows(observation.gradients[finder.word_embedding_name()]):
        return 0.0
    notes.append(f"no noise declared in the update's metadata, but the second attention layer's gradient is full rank: noise std estimated as {estimated:.3g}")
    return estimated


NOISY_BEAM = 64  # prefixes kept per position and sentence of the batch when the update is noisy


def _decoder_exact(task: CausalLanguageModeling, observation: Observation, *, device: str, started: float) -> TextRecovery:
    """DAGER's decoder search (leakkit.text.decoder), then the batch's gradient recomputed in float64."""
    notes: list[str] = []
    B = observation.batch_size
    finder = _span_finder(task, observation, device)  # the final gradient check runs in float64
    noise = ta.update_noise(finder, observation, notes)  # type: ignore[arg-type]
    if noise > 0:
        # every word-embedding row and position row is non-zero under noise: scan the vocabulary
        tokens, limit, tol, most = None, finder.max_length, ta.NOISY_SPAN_TOL, 4 * B
    else:
        tokens = dec.candidate_tokens(finder, observation, notes)  # type: ignore[arg-type]
        limit = dec.position_limit(observation, finder) or finder.max_length
        tol, most = ta.SPAN_TOL, None
    candidates = ta.position_candidates(finder, observation, tokens=tokens, n_max=limit, noise_std=noise, tol=tol, most=most)
    if not candidates:
        raise InputError("no token fits the first layer's input span: is this gradient from this model?")
    # under noise many more prefixes pass; a bounded beam keeps memory and time in check
    found = dec.search(finder, observation, candidates, tol=tol, noise_std=noise, max_alive=NOISY_BEAM * B if noise > 0 else 4096)  # type: ignore[arg-type]
    notes += found.notes
    order = sorted(range(len(found.sentences)), key=lambda k: found.residuals[k])
    rows = [found.sentences[k] for k in order]
    if not rows:
        raise InputError("no sentence passed the second layer's span check: the update is from another model, "
                         "or the noise is too large for the span checks")
    _, end = task.boundary_ids()
    options = rows + [p + [end] for p in found.prefixes] if end is not None else rows
    counts = dec.multiplicities(finder, observation, options, B)  # type: ignore[arg-type]
    if counts is not None:
        rows = [o for o, c in zip(options, counts) for _ in range(c)]
        notes.append("sentence counts read off the end token's output-layer gradient")
    elif len(rows) > B:
        notes.append(f"{len(rows)} sentences passed the span checks for a batch of {B}; kept the {B} closest")
        rows = rows[:B]
    elif len(rows) < B:
        notes.append(f"found {len(rows)} distinct sentence(s) for a batch of {B}: the rest repeat them (the client may have sent duplicates)")
        rows += [rows[i % len(rows)] for i in range(B - len(rows))]
    del finder
    work = _attacker_copy(task.sharing(observation), device)
    input_ids, lengths = task.pad(rows)
    input_ids = input_ids.to(device)
    labels = task.labels_for(input_ids, lengths)
    distance = gradient_distance(work, observation, input_ids, lengths, labels)
    notes.append(f"decoder search: {found.checked} prefixes checked over {found.positions} positions")
    return TextRecovery(
        input_ids=input_ids.cpu(), lengths=lengths, labels=labels.cpu(), token_ids=[list(r) for r in rows],
        distance=distance, seconds=time.perf_counter() - started, status="exact" if distance < EXACT_DISTANCE else "approximate",
        method="exact", notes=notes,
    )


def assemble(
    task: TextTask, observation: Observation, candidates: list[list[int]], batch: int, *, seed: int, notes: list[str],
    budget: int = ASSEMBLE_BUDGET, noise_std: float = 0.0, first: list[list[int]] | None = None, labels: dict[tuple[int, ...], Any] | None = None,
) -> list[list[int]]:
    """Split per-position candidate tokens into `batch` sentences.

    A hypothesis is scored by how far its second attention layer's inputs lie from the span that
    layer's gradient reveals (zero only for a sentence the client really sent). The first layer
    lets through more tokens per position than the batch holds (a token seen at two positions
    links them, see `position_candidates`), the separator included, so sentences are grown, not
    enumerated: a beam from the left, then a local search on whole hypotheses of each length the
    missing sentences can have (`_by_length`), then a beam from every separator candidate to the
    left, then a wider one from the left, stopping once `batch` sentences fit; the closest misses
    are then improved one token at a time. Each sentence found is taken out of the second layer's
    gradient (`_SentenceSearch.deflate`), so pieces of it no longer fit
    elsewhere. At most `budget` hypotheses are scored: a defended (noisy) update gives every
    position many candidates, and the search then returns its closest hypotheses instead of
    running for hours. Under noise (`noise_std`) the second layer's span
    keeps only the directions above it and a sentence fits within a tolerance derived from the
    noise (`ta.noisy_span_tol`); hypotheses are still ranked by their residual.

    Args:
        first: a narrower candidate list to search first (`ta.tight_candidates`); the search goes on
            over `candidates`, keeping what it found, only while the batch is short.
        labels: filled with the labels the search read off the sentences it found, each with
            whether the rank drop proved it (`_SentenceSearch.labels`).
    """
    if batch == 1 and all(len(c) == 1 for c in candidates):
        return [[c[0] for c in candidates]]
    groups = ta.attention_groups(task)
    if len(groups) < 2 or not ta.group_available(observation, groups[1]):
        raise ConfigError("splitting a batch into sentences needs the second attention layer's gradient")
    tiers = [first, candidates] if first is not None and first != candidates else [candidates]
    search = _SentenceSearch(task, observation, tiers[0], batch, budget=budget, seed=seed, noise_std=noise_std)
    for k, tier in enumerate(tiers):
        if search.done():
            break
        if k:
            notes.append(f"{len(search.found)} sentence(s) fit from the first layer's closest tokens; searching all {sum(map(len, tier))} candidates")
            search.widen(tier)
        _grow(search, batch)
    if search.scored >= budget:
        notes.append(f"sentence search stopped after its budget of {budget} hypotheses")
    found, closest = search.found, search.closest
    if labels is not None:
        labels.update(search.labels)
    if noise_std > 0:
        return _distinct(sorted(closest, key=lambda k: closest[k]), batch, notes, budget)
    sentences = sorted(found, key=lambda k: found[k])
    if len(sentences) < batch:
        # keep what fits, then the closest misses: an approximate answer beats none
        notes.append(f"found {len(sentences)} sentence(s) fitting the span for a batch of {batch}; filled with the closest hypotheses")
        rest = sorted((k for k in closest if k not in found), key=lambda k: closest[k])
        sentences += rest[: batch - len(sentences)]
        if not sentences:
            raise _no_hypothesis(budget)
        sentences += [sentences[i % len(sentences)] for i in range(batch - len(sentences))]
    elif len(sentences) > batch:
        notes.append(f"{len(sentences)} sentences fit the span for a batch of {batch}; kept the {batch} closest")
    return [list(s) for s in sentences[:batch]]


def _grow(search: "_SentenceSearch", batch: int) -> None:
    """One pass of `assemble`'s search over the search's current candidates."""
    width = BEAM_PER_SENTENCE * batch
    stages = (lambda: search.forward(width), lambda: _by_length(search), lambda: search.backward(width), lambda: search.forward(4 * width))
    for run in stages:
        if search.done():
            break
        run()
    for key in sorted((k for k in search.closest if k not in search.found), key=lambda k: search.closest[k])[: 2 * batch]:
        if search.done():
            break
        search.descend(list(key))
    # two sentences of one length: more descents at the lengths that fit, while the batch is short
    for L in sorted({len(k) for k in search.found}):
        misses = 0
        while not search.done() and misses < 6:
            before = len(search.found)
            search.descend(search.random_start(L, [k for k in search.found if len(k) == L]))
            misses = 0 if len(search.found) > before else misses + 1


def _by_length(search: "_SentenceSearch") -> None:
    """Local search on whole hypotheses, one length at a time, over the lengths the missing
    sentences can have (`_SentenceSearch.feasible_lengths`). The encoder attends both ways, so a
    prefix beam loses a word whose fit needs its right-hand neighbour; a whole hypothesis with most
    of its tokens right improves to the sentence (`_SentenceSearch.improve`). Each length starts
    from its closest hypothesis so far, then from random ones, LENGTH_STARTS times at most."""
    if not search.deflates:
        # without `deflate` pieces of found sentences fit inside every hypothesis: on held-out masked-LM
        # batches, before `deflate` read masked labels, this stage found nothing more and cost 30 %
        # more time (and under noise no hypothesis fits, so nothing would tell it to move on)
        return
    tried: Counter[int] = Counter()
    while not search.done():
        lengths = [n for n in search.feasible_lengths() if tried[n] < LENGTH_STARTS]
        if not lengths:
            return
        # the least tried length whose best hypothesis is closest goes first
        n = min(lengths, key=lambda m: (tried[m], search.start_for(m)[1]))
        tried[n] += 1
        before = len(search.found)
        search.improve(search.start_for(n)[0])
        # each find narrows the candidates (`deflate`); once a beam over them is cheap it beats
        # local search from hypotheses scored against the wider ones
        width = BEAM_PER_SENTENCE * (search.batch - len(search.found))
        if len(search.found) > before and not search.done() and width * sum(map(len, search.candidates)) <= REBEAM_COST:
            search.forward(width)


def _with_read(labels: torch.Tensor, rows: list[list[int]], read: dict[tuple[int, ...], Any]) -> torch.Tensor:
    """`labels` [B, n] with each sentence in `read` given its read (position, token) pairs."""
    out = labels.clone()
    for b, r in enumerate(rows):
        if tuple(r) in read:
            out[b] = -100
            for j, v in read[tuple(r)]:
                out[b, j] = v
    return out


def _no_hypothesis(budget: int) -> InputError:
    return InputError(f"no whole sentence was formed within the search budget of {budget} hypotheses: raise attack.search_budget")


def _distinct(ranked: list[tuple[int, ...]], batch: int, notes: list[str], budget: int) -> list[list[int]]:
    """The `batch` best of `ranked` hypotheses, skipping any that shares half its tokens or more
    with a kept one (as multisets, so an inserted token does not hide the likeness): under noise
    the variants of one sentence (a token dropped, doubled or moved) score alike, and without
    this they would crowd the others out."""
    kept: list[tuple[int, ...]] = []
    for h in ranked:
        if all(sum((Counter(h) & Counter(k)).values()) < max(len(h), len(k)) / 2 for k in kept):
            kept.append(h)
        if len(kept) == batch:
            break
    if not kept:
        raise _no_hypothesis(budget)
    notes.append(f"noisy update: the {len(kept)} closest distinct hypotheses by the second layer's residual (not verified exact)")
    return [list(k) for k in kept] + [list(kept[i % len(kept)]) for i in range(batch - len(kept))]


def _within(start: Sequence[int], slots: list[list[int]]) -> list[int]:
    """`start` with each token its position no longer allows (`deflate` narrowed the candidates
    since it was scored) replaced by the position's first candidate: the single-token moves skip
    positions with one candidate, and would leave such a token in place."""
    return [t if t in c else c[0] for t, c in zip(start, slots)]


def _rearrangements(cur: list[int]) -> list[list[int]]:
    """Every swap of two inner positions' tokens, and every run of up to MOVE_RUN inner tokens moved
    by up to MOVE_SHIFT positions; the first and last tokens ([CLS], [SEP]) stay."""
    n, out = len(cur), []
    for i in range(1, n - 1):
        for j in range(i + 1, n - 1):
            if cur[i] != cur[j]:
                h = list(cur)
                h[i], h[j] = h[j], h[i]
                out.append(h)
    for a in range(1, n - 1):
        for r in range(1, min(MOVE_RUN, n - 1 - a) + 1):
            run, rest = cur[a : a + r], cur[:a] + cur[a + r :]
            for b in range(max(1, a - MOVE_SHIFT), min(len(rest) - 1, a + MOVE_SHIFT) + 1):
                if b != a:
                    out.append(rest[:b] + run + rest[b:])
    return out


class _SentenceSearch:
    """The state of `assemble`'s search: hypotheses scored so far, sentences that fit, closest misses."""

    def __init__(
        self, task: TextTask, observation: Observation, candidates: list[list[int]], batch: int, *, budget: int, seed: int, noise_std: float = 0.0,
    ) -> None:
        self.task, self.observation, self.candidates, self.batch, self.budget = task, observation, candidates, batch, budget
        self.noise = noise_std
        groups = ta.attention_groups(task)
        self.layer0, self.first, self.second = groups[0][0], ta._weights(groups[0]), ta._weights(groups[1])
        self.tol = ta.noisy_span_tol(observation, self.second, noise_std, model=task.model) if noise_std > 0 else ta.SPAN_TOL
        self.cls, self.sep = task.boundary_ids()
        self.dev = next(task.model.parameters()).device
        self.first_span: torch.Tensor | None = None  # the first layer's span without the found sentences (`deflate`)
        self.widen(candidates)
        self.gen = torch.Generator().manual_seed(seed)
        self.found: dict[tuple[int, ...], float] = {}
        self.closest: dict[tuple[int, ...], float] = {}  # every whole hypothesis scored, with its residual
        self.scored = 0
        self.exact: TextTask | None = None  # a float64 copy for `deflate`, made on first use
        self.left: dict[str, torch.Tensor] = {}
        self.labels: dict[tuple[int, ...], tuple[Any, bool]] = {}  # found sentences' labels (`deflate`), and whether proven
        self.starts: set[tuple[int, ...]] = set()  # hypotheses `improve` started from
        # under noise a sentence within the tolerance may be a near miss: `deflate` stays off
        self.deflates = not noise_std and deflation.deflatable(task, observation)
        span = ta.layer_span(task, observation, 1, noise_std=noise_std)
        self.tokens, self.width = span.shape[1], span.shape[0]  # the batch's token count while below the width

    def widen(self, candidates: list[list[int]]) -> None:
        """Search over `candidates` from now on (less what left the first layer's span with the
        found sentences); what was found and scored so far is kept."""
        self.given = candidates
        self.candidates = self.narrowed(candidates)
        self.ends = [j for j, c in enumerate(self.candidates) if self.sep in c] or [len(self.candidates) - 1]

    def narrowed(self, candidates: list[list[int]]) -> list[list[int]]:
        """`candidates` whose first-layer input still lies in the first layer's span once the found
        sentences are subtracted, up to the first position left with none. A (token, position)
        pair only a found sentence held leaves that span, and so do the foreign pairs that passed
        because it closed a cycle (see `ta.scored_position_candidates`)."""
        if self.first_span is None:
            return candidates
        tokens = sorted({t for c in candidates for t in c})
        grid = torch.tensor(tokens, device=self.dev)[:, None].expand(-1, len(candidates))
        x = ta.capture_input(self.task.model, self.layer0, input_ids=grid, attention_mask=torch.ones_like(grid))
        residual = span_residual(x, self.first_span.to(self.dev))  # [tokens, positions]
        index = {t: k for k, t in enumerate(tokens)}
        out = []
        for j, c in enumerate(candidates):
            kept = [t for t in c if float(residual[index[t], j]) < ta.SPAN_TOL]
            if not kept:
                break
            out.append(kept)
        return out

    def done(self) -> bool:
        # under noise a sentence within the tolerance may still be a near miss: search on, rank at the end
        return (len(self.found) >= self.batch and not self.noise) or self.scored >= self.budget

    def score(self, rows: Sequence[Sequence[int]], *, start: int = 0, chunk: int = 1024) -> torch.Tensor:
        """Mean residual of each row; `start` > 0: the rows hold positions start.. of a sentence
        whose positions 1..start-1 are unknown (hidden from attention, a filler holds their place)."""
        out = []
        for i in range(0, len(rows), chunk):
            part = [list(r) for r in rows[i : i + chunk]]
            self.scored += len(part)
            if start == 0:
                ids, lengths = self.task.pad(part)
                out.append(ta.layer_residual(self.task, self.observation, 1, ids.to(self.dev), lengths, noise_std=self.noise))
                continue
            n = start + max(len(r) for r in part)
            filler = self.cls if self.cls is not None else self.sep
            ids = torch.full((len(part), n), filler, dtype=torch.long)
            mask = torch.zeros(len(part), n, dtype=torch.long)
            mask[:, 0] = 1
            for k, r in enumerate(part):
                ids[k, start : start + len(r)] = torch.tensor(r)
                mask[k, start : start + len(r)] = 1
            out.append(ta.layer_residual(self.task, self.observation, 1, ids.to(self.dev), [], mask=mask, noise_std=self.noise))
        return torch.cat(out)

    def record(self, rows: Sequence[Sequence[int]], residuals: torch.Tensor) -> None:
        for row, residual in zip(rows, residuals.tolist()):
            key = tuple(row)
            self.closest[key] = min(residual, self.closest.get(key, math.inf))
            if residual < self.tol and key not in self.found:
                self.found[key] = residual
                self.deflate(key)

    def deflate(self, row: tuple[int, ...]) -> None:
        """Subtract a found sentence's own share from the second layer's gradient, so that the span
        the search scores against holds only the sentences still missing. That layer's inputs are
        nearly local: without this, a run of a found sentence's tokens at the positions it holds
        there fits inside any hypothesis, and wrong sentences stitched from such runs score as
        close as the missing ones. The share depends on the sentence's label (its class, or its
        masked positions' tokens): the right one lowers the gradient's rank by the sentence's
        length, exactly, and the others leave it (`leakkit.text.deflation`), so the label is found
        too (`self.labels`). The batch's last sentence has no rank left to lower: its label is
        the one that leaves nothing. Not under noise (`self.deflates`)."""
        if not self.deflates or len(self.found) > self.batch:
            return
        names = self.first + self.second
        if self.exact is None:
            self.exact = self.task.copy_to(dtype=torch.float64, device=self.dev)
            self.left = {n: self.observation.gradients[n].to(self.dev).double() for n in names}
        span = ta.layer_span(self.task, self.observation, 1).to(self.dev)
        rest = torch.cat([self.left[n] for n in self.second])
        options = deflation.choices(self.exact, self.observation, row, names, self.batch)
        if options is None:
            return
        k = len(self.first)
        whole = None
        if len(self.found) == self.batch:
            whole = float(torch.linalg.matrix_norm(torch.cat([self.observation.gradients[n].double() for n in self.second]), ord=2))
        share, label, basis = deflation.fit(options, rest, span, len(row), tested=k, whole=whole)
        # an unproven label is still a guess `exact` may keep where its gradient comes closer
        self.labels[row] = (label, basis is not None)
        if basis is not None and len(self.found) < self.batch:
            self.left = {m: self.left[m] - g for m, g in zip(names, share)}
            ta.set_layer_span(self.task, self.observation, 1, span @ basis)  # basis: [rank, rank - found], in the span's coordinates
            self.first_span = row_span(torch.cat([self.left[m] for m in self.first]))
            self.widen(self.given)

    def options(self, j: int) -> list[int]:
        return [t for t in self.candidates[j] if t not in (self.sep, self.cls)]

    def prune(self, children: list[tuple[int, ...]], scores: torch.Tensor, parents: int, per: int, width: int, free: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The `width` best children, at most BEAM_PER_PARENT of them from one parent first, so that
        every sentence keeps a partial sentence in the beam and not only the one that fits best;
        children in `free` (parts of sentences already found) ride along without taking room."""
        ranked = scores.argsort().tolist()
        diverse = {p * per + int(i) for p in range(parents) for i in scores[p * per : (p + 1) * per].argsort()[:BEAM_PER_PARENT]}
        rest = [i for i in ranked if children[i] not in free]
        kept = [i for i in rest if i in diverse][:width]
        kept += [i for i in rest if i not in diverse][: width - len(kept)]
        return [children[i] for i in ranked if children[i] in free] + [children[i] for i in kept]

    def forward(self, width: int) -> None:
        """Prefixes grown left to right, each scored as if its sentence ended there (a layer-0 head
        attends mostly near its own position, so a right prefix stays close to the span); a prefix
        that meets a separator candidate is closed and checked whole."""
        free = {key[:j] for key in self.found for j in range(1, len(key))}
        first = self.candidates[0]
        beam: list[tuple[int, ...]] = [(self.cls,)] if self.cls in first else [(t,) for t in first]
        k = 0
        while (k := k + 1) < len(self.candidates):  # `deflate` may shorten the candidates meanwhile
            if self.done() or not beam:
                return
            if self.sep in self.candidates[k]:
                whole = [p + (self.sep,) for p in beam]
                self.record(whole, self.score(whole))
            if k >= len(self.candidates):  # a find just narrowed them
                return
            options = self.options(k)
            if not options:
                return
            children = [p + (t,) for p in beam for t in options]
            beam = self.prune(children, self.score(children), len(beam), len(options), width, free)

    def backward(self, width: int) -> None:
        """Suffixes grown right to left from every separator candidate: a word whose fit needs its
        right context, which the forward pass lacks, has it here."""
        free = {key[j:] for key in self.found for j in range(1, len(key))}
        beam: list[tuple[int, ...]] = []
        for j in range(max(self.ends), 0, -1):
            if self.done():
                return
            if j >= len(self.candidates):  # `deflate` shortened the candidates meanwhile
                beam = []
                continue
            options = self.options(j)
            children = [(t,) + b for b in beam for t in options]
            scores = self.score(children, start=j) if children else torch.zeros(0)
            if j == 1:
                head = (self.cls,) if self.cls is not None else ()
                self.record([head + c for c in children], scores)
                return
            beam = self.prune(children, scores, len(beam), len(options), width, free) if children else []
            if j in self.ends:
                beam.append((self.sep,))

    def feasible_lengths(self) -> list[int]:
        """Lengths a missing sentence can have: a separator candidate at its end, and the missing
        sentences' lengths able to sum to the batch's token count (the rank of the second layer's
        span, while below the model's width) less the found ones, one of them reaching the last position."""
        allowed = sorted({e + 1 for e in self.ends} | {len(self.candidates)})
        k = self.batch - len(self.found)
        if k <= 0 or self.tokens >= self.width:
            return allowed if k > 0 else []
        rest, longest = self.tokens - sum(map(len, self.found)), len(self.candidates)
        if all(len(f) < longest for f in self.found):
            k, rest = k - 1, rest - longest
            if k == 0 or rest <= 0:
                return [longest] if rest == 0 else []
        sums = [{0}]  # sums[c]: the totals c missing sentences can reach
        for _ in range(k - 1):
            sums.append({t + n for t in sums[-1] for n in allowed if t + n <= rest})
        out = {n for n in allowed if rest - n in sums[k - 1]}
        return sorted(out | ({longest} if out and longest not in map(len, self.found) else set()))

    def start_for(self, n: int) -> tuple[list[int], float]:
        """The closest hypothesis of length n scored so far that is neither found nor a start
        already, with its residual; else a random one (residual inf)."""
        best = min((k for k in self.closest if len(k) == n and k not in self.found and k not in self.starts), key=self.closest.__getitem__, default=None)
        if best is None:
            return self.random_start(n, [k for k in self.found if len(k) == n]), math.inf
        return list(best), self.closest[best]

    def improve(self, start: list[int]) -> None:
        """Local search on one whole hypothesis until no move lowers its residual: each position's
        best candidate in turn, then the best swap of two positions' tokens or run of up to
        MOVE_RUN tokens moved by up to MOVE_SHIFT positions (the second layer's local minima: two
        words in each other's place, a phrase shifted)."""
        self.starts.add(tuple(start))
        slots = self.slots(len(start))
        if not slots:
            return
        cur = _within(start, slots)
        best = float(self.score([cur])[0])
        while best >= self.tol and not self.done():
            changed = False
            for j, c in enumerate(slots):
                if len(c) == 1 or self.done():
                    continue
                scores = self.score([cur[:j] + [t] + cur[j + 1 :] for t in c])
                k = int(scores.argmin())
                if float(scores[k]) < best:
                    cur[j], best, changed = c[k], float(scores[k]), True
            if changed or self.done():
                continue
            moves = _rearrangements(cur)
            if not moves:
                break
            scores = self.score(moves)
            k = int(scores.argmin())
            if float(scores[k]) >= best:
                break
            cur, best = moves[k], float(scores[k])
        self.record([cur], torch.tensor([best]))

    def random_start(self, L: int, avoid: list[tuple[int, ...]]) -> list[int]:
        """A random hypothesis of L tokens, away from the sentences in `avoid` where the candidates allow it."""
        start = []
        for j, c in enumerate(self.slots(L)):
            fresh = [t for t in c if all(a[j] != t for a in avoid)] or c
            start.append(fresh[int(torch.randint(len(fresh), (), generator=self.gen))])
        return start

    def descend(self, start: list[int]) -> None:
        """Coordinate descent on one whole hypothesis: each position in turn takes its best candidate."""
        slots = self.slots(len(start))
        if not slots:
            return
        cur = _within(start, slots)
        for _sweep in range(8):
            changed = False
            for j, c in enumerate(slots):
                if len(c) == 1 or self.done():
                    continue
                best = c[int(self.score([cur[:j] + [t] + cur[j + 1 :] for t in c]).argmin())]
                if best != cur[j]:
                    cur[j], changed = best, True
            if not changed:
                break
        self.record([cur], self.score([cur]))

    def slots(self, L: int) -> list[list[int]]:
        """Each position's candidates for a sentence of length L (separator last, [CLS] first);
        none when the candidates are shorter (`deflate` narrowed them)."""
        if L > len(self.candidates):
            return []
        out = []
        for j in range(L):
            c = self.candidates[j]
            if j == 0 and self.cls is not None and self.cls in c:
                c = [self.cls]
            elif j == L - 1:
                c = [self.sep]
            else:
                c = self.options(j) or c
            out.append(c)
        return out


def _captured_forward(task: TextTask, module: torch.nn.Module, input_ids: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the input of `module` for a discrete batch."""
    box: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, a: box.append(a[0]))
    try:
        with torch.no_grad():
            out = task.with_layout(TextLayout(lengths=lengths)).encoder_outputs(input_ids)
    finally:
        handle.remove()
    return out.logits, box[-1]


def _infer_labels(task: TextTask, observation: Observation, input_ids: torch.Tensor, lengths: list[int], *, masked_lm: bool, notes: list[str]) -> torch.Tensor:
    w_name, b_name = task.classifier_parameter_names()
    grads = observation.gradients
    if masked_lm:
        return _masked_labels(task, observation, input_ids, lengths, notes)
    layer = task.model.get_submodule(w_name.rpartition(".")[0])
    logits, feats = _captured_forward(task, layer, input_ids, lengths)
    probs = torch.softmax(logits.double(), -1)
    B = input_ids.shape[0]
    if w_name not in grads:
        raise ConfigError("label inference needs the classification layer's gradient")
    # G = (1/B) (P - Y)^T F  =>  Y = P - B (G pinv(F))^T
    scale = B if observation.reduction == "mean" else 1
    est = probs - scale * (grads[w_name].double().to(feats.device) @ torch.linalg.pinv(feats.double().reshape(B, -1))).T
    return est.argmax(-1)


def _masked_labels(task: TextTask, observation: Observation, input_ids: torch.Tensor, lengths: list[int], notes: list[str]) -> torch.Tensor:
    grads = observation.gradients
    decoder = task.model.get_output_embeddings()
    logits, h = _captured_forward(task, decoder, input_ids, lengths)
    B, n, V = logits.shape
    real = TextLayout(lengths=lengths).attention_mask().bool().to(h.device)
    # which positions carry a label: their decoder input lies in the span the decoder gradient shows
    head = task.transform_name() if isinstance(task, MaskedLanguageModeling) else None
    if head is not None and f"{head}.weight" in grads:
        z = ta.capture_input(task.model, head, input_ids=input_ids, attention_mask=real.long())
        basis = ta.input_span(observation, [f"{head}.weight"])
        masked = (ta.span_residual(z, basis.to(z.device)) < ta.SPAN_TOL) & real
    else:
        raise ConfigError("masked-position inference needs the gradient of the masked-LM head's first layer")
    probs = torch.softmax(logits.double(), -1)[masked]  # [M, V]
    M = int(masked.sum())
    _, b_name = task.classifier_parameter_names()
    if not b_name or b_name not in grads:
        raise ConfigError("masked-label inference needs the decoder bias gradient")
    counts = ta.label_counts(probs, grads[b_name][:V], M, reduction=observation.reduction)
    if int(counts.sum()) != M:
        notes.append(f"label counts sum to {int(counts.sum())} for {M} masked positions")
    label_pool = [v for v in torch.nonzero(counts).flatten().tolist() for _ in range(int(counts[v]))][:M]
    # first guess from the decoder rows of labels that are not also input tokens (their rows hold
    # only the decoder part: sum_i (p_iv - y_iv) h_i / M)
    w = grads.get(task.classifier_parameter_names()[0])
    score = torch.zeros(M, len(label_pool), dtype=torch.float64)
    if w is not None:
        inputs = set(input_ids[real].tolist())
        pinv = torch.linalg.pinv(h[masked].double())
        scale = M if observation.reduction == "mean" else 1
        for k, v in enumerate(label_pool):
            if v not in inputs:
                a = scale * (w[v].double().to(pinv.device) @ pinv)
                score[:, k] = (probs[:, v] - a).cpu()
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    labels = torch.full((B, n), -100, dtype=torch.long, device=input_ids.device)
    where = torch.nonzero(masked)
    for r, c in zip(rows, cols):
        labels[where[r, 0], where[r, 1]] = label_pool[c]
    return labels


def _swap_labels(task: TextTask, observation: Observation, input_ids: torch.Tensor, lengths: list[int], labels: torch.Tensor, distance: float, *, budget: int = 200) -> tuple[torch.Tensor, float]:
    """Swap labels between masked positions while the gradient distance drops."""
    where = [tuple(p) for p in torch.nonzero(labels >= 0).tolist()]
    evals = 0
    improved = True
    while improved and distance > EXACT_DISTANCE and evals < budget:
        improved = False
        for a, b in itertools.combinations(where, 2):
            if labels[a] == labels[b]:
                continue
            trial = labels.clone()
            trial[a], trial[b] = labels[b], labels[a]
            d = gradient_distance(task, observation, input_ids, lengths, trial)
            evals += 1
            if d < distance:
                labels, distance, improved = trial, d, True
            if evals >= budget:
                break
    return labels, distance


# --- continuous matching (+ discrete refinement) ----------------------------------------------------
def match(
    task: TextTask, observation: Observation, attack: AttackConfig, text: TextAttackSettings | None = None, *,
    seed: int = 0, device: str = "cpu", callbacks: Sequence[StepCallback] = (),
) -> TextRecovery:
    """The engine's continuous search in word-embedding space, nearest-token decoding, then optional
    discrete refinement (`text.discrete_steps`)."""
    started = time.perf_counter()
    text = text or TextAttackSettings()
    text.validate()
    if isinstance(task, CausalLanguageModeling):
        raise ConfigError("the causal-LM task is attacked with attack.method=exact (decoder-exact); continuous matching supports BERT-style encoders")
    observation = _received(task, observation, "match")
    view = attacker_view(task, observation)
    masked_lm = isinstance(view, MaskedLanguageModeling)
    wname = view.word_embedding_name()
    notes: list[str] = []
    leaked: list[int] | None = None
    if (text.restrict_tokens or text.space == "soft-tokens") and wname in observation.gradients:
        leaked = ta.token_leak(observation.gradients[wname], tied=masked_lm and view.tied_decoder()).tokens
    if text.space == "soft-tokens":
        if leaked is None:
            raise ConfigError("attack.space=soft-tokens needs the word-embedding gradient (it mixes the tokens that gradient leaks); it is withheld")
        view = view.with_soft_tokens(leaked)
    recovery = reconstruct(view, observation, attack, seed=seed, device=device, callbacks=callbacks)
    work = _attacker_copy(view, device)
    lengths = list(view.layout.lengths)
    B, n = len(lengths), view.layout.seq_len
    allowed: list[int] | None = leaked if text.restrict_tokens else None
    if text.restrict_tokens and leaked is None:
        notes.append("attack.restrict_tokens ignored: the word-embedding gradient is withheld")
    special = work.special_ids()
    if masked_lm and work.tokenizer.mask_token_id is not None:
        special = special - {int(work.tokenizer.mask_token_id)}  # the client's inputs hold [MASK]; other specials are fixed
    if text.space == "soft-tokens":
        # the boundary tokens are set below; inside a sentence the argmax runs over ordinary tokens only
        ordinary = torch.tensor([t not in special for t in leaked])
        logits = recovery.inputs.masked_fill(~ordinary, -math.inf) if bool(ordinary.any()) else recovery.inputs
        ids = torch.tensor(leaked)[logits.argmax(-1)]
        if text.cover_leaked:
            ids = _cover(logits, leaked, ordinary, lengths, ids, notes)
    else:
        keep = [t for t in (allowed if allowed is not None else range(work.embedding_matrix().shape[0])) if t not in special]
        table = work.embedding_matrix().detach()
        ids = TOKEN_DECODERS.get(text.decoder)(recovery.inputs.to(table), table, torch.tensor(keep, device=table.device))
    cls, sep = work.boundary_ids()
    for b, L in enumerate(lengths):
        if cls is not None:
            ids[b, 0] = cls
        if sep is not None:
            ids[b, L - 1] = sep
    input_ids = ids.to(device)
    if masked_lm:
        labels = _masked_lm_labels(recovery.labels.reshape(B, n, -1), input_ids, work, observation).to(device)
    else:
        labels = torch.tensor(recovery.label_ids, device=device)
    distance = gradient_distance(work, observation, input_ids, lengths, labels)
    if text.discrete_steps > 0:
        pool = allowed if allowed is not None else leaked
        score = DISCRETE_SCORES[text.discrete_score](task, work, observation, lengths, labels, device)
        if score is None:  # the moves lower the gradient distance itself
            input_ids, distance = refine(work, observation, input_ids, lengths, labels, distance, pool=pool, budget=text.discrete_steps, seed=seed)
        else:
            input_ids, _ = refine(work, observation, input_ids, lengths, labels, score(input_ids), pool=pool, budget=text.discrete_steps,
                                  seed=seed, score=score)
            distance = gradient_distance(work, observation, input_ids, lengths, labels)
    status = "exact" if distance < EXACT_DISTANCE else recovery.status
    return TextRecovery(
        input_ids=input_ids.cpu(), lengths=lengths, labels=labels.cpu(),
        token_ids=_fill_labels(input_ids.cpu(), lengths, labels.cpu(), masked_lm),
        distance=distance, seconds=time.perf_counter() - started, status=status, method="match",
        trace=recovery.trace, notes=notes,
    )


def _cover(logits: torch.Tensor, leaked: list[int], ordinary: torch.Tensor, lengths: list[int], ids: torch.Tensor, notes: list[str]) -> torch.Tensor:
    """Argmax decoding constrained to use every ordinary leaked token at least once: each token goes
    to a distinct interior position, chosen to lose the least log-probability against that
    position's argmax (an assignment problem); the other positions keep their argmax.

    Shape:
        logits [B, n, K] over the K leaked tokens; ids [B, n] the argmax decoding.
    """
    from scipy.optimize import linear_sum_assignment

    slots = [(b, j) for b, L in enumerate(lengths) for j in range(1, L - 1)]
    wanted = torch.nonzero(ordinary).flatten()
    if not len(wanted) or len(wanted) > len(slots):
        notes.append(f"cover_leaked skipped: {len(wanted)} leaked tokens for {len(slots)} positions")
        return ids
    logp = torch.log_softmax(logits.double(), dim=-1)
    rows = torch.stack([logp[b, j] for b, j in slots])  # [slots, K]
    regret = rows.max(-1, keepdim=True).values - rows[:, wanted]
    picked, tokens = linear_sum_assignment(regret.nan_to_num(posinf=1e9).numpy())
    out = ids.clone()
    for p, k in zip(picked.tolist(), tokens.tolist()):
        b, j = slots[p]
        out[b, j] = leaked[int(wanted[k])]
    return out


def _masked_lm_labels(soft: torch.Tensor, input_ids: torch.Tensor, task: TextTask, observation: Observation) -> torch.Tensor:
    """Label ids [B, n] (-100: not masked) from the search's soft labels [B, n, V + 1].

    A position counts as masked where its recovered input is [MASK]: the client writes [MASK] at
    most chosen positions, and a soft label alone, one row of V + 1 probabilities, settles late and
    filled whole sentences with stray label tokens (dlg-bert on the shipped sentences: ROUGE-1 0.21).
    The label there is the most probable of the tokens the output bias gradient marks as labels
    (its negative entries: a label's one-hot outweighs the model's probability of it), where that
    gradient is shared; elsewhere the most probable token.
    """
    scores = soft[..., :-1].clone()
    _, bias = task.classifier_parameter_names()
    if bias and bias in observation.gradients:
        marked = observation.gradients[bias].to(scores.device) < 0
        if bool(marked.any()):
            scores[..., ~marked] = -math.inf
    labels = scores.argmax(-1)
    mask_id = task.tokenizer.mask_token_id
    labels[input_ids.to(labels.device) != mask_id] = -100
    return labels


def refine(
    task: TextTask, observation: Observation, input_ids: torch.Tensor, lengths: list[int], labels: torch.Tensor,
    distance: float, *, pool: list[int] | None, budget: int, seed: int = 0, score: Callable[[torch.Tensor], float] | None = None,
) -> tuple[torch.Tensor, float]:
    """LAMP-style discrete steps: token swaps, moves and (from `pool`) replacements inside each
    sentence, each kept only if it lowers `score` (default: the gradient distance, which `distance`
    then is). `budget` counts evaluations."""
    score = score or (lambda ids: gradient_distance(task, observation, ids, lengths, labels))
    gen = torch.Generator().manual_seed(seed)
    fixed = {t for t in task.boundary_ids() if t is not None}
    evals = 0
    while evals < budget and distance > EXACT_DISTANCE:  # both scores put the true sentence near 1e-6 or below
        b = int(torch.randint(len(lengths), (), generator=gen))
        # every position but the sentence's own boundary tokens, which decoding set (a stray special inside may move)
        inner = [j for j in range(lengths[b]) if not ((j == 0 or j == lengths[b] - 1) and int(input_ids[b, j]) in fixed)]
        if len(inner) < 1:
            break
        trial = input_ids.clone()
        kind = int(torch.randint(3, (), generator=gen))
        i = inner[int(torch.randint(len(inner), (), generator=gen))]
        if kind == 0 and len(inner) > 1:  # swap two tokens
            k = inner[int(torch.randint(len(inner), (), generator=gen))]
            trial[b, i], trial[b, k] = input_ids[b, k], input_ids[b, i]
        elif kind == 1 and len(inner) > 1:  # move one token elsewhere
            k = inner[int(torch.randint(len(inner), (), generator=gen))]
            row = [int(t) for t in input_ids[b, inner]]
            tok = row.pop(inner.index(i))
            row.insert(inner.index(k), tok)
            trial[b, inner] = torch.tensor(row, device=trial.device)
        elif pool:  # replace one token by a leaked one
            trial[b, i] = pool[int(torch.randint(len(pool), (), generator=gen))]
        else:
            continue
        evals += 1
        if torch.equal(trial, input_ids):
            continue
        d = score(trial)
        if d < distance:
            input_ids, distance = trial, d
    return input_ids, distance


# (task, the attacker's float64 copy, update, lengths, labels, device) -> a score of token ids, or
# None for refine's own score, the gradient distance (which match has already computed once)
DiscreteScore = Callable[[TextTask, TextTask, Observation, list[int], torch.Tensor, str], Callable[[torch.Tensor], float] | None]


def _span_score(task: TextTask, work: TextTask, observation: Observation, lengths: list[int], labels: torch.Tensor, device: str) -> Callable[[torch.Tensor], float]:
    finder = _span_finder(task, observation, device)
    groups = ta.attention_groups(finder)
    if len(groups) < 2 or not ta.group_available(observation, groups[1]):
        raise ConfigError("attack.discrete_score=span needs the second attention layer's gradient; it is withheld")
    noise = math.sqrt(noise_variance(observation))
    dev = next(finder.model.parameters()).device
    return lambda ids: float(ta.layer_residual(finder, observation, 1, ids.to(dev), lengths, noise_std=noise).mean())


# what a discrete move must lower (TextAttackSettings.discrete_score)
DISCRETE_SCORES: dict[str, DiscreteScore] = {"gradient": lambda *_: None, "span": _span_score}


__all__ = ["TextRecovery", "TextAttackSettings", "attacker_view", "exact", "match", "assemble", "refine", "gradient_distance"]
