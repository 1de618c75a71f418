"""Run a recipe end to end: simulate the client, attack its gradient, score against the truth.

This is the only module where the private data (simulation side) and the recovery meet, and it
passes the truth to nothing but `metrics`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from leakkit import metrics
from leakkit.run.config import Recipe
from leakkit.vision.data import SOURCES, Sample, draw, resize
from leakkit.vision.pictures import grid, to_uint8_images
from leakkit.engine.matching import Recovery, StepCallback, reconstruct
from leakkit.errors import AttackDiverged, InputError, LeakkitError
from leakkit.client.observation import Observation
from leakkit.registry import Registry
from leakkit.run.rundir import RunDir, provenance
from leakkit.tasks import TASKS, Task
from leakkit.client.victim import defend, observe, per_example_gradients


class Interrupted(LeakkitError):
    """The user stopped the run; what was finished has been saved."""

    exit_code = 130


@dataclass
class Batch:
    """Private examples of one client step, as the simulation holds them."""

    samples: list[Sample]
    pixels: torch.Tensor  # [B, C, H, W] in [0, 1]
    labels: torch.Tensor  # [B] class ids


# How recoveries of each task are scored against the truth: task name -> scorer.
Scorer = Callable[[Task, Batch, Recovery, Recipe], list[dict[str, Any]]]
SCORERS: Registry[Scorer] = Registry("scorer")


@SCORERS.register("image-classification", description="PSNR, SSIM, MSE and labels after best-match assignment")
def score_images(task: Task, batch: Batch, recovery: Recovery, recipe: Recipe) -> list[dict[str, Any]]:
    recovered = task.to_pixels(recovery.inputs.double()).float().numpy()
    truth = batch.pixels.numpy()
    perm = metrics.best_match(truth, recovered)
    ids = recovery.label_ids
    rows = []
    for i, s in enumerate(batch.samples):
        j = perm[i]
        rows.append(
            {
                "name": s.name,
                "label": int(batch.labels[i]),
                "recovered_label": ids[j],
                "label_correct": ids[j] == int(batch.labels[i]),
                "psnr": metrics.psnr(truth[i], recovered[j]),
                "ssim": metrics.ssim(truth[i], recovered[j]),
                "mse": metrics.mse(truth[i], recovered[j]),
                "matched_slot": j,
            }
        )
    return rows


def build_task(recipe: Recipe, *, seed: int) -> Task:
    """The shared model the client trains, with weights fixed by the seed."""
    spec = recipe.task
    options = {
        "model": spec.model,
        "num_classes": spec.num_classes,
        "image_size": spec.image_size,
        "channels": spec.channels,
        "mean": spec.mean or None,
        "std": spec.std or None,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TASKS.get(spec.name)(**options)


def make_batches(recipe: Recipe, samples: Sequence[Sample], *, seed: int) -> list[Batch]:
    """Resize images to the task's input, attach labels, and group them into client batches.

    Images without a label get one drawn uniformly over the classes with the seed (the embedded
    photos carry no classes the model knows, as in the DLG paper's untrained-model setting).
    """
    spec, bs = recipe.task, recipe.data.batch_size
    rng = np.random.default_rng(seed + 7)
    pixels = np.stack([resize(s.image, spec.image_size, spec.channels) for s in samples])
    labels = [s.label % spec.num_classes if s.label is not None else int(rng.integers(spec.num_classes)) for s in samples]
    out = []
    for start in range(0, len(samples), bs):
        out.append(
            Batch(
                samples=list(samples[start : start + bs]),
                pixels=torch.from_numpy(pixels[start : start + bs]),
                labels=torch.tensor(labels[start : start + bs]),
            )
        )
    return out


def client_update(task: Task, recipe: Recipe, batch: Batch, *, seed: int, batch_index: int = 0) -> Observation:
    """What the server receives from the client holding `batch`: its FedSGD gradient or FedAvg
    weight difference (`[client]`), after the recipe's defense chain.

    Defenses that aggregate over clients (`clients:n`) average with clients whose images are a
    different seeded draw from the recipe's data source.
    """
    c = recipe.client
    inputs = task.from_pixels(batch.pixels.double()).float()

    def update(x: torch.Tensor, y: torch.Tensor) -> Observation:
        return observe(task, x, y, reduction=recipe.data.reduction, model_name=recipe.task.model,
                       local_steps=c.local_steps, local_lr=c.local_lr, local_batch=c.local_batch)

    def other_clients(k: int) -> list[Observation]:
        bs = len(batch.samples)
        others = draw(recipe.data.source, recipe.data.path, bs * k, seed=seed + 1 + 1000 * batch_index)
        groups = make_batches(recipe, others, seed=seed + 1 + batch_index)
        return [update(task.from_pixels(g.pixels.double()).float(), g.labels) for g in groups[:k]]

    return defend(
        update(inputs, batch.labels), recipe.defense, seed=seed * 7919 + batch_index,
        per_example=lambda: per_example_gradients(task, inputs, batch.labels), other_clients=other_clients,
    )


def load_samples(recipe: Recipe, *, input_path: str | None, samples: int | None, seed: int) -> list[Sample]:
    """Private images: from --input (file or folder) or from the recipe's data source.

    The count is rounded up to whole batches (every client step has data.batch_size images).
    """
    bs = recipe.data.batch_size
    if samples is not None and samples < 1:
        raise InputError("--samples must be at least 1")
    if input_path is not None:
        pool = SOURCES.get("files")(input_path)
        n = samples if samples is not None else len(pool)
        n = bs * math.ceil(n / bs)
        return [pool[i % len(pool)] for i in range(n)]
    n = samples if samples is not None else recipe.data.samples
    return draw(recipe.data.source, recipe.data.path, bs * math.ceil(n / bs), seed=seed)


def check_device(device: str) -> str:
    """Validate a device string; InputError if CUDA is asked for but absent."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but CUDA is not available on this machine")
    return device


