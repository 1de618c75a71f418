"""The runner's image hooks: reading images, building client batches, scoring and showing recoveries.

The runner (`leakkit.run.runner`) owns the loop; this module supplies what is particular to images.
The truth (pixels, labels) meets a recovery only in `score`, through `leakkit.metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from leakkit import metrics
from leakkit.client.observation import Observation
from leakkit.client.dpsgd import PrivateBatch
from leakkit.client.victim import defend, observe, per_example_gradients
from leakkit.engine.matching import Recovery
from leakkit.errors import InputError
from leakkit.run.config import Recipe
from leakkit.run.rundir import RunDir
from leakkit.tasks import MODALITIES, TASKS, Task, check_labels
from leakkit.tasks.weights import load_weights
from leakkit.vision.data import SOURCES, Sample, draw, resize
from leakkit.vision.pictures import grid, to_uint8_images

GRID_COLUMNS = 16


@dataclass
class Batch:
    """Private examples of one client step, as the simulation holds them."""

    samples: list[Sample]
    pixels: torch.Tensor  # [B, C, H, W] in [0, 1]
    labels: torch.Tensor  # [B] class ids


def build_task(recipe: Recipe, *, seed: int, device: str = "cpu") -> Task:
    """The shared model the client trains: weights from `task.weights` when given, else fixed by the seed
    (the engine moves its own copy to `device`)."""
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
        task = TASKS.get(spec.name)(**options)
    if spec.weights:  # trained weights replace the seeded ones
        load_weights(task.model, spec.weights)
    return task


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


def make_batches(recipe: Recipe, samples: Sequence[Sample], *, seed: int) -> list[Batch]:
    """Resize images to the task's input, attach labels, and group them into client batches.

    Images without a label get one drawn uniformly over the classes with the seed (the embedded
    photos carry no classes the model knows, as in the DLG paper's untrained-model setting).
    """
    spec, bs = recipe.task, recipe.data.batch_size
    rng = np.random.default_rng(seed + 7)
    pixels = np.stack([resize(s.image, spec.image_size, spec.channels) for s in samples])
    check_labels([s.label for s in samples], spec.num_classes)
    labels = [s.label if s.label is not None else int(rng.integers(spec.num_classes)) for s in samples]
    return [
        Batch(
            samples=list(samples[start : start + bs]),
            pixels=torch.from_numpy(pixels[start : start + bs]),
            labels=torch.tensor(labels[start : start + bs]),
        )
        for start in range(0, len(samples), bs)
    ]


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
        batch=PrivateBatch(task, inputs, batch.labels, recipe.data.reduction),
    )


def score_images(task: Task, batch: Batch, recovery: Recovery, recipe: Recipe) -> list[dict[str, Any]]:
    """PSNR, SSIM, MSE and labels per image, after best-match assignment."""
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
                # with the flat guess's scores: a tier counts only where the recovery beats them
                **metrics.score_image(truth[i], recovered[j], recipe.metrics.tiers()),
                "matched_slot": j,
            }
        )
    return rows


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
        "tier_thresholds": dataclasses.asdict(recipe.metrics.tiers()),
        **{k: v for k, v in metrics.tier_rates(rows, recipe.metrics.tiers()).items() if k != "n"},
    }


class _Pictures:
    """Truth/recovery image pairs and recovered inputs gathered over a run: grid.png, recovered.safetensors."""

    def __init__(self) -> None:
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self.recovered: list[torch.Tensor] = []
        self.pixels: list[torch.Tensor] = []
        self.captions: list[str] = []

    def add(self, task: Task, batch: Batch, recovery: Recovery, scored: list[dict[str, Any]]) -> None:
        recovered_pixels = task.to_pixels(recovery.inputs.double()).float()
        self.recovered.append(recovery.inputs)
        self.pixels.append(recovered_pixels)
        truth, rec = to_uint8_images(batch.pixels), to_uint8_images(recovered_pixels)
        self.pairs += [(truth[i], rec[r["matched_slot"]]) for i, r in enumerate(scored)]
        self.captions += [_caption(r) for r in scored]

    def restore(self, run: RunDir, task: Task, batches: Sequence[Batch], rows: list[dict[str, Any]]) -> None:
        saved = run.path / "recovered.safetensors"
        if not rows or not saved.is_file():
            return
        from safetensors.torch import load_file

        inputs, start = load_file(str(saved))["inputs"], 0
        for b in dict.fromkeys(r["batch"] for r in rows):  # finished batches, in the order they were saved
            scored = [r for r in rows if r["batch"] == b]
            if scored[0].get("matched_slot") is None:
                continue  # a failed batch saved no recovery
            n = len(batches[b].samples)
            chunk = inputs[start : start + n]
            start += n
            self.recovered.append(chunk)
            self.pixels.append(task.to_pixels(chunk.double()).float())
            truth, rec = to_uint8_images(batches[b].pixels), to_uint8_images(self.pixels[-1])
            self.pairs += [(truth[i], rec[r["matched_slot"]]) for i, r in enumerate(scored)]
            self.captions += [_caption(r) for r in scored]

    def write(self, run: RunDir, rows: list[dict[str, Any]]) -> None:
        if self.pairs:
            lines: list[list[np.ndarray]] = []
            captions: list[list[str]] = []
            for k in range(0, len(self.pairs), GRID_COLUMNS):
                chunk = self.pairs[k : k + GRID_COLUMNS]
                lines += [[t for t, _ in chunk], [r for _, r in chunk]]
                captions += [["truth"] * len(chunk), self.captions[k : k + GRID_COLUMNS]]
            run.save_image("grid.png", grid(lines, captions=captions))
        if self.recovered:
            # pixels beside the model inputs: a user scores them against their own data without our normalisation
            run.save_tensors("recovered.safetensors", {"inputs": torch.cat(self.recovered), "pixels": torch.cat(self.pixels)})


def _caption(row: dict[str, Any]) -> str:
    """What grid.png writes under a recovered image: its PSNR and SSIM against the truth."""
    return "failed" if row.get("psnr") is None else f"{row['psnr']:.1f} dB {row.get('tier', '')}"


class VisionRun:
    """The image modality's hooks for `leakkit.run.runner` (see its `ModalityRun` protocol)."""

    modality = MODALITIES["image"]

    def build_task(self, recipe: Recipe, *, seed: int, device: str = "cpu") -> Task:
        return build_task(recipe, seed=seed, device=device)

    def load_samples(self, recipe: Recipe, *, input_path: str | None, samples: int | None, seed: int) -> list[Sample]:
        return load_samples(recipe, input_path=input_path, samples=samples, seed=seed)

    def count_input(self, path: str | None) -> int:
        return len(SOURCES.get("files")(path))

    def make_batches(self, task: Task, recipe: Recipe, samples: Sequence[Sample], *, seed: int) -> list[Batch]:
        return make_batches(recipe, samples, seed=seed)

    def client_update(self, task: Task, recipe: Recipe, batches: Sequence[Batch], index: int, *, seed: int) -> Observation:
        return client_update(task, recipe, batches[index], seed=seed, batch_index=index)

    def observe(self, task: Task, recipe: Recipe, *, input_path: str | None, seed: int) -> Observation:
        pool = load_samples(recipe, input_path=input_path, samples=recipe.data.batch_size, seed=seed)
        return client_update(task, recipe, make_batches(recipe, pool, seed=seed)[0], seed=seed)

    def score(self, task: Task, batch: Batch, recovery: Recovery, recipe: Recipe) -> list[dict[str, Any]]:
        return score_images(task, batch, recovery, recipe)

    def failed(self, task: Task, batch: Batch) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "label": int(y), "recovered_label": None, "label_correct": False,
             "psnr": None, "ssim": None, "mse": None, "matched_slot": None, "tier": "none"}
            for s, y in zip(batch.samples, batch.labels)
        ]

    def summarize(self, rows: list[dict[str, Any]], recipe: Recipe, *, interrupted: bool) -> dict[str, Any]:
        return summarize(rows, recipe, interrupted=interrupted)

    def artifacts(self) -> _Pictures:
        return _Pictures()

    def notes(self, task: Task) -> dict[str, Any]:
        return {}

    def determined(self, task: Task, batch_size: int) -> bool:
        from leakkit.vision.determinacy import determined_in_general

        return determined_in_general(task, batch_size)

    def determinacy(self, task: Task, observation: Observation) -> dict[str, Any] | None:
        from leakkit.vision import determinacy

        if observation.extra.get("fedavg"):
            return None  # a weight difference after several local steps is not one gradient: the count does not apply
        counts = determinacy.count(task.model, observation.gradients, task.input_shape, observation.batch_size)
        out: dict[str, Any] = {"batch_size": observation.batch_size, "layers": [c.as_dict() for c in counts],
                               "verdict": determinacy.verdict(counts, observation.batch_size)}
        if observation.extra.get("defenses"):
            out["caveat"] = "a defended update: noise makes every gradient full rank, so these counts are upper bounds"
        return out

    def success_probe(self, task: Task, batch: Batch, recipe: Recipe) -> Callable[[torch.Tensor], list[bool]]:
        truth, threshold = batch.pixels.numpy(), recipe.metrics.success_psnr

        def probe(inputs: torch.Tensor) -> list[bool]:
            recovered = task.to_pixels(inputs.detach().cpu().double()).float().numpy()
            perm = metrics.best_match(truth, recovered)
            return [metrics.psnr(truth[i], recovered[perm[i]]) >= threshold for i in range(len(truth))]

        return probe

    def truth(self, batch: Batch) -> dict[str, bytes]:
        from safetensors.torch import save

        names = json.dumps([s.name for s in batch.samples])
        return {"safetensors": save({"pixels": batch.pixels.contiguous(), "labels": batch.labels.contiguous()}, metadata={"names": names})}

    def save_recovery(self, task: Task, recovery: Recovery, run: RunDir) -> dict[str, Any]:
        pixels = task.to_pixels(recovery.inputs.double()).float()
        run.save_image("grid.png", grid([to_uint8_images(pixels)]))
        run.save_tensors("recovered.safetensors", {"inputs": recovery.inputs, "pixels": pixels, "labels": recovery.labels})
        return {
            "labels": recovery.label_ids,
            "gradient_distance": recovery.distance,
            "status": recovery.status,
            "restart_status": recovery.restart_status,
            "seconds": recovery.seconds,
        }


VISION = VisionRun()
