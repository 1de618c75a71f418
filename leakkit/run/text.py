"""The runner's text hooks: reading sentences, tokenising client batches, scoring and showing recoveries.

The runner (`leakkit.run.runner`) owns the loop; this module supplies what is particular to text
(masked LM and sentence classification on BERT-style models). As for images, the truth
(sentences, labels) meets the recovery only in `score_text`, through `leakkit.metrics`.
"""

from __future__ import annotations

import difflib
import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from leakkit import metrics
from leakkit.client.observation import Observation
from leakkit.client.victim import defend, observe, per_example_gradients
from leakkit.errors import InputError
from leakkit.run.config import Recipe
from leakkit.run.rundir import RunDir
from leakkit.tasks import MODALITIES, check_labels
from leakkit.tasks.weights import load_weights
from leakkit.tasks.text import CausalLanguageModeling, MaskedLanguageModeling, TextBatch, TextLayout, TextTask, build_text_task
from leakkit.text.attack import TextRecovery
from leakkit.text.data import TextSample, draw_text, read_input

# `leakkit observe` without --input: the sentences after the client's own are the other clients of
# the round (`clients:n`), up to this many batches
OBSERVE_POOL_BATCHES = 64


def build_text(recipe: Recipe, *, seed: int) -> TextTask:
    """The shared model; a newly initialised head gets its weights from the seed, and `task.weights` (a
    state_dict of this model, e.g. a Flower round's global model) replaces them all."""
    spec = recipe.task
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        task = build_text_task(spec.name, model=spec.model, num_classes=spec.num_classes, max_length=spec.max_length, mask_probability=spec.mask_probability)
    if spec.weights:
        load_weights(task.model, spec.weights)
    return task


def load_text_samples(recipe: Recipe, *, input_path: str | None, samples: int | None) -> list[TextSample]:
    """Sentences from --input or the recipe's source, rounded up to whole batches."""
    bs = recipe.data.batch_size
    if samples is not None and samples < 1:
        raise InputError("--samples must be at least 1")
    if input_path is not None:
        pool = read_input(input_path)
        n = samples if samples is not None else len(pool)
        n = bs * math.ceil(n / bs)
        return [pool[i % len(pool)] for i in range(n)]
    n = samples if samples is not None else recipe.data.samples
    return draw_text(recipe.data.source, recipe.data.path, bs * math.ceil(n / bs))


def make_text_batch(task: TextTask, samples: Sequence[TextSample], *, seed: int) -> TextBatch:
    """Tokenise one client batch; masked LM masks with the seed, classification draws missing labels."""
    gen = torch.Generator().manual_seed(seed)
    texts = [s.text for s in samples]
    if isinstance(task, MaskedLanguageModeling):
        return task.make_batch(texts, generator=gen)
    if isinstance(task, CausalLanguageModeling):
        return task.make_batch(texts)  # labels are the sentence itself
    check_labels([s.label for s in samples], task.num_classes)
    labels = [s.label if s.label is not None else int(torch.randint(task.num_classes, (), generator=gen)) for s in samples]
    return task.make_batch(texts, labels)  # type: ignore[attr-defined]


def client_update(
    task: TextTask, batch: TextBatch, recipe: Recipe, *, seed: int = 0, batch_index: int = 0,
    other_batches: Callable[[int], list[TextBatch]] | None = None,
) -> Observation:
    """The client's shared update (gradient, or FedAvg weight difference) after the recipe's
    defense chain, without the gradients of frozen parameters (task.frozen).

    Args:
        task, batch, recipe: the shared model, the client's tokenised batch, the setting.
        seed, batch_index: the client's randomness for noisy or random-mask defenses.
        other_batches: other clients' batches of the round, for `clients:n`.
    """
    frozen = [p for n, p in task.model.named_parameters() if any(f and f in n for f in recipe.task.frozen)]
    saved = [p.requires_grad for p in frozen]
    c = recipe.client

    def update(b: TextBatch) -> Observation:
        return observe(task.with_layout(b.layout), b.input_ids, b.labels, reduction=recipe.data.reduction, model_name=recipe.task.model,
                       local_steps=c.local_steps, local_lr=c.local_lr, local_batch=c.local_batch)

    def per_example() -> list[dict[str, torch.Tensor]]:
        out = []
        for i, L in enumerate(batch.layout.lengths):
            masked = batch.layout.masked[i : i + 1, :L] if batch.layout.masked is not None else None
            labels = batch.labels[i : i + 1, :L] if batch.labels.dim() == 2 else batch.labels[i : i + 1]
            one = TextBatch(batch.input_ids[i : i + 1, :L], TextLayout(lengths=[L], masked=masked), labels)
            out.append(per_example_gradients(task.with_layout(one.layout), one.input_ids, one.labels)[0])
        return out

    try:
        for p in frozen:
            p.requires_grad_(False)  # only for this step, on the simulation's own model
        return defend(
            update(batch), recipe.defense, seed=seed * 7919 + batch_index, per_example=per_example,
            other_clients=(lambda k: [update(b) for b in other_batches(k)]) if other_batches else None,
        )
    finally:
        for p, s in zip(frozen, saved):
            p.requires_grad_(s)


