"""Run a text recipe end to end: the client's masked-LM or classification step, the attack, the scores.

As in `experiment`, the truth (sentences, labels) stays on the simulation side and meets the
recovery only in `metrics`.
"""

from __future__ import annotations

import difflib
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from leakkit import metrics
from leakkit.run.config import Recipe
from leakkit.engine.matching import StepCallback
from leakkit.errors import AttackDiverged, InputError
from leakkit.run.runner import Interrupted, check_device
from leakkit.client.observation import Observation
from leakkit.run.rundir import RunDir, provenance
from leakkit.tasks.text import MaskedLanguageModeling, TextBatch, TextLayout, TextTask, build_text_task
from leakkit.text.attack import TextRecovery, recover_text
from leakkit.text.data import TextSample, draw_text, read_input
from leakkit.client.victim import defend, observe, per_example_gradients

TEXT_TASKS = ("masked-lm", "sequence-classification")


def build_text(recipe: Recipe, *, seed: int) -> TextTask:
    """The shared model; a newly initialised head gets its weights from the seed."""
    spec = recipe.task
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_text_task(spec.name, model=spec.model, num_classes=spec.num_classes, max_length=spec.max_length, mask_probability=spec.mask_probability)


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
    labels = [s.label % task.num_classes if s.label is not None else int(torch.randint(task.num_classes, (), generator=gen)) for s in samples]
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
        if masked_lm:
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


def run_text_recipe(
    recipe: Recipe,
    *,
    out: str | Path,
    input_path: str | None = None,
    samples: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: Any = None,
    callbacks: Sequence[StepCallback] = (),
    on_batch: Callable[[int, list[dict[str, Any]]], None] | None = None,
    only_batches: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Simulate, attack and score a text recipe; write the run directory; return the metrics dict.

    The run directory gets `config.json`, `metrics.json`, `trace.jsonl`, `diff.txt` (reference vs
    recovery) and `recovered.txt`. Ctrl-C saves every finished sentence (exit 130).
    only_batches attacks just those client batches (an audit's cells). With `clients:n`, the
    other clients hold the batches that follow in the drawn data (cyclically).
    """
    check_device(device)
    recipe.validate()
    pool = load_text_samples(recipe, input_path=input_path, samples=samples)
    task = build_text(recipe, seed=seed)
    if device != "cpu":
        task.model.to(device)
    bs = recipe.data.batch_size
    batches = [pool[k : k + bs] for k in range(0, len(pool), bs)]
    # tokenise everything first: a bad sentence fails before any attack runs
    tokenised = [make_text_batch(task, chunk, seed=seed + b) for b, chunk in enumerate(batches)]
    run = RunDir(out)
    prov = provenance(seed=seed, device=device)
    run.write_config({"recipe": recipe.to_dict(), "input": input_path, "samples": len(pool), "seed": seed, "device": device, "notes": task.notes})
    rows: list[dict[str, Any]] = []
    step_callbacks = list(callbacks) + ([progress] if progress is not None else [])
    interrupted = False
    started = time.perf_counter()

    def save() -> dict[str, Any]:
        prov["wall_seconds"] = round(time.perf_counter() - started, 3)
        result = {"recipe": recipe.name, "summary": summarize_text(rows, interrupted=interrupted), "samples": rows, "provenance": prov, "notes": task.notes}
        run.write_metrics(result)
        run.write_text("diff.txt", text_diff(rows))
        run.write_text("recovered.txt", "".join(f"{r['recovered'] or ''}\n" for r in rows))
        return result

    try:
        for b, batch in enumerate(tokenised):
            if only_batches is not None and b not in only_batches:
                continue
            if progress is not None:
                progress.start(f"batch {b + 1}/{len(tokenised)}", recipe.attack.steps if recipe.attack.method == "match" else 1)
            others = (lambda k, b=b: [tokenised[(b + j) % len(tokenised)] for j in range(1, k + 1)])
            observation = client_update(task, batch, recipe, seed=seed, batch_index=b, other_batches=others)
            try:
                recovery: TextRecovery | None = recover_text(task, observation, recipe.attack, seed=seed + b, device=device, callbacks=step_callbacks)
            except (AttackDiverged, InputError) as e:
                # a defended update can defeat the analytic steps (e.g. noise hides the order): a failed recovery
                warnings.warn(f"batch {b + 1}: attack failed: {e}", stacklevel=2)
                recovery = None
            if recovery is None:
                scored = [{"reference": task.decode(batch.originals[i, :L].tolist()), "recovered": None, "rouge1": None, "rouge2": None, "rougeL": None,
                           "token_accuracy": None, "exact": False, "label_correct": False, "matched_slot": None} for i, L in enumerate(batch.layout.lengths)]
            else:
                scored = score_text(task, batch, recovery)
                run.append_trace({"batch": b, **t} for t in recovery.trace)
                for note in recovery.notes:
                    warnings.warn(f"batch {b + 1}: {note}", stacklevel=2)
            for i, r in enumerate(scored):
                r.update(
                    {
                        "index": b * bs + i,
                        "batch": b,
                        "name": batches[b][i].name,
                        "seconds": recovery.seconds if recovery else None,
                        "gradient_distance": recovery.distance if recovery else None,
                        "status": recovery.status if recovery else "diverged",
                        "method": recipe.attack.method,
                    }
                )
                rows.append(r)
            save()
            if on_batch is not None:
                on_batch(b, scored)
    except KeyboardInterrupt:
        interrupted = True
        save()
        raise Interrupted(f"interrupted after {len(rows)} of {len(pool)} sentences; results saved in {run.path}") from None
    return save()


def attack_text(recipe: Recipe, observation: Observation, *, out: str | Path, seed: int = 0, device: str = "cpu", progress: Any = None) -> dict[str, Any]:
    """The attacker's side alone for text: sentences from a saved update (no truth, no scores)."""
    check_device(device)
    task = build_text(recipe, seed=seed)
    run = RunDir(out)
    run.write_config({"recipe": recipe.to_dict(), "seed": seed, "device": device, "observation": observation.metadata()})
    if progress is not None:
        progress.start("attack", recipe.attack.steps if recipe.attack.method == "match" else 1)
    recovery = recover_text(task, observation, recipe.attack, seed=seed, device=device, callbacks=[progress] if progress else [])
    run.append_trace(recovery.trace)
    sentences = [task.decode(r) for r in recovery.token_ids]
    run.write_text("recovered.txt", "".join(f"{s}\n" for s in sentences))
    result = {
        "recipe": recipe.name,
        "recovery": {
            "sentences": sentences,
            "labels": recovery.labels.tolist(),
            "gradient_distance": recovery.distance,
            "status": recovery.status,
            "seconds": recovery.seconds,
            "notes": recovery.notes,
        },
        "provenance": provenance(seed=seed, device=device),
    }
    run.write_metrics(result)
    return result