def summarize(rows: list[dict[str, Any]], recipe: Recipe, *, interrupted: bool = False) -> dict[str, Any]:
    """The run's headline numbers: success rate with a 95 % Wilson interval, medians."""
    threshold = recipe.metrics.success_psnr
    n = len(rows)
    ok = sum(1 for r in rows if r["psnr"] is not None and r["psnr"] >= threshold)
    psnrs = [r["psnr"] for r in rows if r["psnr"] is not None]
    lo, hi = metrics.wilson_interval(ok, n)

    def med(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
        return float(statistics.median(vals)) if vals else None

    return {
        "n": n,
        "success_threshold_psnr": threshold,
        "successes": ok,
        "success_rate": ok / n if n else None,
        "success_ci95": [lo, hi],
        "psnr_median": float(statistics.median(psnrs)) if psnrs else None,
        "ssim_median": med("ssim"),
        "label_accuracy": (sum(1 for r in rows if r["label_correct"]) / n) if n else None,
        "seconds_median": med("seconds"),
        "diverged": sum(1 for r in rows if r["status"] == "diverged"),
        "interrupted": interrupted,
    }


def run_image_recipe(
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
    """Simulate, attack and score; write the run directory; return the metrics dict.

    Args:
        recipe: a resolved recipe.
        out: run directory (created).
        input_path: image file or folder to use instead of the recipe's data.
        samples: number of images (rounded up to whole batches).
        seed: fixes model weights, data draw, labels and attack initialisation.
        device: "cpu" or "cuda".
        progress: an object with `start(label, total)` that is also a step callback, or None.
        callbacks: extra engine step callbacks.
        on_batch: called with (batch index, scored rows) after each batch.
        only_batches: attack only these client batches of the drawn data (an audit's cells).
    Raises:
        Interrupted: on Ctrl-C, after saving everything finished so far.
    """
    check_device(device)
    recipe.validate()
    task = build_task(recipe, seed=seed)
    scorer = SCORERS.get(recipe.task.name)
    pool = load_samples(recipe, input_path=input_path, samples=samples, seed=seed)
    batches = make_batches(recipe, pool, seed=seed)
    run = RunDir(out)
    prov = provenance(seed=seed, device=device)
    run.write_config({"recipe": recipe.to_dict(), "input": input_path, "samples": len(pool), "seed": seed, "device": device})

    rows: list[dict[str, Any]] = []
    pictures: list[tuple[np.ndarray, np.ndarray]] = []
    recovered_all: list[torch.Tensor] = []
    step_callbacks = list(callbacks) + ([progress] if progress is not None else [])
    interrupted = False
    started = time.perf_counter()

    def save() -> dict[str, Any]:
        prov["wall_seconds"] = round(time.perf_counter() - started, 3)
        result = {"recipe": recipe.name, "summary": summarize(rows, recipe, interrupted=interrupted), "samples": rows, "provenance": prov}
        run.write_metrics(result)
        if pictures:
            cols = 16
            lines: list[list[np.ndarray]] = []
            for k in range(0, len(pictures), cols):
                chunk = pictures[k : k + cols]
                lines += [[t for t, _ in chunk], [r for _, r in chunk]]
            run.save_image("grid.png", grid(lines))
        if recovered_all:
            run.save_tensors("recovered.safetensors", {"inputs": torch.cat(recovered_all)})
        return result

    try:
        for b, batch in enumerate(batches):
            if only_batches is not None and b not in only_batches:
                continue
            if progress is not None:
                progress.start(f"batch {b + 1}/{len(batches)}", recipe.attack.steps)
            observation = client_update(task, recipe, batch, seed=seed, batch_index=b)
            try:
                recovery = reconstruct(task, observation, recipe.attack, seed=seed + b, device=device, callbacks=step_callbacks)
            except AttackDiverged:
                scored = [_diverged_row(s, int(y)) for s, y in zip(batch.samples, batch.labels)]
                recovery = None
            else:
                scored = scorer(task, batch, recovery, recipe)
                run.append_trace({"batch": b, **t} for t in recovery.trace)
                recovered_pixels = task.to_pixels(recovery.inputs.double()).float()
                recovered_all.append(recovery.inputs)
                truth_imgs, rec_imgs = to_uint8_images(batch.pixels), to_uint8_images(recovered_pixels)
                pictures += [(truth_imgs[i], rec_imgs[r["matched_slot"]]) for i, r in enumerate(scored)]
            for k, r in enumerate(scored):
                r.update(
                    {
                        "index": b * recipe.data.batch_size + k,
                        "batch": b,
                        "seconds": recovery.seconds if recovery else None,
                        "gradient_distance": recovery.distance if recovery else None,
                        "status": recovery.status if recovery else "diverged",
                        "restart": recovery.restart if recovery else None,
                    }
                )
                rows.append(r)
            save()
            if on_batch is not None:
                on_batch(b, scored)
    except KeyboardInterrupt:
        interrupted = True
        save()
        raise Interrupted(f"interrupted after {len(rows)} of {len(pool)} images; results saved in {run.path}") from None
    return save()


def _diverged_row(sample: Sample, label: int) -> dict[str, Any]:
    return {
        "name": sample.name, "label": label, "recovered_label": None, "label_correct": False,
        "psnr": None, "ssim": None, "mse": None, "matched_slot": None,
    }


def attack_image(
    recipe: Recipe,
    observation: Observation,
    *,
    out: str | Path,
    seed: int = 0,
    device: str = "cpu",
    progress: Any = None,
) -> dict[str, Any]:
    """The attacker's side alone: recover inputs from a saved observation (no truth, no scores)."""
    check_device(device)
    task = build_task(recipe, seed=seed)
    run = RunDir(out)
    run.write_config({"recipe": recipe.to_dict(), "seed": seed, "device": device, "observation": observation.metadata()})
    if progress is not None:
        progress.start("attack", recipe.attack.steps)
    recovery = reconstruct(task, observation, recipe.attack, seed=seed, device=device, callbacks=[progress] if progress else [])
    run.append_trace(recovery.trace)
    pixels = task.to_pixels(recovery.inputs.double()).float()
    images = to_uint8_images(pixels)
    run.save_image("grid.png", grid([images]))
    run.save_tensors("recovered.safetensors", {"inputs": recovery.inputs, "labels": recovery.labels})
    result = {
        "recipe": recipe.name,
        "recovery": {
            "labels": recovery.label_ids,
            "gradient_distance": recovery.distance,
            "status": recovery.status,
            "restart_status": recovery.restart_status,
            "seconds": recovery.seconds,
        },
        "provenance": provenance(seed=seed, device=device),
    }
    run.write_metrics(result)
    return result


@dataclass
class Runner:
    """How one kind of task runs end to end (`run`) and attacker-only (`attack`)."""

    run: Callable[..., dict[str, Any]]
    attack: Callable[..., dict[str, Any]]


def _text(attr: str) -> Callable[..., dict[str, Any]]:
    # text runs import transformers models; deferred so image runs never pay for it
    def call(*args: Any, **kwargs: Any) -> dict[str, Any]:
        from leakkit.run import text as text_experiment

        return getattr(text_experiment, attr)(*args, **kwargs)

    return call


RUNNERS: Registry[Runner] = Registry("task")
RUNNERS.register("image-classification")(Runner(run_image_recipe, attack_image))
for _name in ("masked-lm", "sequence-classification"):
    RUNNERS.register(_name)(Runner(_text("run_text_recipe"), _text("attack_text")))


def run_recipe(recipe: Recipe, **options: Any) -> dict[str, Any]:
    """Simulate, attack and score any recipe (see `run_image_recipe` / `text_experiment.run_text_recipe`)."""
    return RUNNERS.get(recipe.task.name).run(recipe, **options)


def attack_only(recipe: Recipe, observation: Observation, **options: Any) -> dict[str, Any]:
    """The attacker's side alone for any recipe: recover from a saved observation."""
    return RUNNERS.get(recipe.task.name).attack(recipe, observation, **options)