def score_text(task: TextTask, batch: TextBatch, recovery: TextRecovery) -> list[dict[str, Any]]:
    """ROUGE, token accuracy and exact match per sentence, after best-match assignment."""
    refs_ids = [batch.originals[b, :L].tolist() for b, L in enumerate(batch.layout.lengths)]
    refs = [task.decode(r) for r in refs_ids]
    recs = [task.decode(r) for r in recovery.token_ids]
    perm = metrics.best_match_text(refs, recs)
    masked_lm = isinstance(task, MaskedLanguageModeling)
    rows = []
    for i, ref in enumerate(refs):
        j = perm[i]
        r = metrics.rouge(ref, recs[j])
        if isinstance(task, CausalLanguageModeling):
            label_ok = refs_ids[i] == recovery.token_ids[j]  # a causal LM's labels are its inputs
        elif masked_lm:
            truth = batch.labels[i][batch.labels[i] >= 0].tolist()
            got = recovery.labels[j][recovery.labels[j] >= 0].tolist() if j < recovery.labels.shape[0] else []
            label_ok = truth == got
        else:
            label_ok = int(recovery.labels[j]) == int(batch.labels[i])
        rows.append(
            {
                "reference": ref,
                "recovered": recs[j],
                "rouge1": r["rouge1"],
                "rouge2": r["rouge2"],
                "rougeL": r["rougeL"],
                "token_accuracy": metrics.token_accuracy(refs_ids[i], recovery.token_ids[j]),
                "exact": refs_ids[i] == recovery.token_ids[j],
                "label_correct": label_ok,
                "matched_slot": j,
                # the attack's own verdict, from the gradient alone (None: it could not tell)
                "verified": recovery.verified[j] if recovery.verified is not None else None,
            }
        )
    return rows


def summarize_text(rows: list[dict[str, Any]], *, interrupted: bool = False) -> dict[str, Any]:
    """Means of ROUGE and token accuracy, exact-match rate with its 95 % Wilson interval."""
    n = len(rows)
    done = [r for r in rows if r.get("rouge1") is not None]

    def mean(key: str) -> float | None:
        vals = [float(r[key]) for r in done]
        return float(np.mean(vals)) if vals else None

    exact = sum(1 for r in rows if r.get("exact"))
    lo, hi = metrics.wilson_interval(exact, n)
    checked = [r for r in rows if r.get("verified") is not None]
    secs = [r["seconds"] for r in rows if r.get("seconds") is not None]
    return {
        "n": n,
        "rouge1_mean": mean("rouge1"),
        "rouge2_mean": mean("rouge2"),
        "rougeL_mean": mean("rougeL"),
        "token_accuracy_mean": mean("token_accuracy"),
        "exact": exact,
        "exact_rate": exact / n if n else None,
        "exact_ci95": [lo, hi],
        "label_accuracy": (sum(1 for r in rows if r.get("label_correct")) / n) if n else None,
        # sentences the attack itself verified, and of those any that were wrong (none should be)
        "verified": sum(1 for r in checked if r["verified"]) if checked else None,
        "verified_wrong": sum(1 for r in checked if r["verified"] and not r.get("exact")) if checked else None,
        "seconds_median": float(statistics.median(secs)) if secs else None,
        "diverged": sum(1 for r in rows if r.get("status") == "diverged"),
        "interrupted": interrupted,
    }


def text_diff(rows: list[dict[str, Any]]) -> str:
    """Reference vs recovery, word by word: [-missing-] and {+extra+} marks."""
    out = []
    for r in rows:
        a, b = r["reference"].split(), (r["recovered"] or "").split()
        marks = []
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
            if op == "equal":
                marks += a[i1:i2]
            else:
                if i2 > i1:
                    marks.append("[-" + " ".join(a[i1:i2]) + "-]")
                if j2 > j1:
                    marks.append("{+" + " ".join(b[j1:j2]) + "+}")
        rouge1 = "-" if r.get("rouge1") is None else f"{r['rouge1']:.2f}"
        out.append(f"#{r['index']} ROUGE-1 {rouge1}{'  exact' if r.get('exact') else ''}\n  reference: {r['reference']}\n  recovered: {r['recovered']}\n  diff:      {' '.join(marks)}\n")
    return "\n".join(out)




@dataclass
class ClientSentences:
    """One client's sentences and their tokenised batch."""

    samples: list[TextSample]
    tokens: TextBatch


class _Transcripts:
    """What a text run shows: diff.txt (reference vs recovery) and recovered.txt."""

    def add(self, task: TextTask, batch: ClientSentences, recovery: TextRecovery, scored: list[dict[str, Any]]) -> None:
        pass  # everything shown is in the scored rows

    def restore(self, run: RunDir, task: TextTask, batches: Sequence[ClientSentences], rows: list[dict[str, Any]]) -> None:
        pass  # diff.txt and recovered.txt are rewritten from the rows

    def write(self, run: RunDir, rows: list[dict[str, Any]]) -> None:
        run.write_text("diff.txt", text_diff(rows))
        run.write_text("recovered.txt", "".join(f"{r['recovered'] or ''}\n" for r in rows))


class TextRun:
    """The text modality's hooks for `leakkit.run.runner` (see its `ModalityRun` protocol)."""

    modality = MODALITIES["text"]

    def build_task(self, recipe: Recipe, *, seed: int, device: str = "cpu") -> TextTask:
        task = build_text(recipe, seed=seed)
        if device != "cpu":
            task.model.to(device)
        return task

    def load_samples(self, recipe: Recipe, *, input_path: str | None, samples: int | None, seed: int) -> list[TextSample]:
        return load_text_samples(recipe, input_path=input_path, samples=samples)

    def count_input(self, path: str | None) -> int:
        return len(read_input(path))

    def make_batches(self, task: TextTask, recipe: Recipe, samples: Sequence[TextSample], *, seed: int) -> list[ClientSentences]:
        # tokenise everything first: a bad sentence fails before any attack runs
        bs = recipe.data.batch_size
        chunks = [list(samples[k : k + bs]) for k in range(0, len(samples), bs)]
        return [ClientSentences(chunk, make_text_batch(task, chunk, seed=seed + b)) for b, chunk in enumerate(chunks)]

    def client_update(self, task: TextTask, recipe: Recipe, batches: Sequence[ClientSentences], index: int, *, seed: int) -> Observation:
        # with `clients:n`, the other clients hold the batches that follow in the drawn data (cyclically)
        others = lambda k: [batches[(index + j) % len(batches)].tokens for j in range(1, k + 1)]  # noqa: E731
        return client_update(task, batches[index].tokens, recipe, seed=seed, batch_index=index, other_batches=others)

    def observe(self, task: TextTask, recipe: Recipe, *, input_path: str | None, seed: int) -> Observation:
        bs = recipe.data.batch_size
        pool = load_text_samples(recipe, input_path=input_path, samples=None if input_path else bs * OBSERVE_POOL_BATCHES)
        count = -(-len(pool) // bs)

        def batch(j: int) -> TextBatch:  # tokenised only when used: other clients exist only for `clients:n`
            k = (j % count) * bs
            return make_text_batch(task, pool[k : k + bs], seed=seed + j % count)

        return client_update(task, batch(0), recipe, seed=seed, other_batches=lambda n: [batch(j) for j in range(1, n + 1)])

    def score(self, task: TextTask, batch: ClientSentences, recovery: TextRecovery, recipe: Recipe) -> list[dict[str, Any]]:
        rows = score_text(task, batch.tokens, recovery)
        for row, sample in zip(rows, batch.samples):
            row["name"] = sample.name
        return rows

    def failed(self, task: TextTask, batch: ClientSentences) -> list[dict[str, Any]]:
        tokens = batch.tokens
        return [
            {"reference": task.decode(tokens.originals[i, :L].tolist()), "recovered": None, "rouge1": None, "rouge2": None,
             "rougeL": None, "token_accuracy": None, "exact": False, "label_correct": False, "matched_slot": None,
             "verified": None, "name": batch.samples[i].name}
            for i, L in enumerate(tokens.layout.lengths)
        ]

    def summarize(self, rows: list[dict[str, Any]], recipe: Recipe, *, interrupted: bool) -> dict[str, Any]:
        return summarize_text(rows, interrupted=interrupted)

    def artifacts(self) -> _Transcripts:
        return _Transcripts()

    def notes(self, task: TextTask) -> dict[str, Any]:
        return {"notes": task.notes}

    def determined(self, task: TextTask, batch_size: int) -> bool:
        return True  # no text recipe has [underdetermined] settings: the text attacks size their own searches

    def determinacy(self, task: TextTask, observation: Observation) -> dict[str, Any] | None:
        return None  # the text attacks report their own span checks

    def success_probe(self, task: TextTask, batch: ClientSentences, recipe: Recipe) -> None:
        return None  # candidates are embeddings: scoring them needs a decode per step; the closed-form time is used

    def truth(self, batch: ClientSentences) -> dict[str, bytes]:
        rows = [{"name": t.name, "text": t.text, "label": t.label} for t in batch.samples]
        return {"json": json.dumps({"sentences": rows, "input_ids": batch.tokens.input_ids.tolist()}, indent=1).encode()}

    def save_recovery(self, task: TextTask, recovery: TextRecovery, run: RunDir) -> dict[str, Any]:
        sentences = [task.decode(r) for r in recovery.token_ids]
        run.write_text("recovered.txt", "".join(f"{s}\n" for s in sentences))
        return {
            "sentences": sentences,
            "labels": recovery.labels.tolist(),
            "gradient_distance": recovery.distance,
            "status": recovery.status,
            "seconds": recovery.seconds,
            "notes": recovery.notes,
        }


TEXT = TextRun()
