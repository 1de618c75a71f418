"""The one runner: samples -> client batches -> client update (+ defenses) -> attack -> score -> run directory.

Every modality goes through `run_recipe` (simulation and attack, scored) and `attack_only` (the
attacker's side of a saved update). What differs by modality (reading samples, building a batch,
scoring and showing a recovery) comes from the modality's hooks (`leakkit.run.vision`,
`leakkit.run.text`); which attack runs comes from `leakkit.run.attacks`. This is the only place
where the private data (simulation side) and the recovery meet, and it passes the truth to nothing
but the hooks' scoring, which uses `leakkit.metrics`.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from leakkit.client.observation import Observation
from leakkit.engine.matching import StepCallback
from leakkit.errors import AttackDiverged, ConfigError, InputError, Interrupted
from leakkit.registry import Registry
from leakkit.run.attacks import ATTACKS, attack_for
from leakkit.run.capture import Capture
from leakkit.run.config import Recipe
from leakkit.run.rundir import RunDir, provenance
from leakkit.tasks import Modality, Task, modality_of


class Artifacts(Protocol):
    """What a run shows besides metrics.json, gathered batch by batch and rewritten with them."""

    def add(self, task: Any, batch: Any, recovery: Any, scored: list[dict[str, Any]]) -> None: ...

    def write(self, run: RunDir, rows: list[dict[str, Any]]) -> None: ...

    def restore(self, run: RunDir, task: Any, batches: Sequence[Any], rows: list[dict[str, Any]]) -> None:
        """Take back what a resumed run had shown for its finished batches (`rows`)."""
        ...


class ModalityRun(Protocol):
    """What the runner asks of a modality. Batches are the modality's own type with a `samples` list."""

    modality: Modality

    def build_task(self, recipe: Recipe, *, seed: int, device: str = "cpu") -> Task: ...

    def load_samples(self, recipe: Recipe, *, input_path: str | None, samples: int | None, seed: int) -> list[Any]: ...

    def count_input(self, path: str | None) -> int: ...

    def make_batches(self, task: Task, recipe: Recipe, samples: Sequence[Any], *, seed: int) -> list[Any]: ...

    def client_update(self, task: Task, recipe: Recipe, batches: Sequence[Any], index: int, *, seed: int) -> Observation: ...

    def observe(self, task: Task, recipe: Recipe, *, input_path: str | None, seed: int) -> Observation: ...

    def score(self, task: Task, batch: Any, recovery: Any, recipe: Recipe) -> list[dict[str, Any]]: ...

    def failed(self, task: Task, batch: Any) -> list[dict[str, Any]]: ...

    def summarize(self, rows: list[dict[str, Any]], recipe: Recipe, *, interrupted: bool) -> dict[str, Any]: ...

    def artifacts(self) -> Artifacts: ...

    def notes(self, task: Task) -> dict[str, Any]: ...

    def save_recovery(self, task: Task, recovery: Any, run: RunDir) -> dict[str, Any]: ...

    def truth(self, batch: Any) -> dict[str, bytes]:
        """A client batch's private data as files (suffix -> bytes), to keep beside a capture; its digest
        ties a capture's update to the data the audit scores it against."""
        ...

    def determined(self, task: Task, batch_size: int) -> bool:
        """Whether updates of `batch_size` examples determine their inputs in general (picks `[underdetermined]`)."""
        ...

    def determinacy(self, task: Task, observation: Observation) -> dict[str, Any] | None:
        """How far the update determines its batch (attacker-side: the model and the update only), with a
        `verdict` line when it does not; None if the modality has no such count."""
        ...

    def success_probe(self, task: Task, batch: Any, recipe: Recipe) -> Callable[[torch.Tensor], list[bool]] | None:
        """Per example (in batch order), whether a candidate already meets the success threshold; None if the
        modality has no cheap probe. Called from a step callback: it holds the truth, the attack never sees it."""
        ...


def _vision() -> ModalityRun:
    from leakkit.run.vision import VISION

    return VISION


def _text() -> ModalityRun:
    # text hooks import the transformers-backed adapters; deferred so image runs never pay for them
    from leakkit.run.text import TEXT

    return TEXT


MODALITY_RUNS: Registry[Callable[[], ModalityRun]] = Registry("modality")
MODALITY_RUNS.register("image", description="images: pixels, PSNR/SSIM, grid.png")(_vision)
MODALITY_RUNS.register("text", description="sentences: word embeddings, ROUGE, diff.txt")(_text)


def hooks_for(recipe: Recipe) -> ModalityRun:
    """The modality hooks of the recipe's task."""
    return MODALITY_RUNS.get(modality_of(recipe.task.name).name)()


def check_device(device: str) -> str:
    """Validate a device string; InputError if CUDA is asked for but absent."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but CUDA is not available on this machine")
    return device


def _progress_total(recipe: Recipe) -> int:
    return recipe.attack.steps if ATTACKS.get(recipe.method).iterative else 1


def attack(task: Task, observation: Observation, recipe: Recipe, *, seed: int, device: str, callbacks: Sequence[StepCallback] = ()) -> Any:
    """Run the recipe's attack family (`attack.method`) on one observed update; never sees the truth."""
    fn = attack_for(recipe.method, modality_of(recipe.task.name).name)
    return fn(task, observation, recipe, seed=seed, device=device, callbacks=callbacks)


def run_recipe(
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
    resume: bool = False,
    capture: Capture | None = None,
) -> dict[str, Any]:
    """Simulate, attack and score; write the run directory; return the metrics dict.

    Args:
        recipe: a resolved recipe (any modality).
        out: run directory (created).
        input_path: an image file or folder, or a sentence file, instead of the recipe's data.
        samples: number of examples (rounded up to whole batches).
        seed: fixes model weights, data draw, labels and attack initialisation.
        device: "cpu" or "cuda".
        progress: an object with `start(label, total)` that is also a step callback, or None.
        callbacks: extra engine step callbacks.
        on_batch: called with (batch index, scored rows) after each batch.
        only_batches: attack only these client batches of the drawn data (an audit's cells).
        resume: continue the run in `out` (same recipe, input, samples and seed), skipping its finished batches.
        capture: attack the updates a server captured (`leakkit flower simulate`) instead of simulating the
            clients; each at the global weights of its round. The batches are rebuilt only to score.
    Returns:
        {"recipe", "summary", "samples" (one row per example), "provenance"} (+ the modality's notes).
    Raises:
        Interrupted: on Ctrl-C, after saving everything finished so far.
    """
    check_device(device)
    recipe.validate()
    hooks = hooks_for(recipe)
    pool = hooks.load_samples(recipe, input_path=input_path, samples=samples, seed=seed)
    task = hooks.build_task(recipe, seed=seed, device=device)
    # the recipe's [underdetermined] settings where the update cannot pin the inputs down (config.json: `adapted`)
    recipe = recipe.adapted_to(recipe.data.batch_size, determined=lambda: hooks.determined(task, recipe.data.batch_size))
    batches = hooks.make_batches(task, recipe, pool, seed=seed)
    run = RunDir(out, resume=resume)
    prov = provenance(seed=seed, device=device)
    notes = hooks.notes(task)
    read = {"examples": len(pool), "labelled": sum(1 for s in pool if getattr(s, "label", None) is not None)}
    config = {"recipe": recipe.to_dict(), "input": input_path, "samples": len(pool), "input_read": read, "seed": seed, "device": device, **notes}
    rows: list[dict[str, Any]] = []
    attack_notes: list[str] = []
    determinacy: dict[str, Any] | None = None
    shown = hooks.artifacts()
    if resume:
        rows = _resumable_rows(run, config)
        shown.restore(run, task, batches, rows)
    else:
        run.write_config(config)
    finished = {r["batch"] for r in rows}
    step_callbacks = list(callbacks) + ([progress] if progress is not None else [])
    interrupted = False
    started = time.perf_counter()
    round_tasks: dict[Path, Task] = {}

    def save() -> dict[str, Any]:
        prov["wall_seconds"] = round(time.perf_counter() - started, 3)
        summary = hooks.summarize(rows, recipe, interrupted=interrupted)
        result = {"recipe": recipe.name, "summary": summary, "samples": rows, "input_read": read, "provenance": prov, **notes,
                  "attack_notes": attack_notes, "determinacy": determinacy}
        run.write_metrics(result)
        shown.write(run, rows)
        return result

    try:
        for b, batch in enumerate(batches):
            if (only_batches is not None and b not in only_batches) or b in finished:
                continue
            if progress is not None:
                progress.start(f"batch {b + 1}/{len(batches)}", _progress_total(recipe))
            attacker = task
            if capture is None:
                observation = hooks.client_update(task, recipe, batches, b, seed=seed)
            else:
                capture.check_truth(b, hooks.truth(batch))
                observation, weights = capture.update(b)
                attacker = _task_at(hooks, recipe, weights, seed=seed, device=device, cache=round_tasks)
            if determinacy is None:
                # counted on the first attacked update: batches of one run share shapes, only ranks can differ
                determinacy = hooks.determinacy(attacker, observation)
                if determinacy and determinacy.get("verdict"):
                    attack_notes.append(determinacy["verdict"])
                    warnings.warn(determinacy["verdict"], stacklevel=2)
            first_success: dict[int, float] = {}
            probe = hooks.success_probe(task, batch, recipe)
            watch = [_success_watch(probe, first_success)] if probe is not None else []
            try:
                recovery = attack(attacker, observation, recipe, seed=seed + b, device=device, callbacks=step_callbacks + watch)
            except (AttackDiverged, InputError) as e:
                # a defended update can defeat the analytic steps (e.g. noise hides the order): a failed recovery
                warnings.warn(f"batch {b + 1}: attack failed: {e}", stacklevel=2)
                recovery = None
            if recovery is None:
                scored = hooks.failed(task, batch)
            else:
                scored = hooks.score(task, batch, recovery, recipe)
                run.append_trace({"batch": b, **t} for t in recovery.trace)
                shown.add(task, batch, recovery, scored)
                for note in getattr(recovery, "notes", []):
                    if note not in attack_notes:  # said once per run, not once per batch
                        attack_notes.append(note)
                        warnings.warn(f"batch {b + 1}: {note}", stacklevel=2)
            for k, r in enumerate(scored):
                r.update(
                    {
                        "index": b * recipe.data.batch_size + k,
                        "batch": b,
                        "seconds": recovery.seconds if recovery else None,
                        "gradient_distance": recovery.distance if recovery else None,
                        "status": recovery.status if recovery else "diverged",
                        "restart": getattr(recovery, "restart", None),
                        "method": recipe.method,
                        "attack": getattr(recovery, "attack", "") or recipe.method,
                        "attack_report": getattr(recovery, "report", None) or None,
                        "seconds_to_success": _seconds_to_success(r, k, first_success, recovery, hooks.modality.score, recipe),
                    }
                )
                rows.append(r)
            save()
            if on_batch is not None:
                on_batch(b, scored)
    except KeyboardInterrupt:
        interrupted = True
        save()
        unit = hooks.modality.unit
        raise Interrupted(f"interrupted after {len(rows)} of {len(pool)} {unit}s; results saved in {run.path}") from None
    return save()


def _task_at(hooks: ModalityRun, recipe: Recipe, weights: Path, *, seed: int, device: str, cache: dict[Path, Task]) -> Task:
    """The recipe's task with the weights a captured update was computed on (built once per round)."""
    if weights not in cache:
        at = copy.deepcopy(recipe)
        at.task.weights = str(weights)
        cache[weights] = hooks.build_task(at, seed=seed, device=device)
    return cache[weights]


def _resumable_rows(run: RunDir, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The scored rows of the run being resumed, after checking it is the same run."""
    before = run.read_json("config.json")
    same = lambda c: json.loads(json.dumps({k: v for k, v in c.items() if k not in ("device", "notes")}, default=str))  # noqa: E731
    if same(before) != same(config):
        raise InputError(f"{run.path} holds a different run (recipe, input, samples or seed); --overwrite replaces it")
    if not (run.path / "metrics.json").is_file():
        return []
    return list(run.read_json("metrics.json").get("samples", []))


def _success_watch(probe: Callable[[torch.Tensor], list[bool]], first: dict[int, float]) -> StepCallback:
    """A step callback that records, per example, the attack seconds at which it first met the threshold."""

    def watch(event: Any) -> None:
        for i, hit in enumerate(probe(event.inputs)):
            if hit and i not in first:
                first[i] = event.seconds

    return watch


def _seconds_to_success(row: dict[str, Any], k: int, first: dict[int, float], recovery: Any, score: str, recipe: Recipe) -> float | None:
    """Attack seconds until example k first met the success threshold (a closed-form attack: its whole time), or None."""
    if k in first:
        return round(first[k], 4)
    value = row.get(score)
    if recovery is not None and value is not None and value >= recipe.metrics.threshold(score):
        return round(recovery.seconds, 4)
    return None


def observe_recipe(recipe: Recipe, *, input_path: str | None = None, seed: int = 0) -> Observation:
    """The victim side alone: the (defended) update of the recipe's first client batch.

    The recipe, model seed and defense are recorded in the observation's `extra`.
    """
    recipe.validate()
    hooks = hooks_for(recipe)
    task = hooks.build_task(recipe, seed=seed)
    observation = hooks.observe(task, recipe, input_path=input_path, seed=seed)
    observation.extra.update({"recipe": recipe.name, "model_seed": seed, "defense": recipe.defense})
    return observation


def captured_weights(observation: Observation, path: str | Path, overrides: Sequence[str]) -> list[str]:
    """Overrides that point the attacker's model at the weights an update was computed on, when its
    file names them (a Flower capture saves each round's global model beside the clients' updates)
    and the user did not choose weights (or recorded task settings) themselves.

    Returns:
        `key=value` overrides (empty for an update that names no weights).
    """
    given = {o.split("=", 1)[0] for o in overrides}
    out = [f"task.{k}={v}" for k, v in observation.extra.get("task_options", {}).items() if f"task.{k}" not in given]
    weights = observation.extra.get("global_weights")
    if weights and "task.weights" not in given:
        file = Path(path).parent / str(weights)
        if not file.is_file():
            raise InputError(f"{path} was computed on the weights in {file}, which is missing; give task.weights=FILE")
        out.append(f"task.weights={file}")
    return out


def observation_from_checkpoints(recipe: Recipe, before: str | Path, after: str | Path, *, seed: int = 0) -> Observation:
    """The update a pair of checkpoints implies, under the recipe's client protocol (`[client]`, `data.batch_size`,
    `data.reduction`). The recipe's task must load `before` as its weights (the attack runs at those weights).
    """
    from leakkit.client.checkpoints import update_from_checkpoints

    recipe.validate()
    if modality_of(recipe.task.name).name != "image":
        raise ConfigError("--checkpoints works for image tasks; a text update is attacked from a gradient file (--gradients)")
    task = hooks_for(recipe).build_task(recipe, seed=seed)
    c = recipe.client
    return update_from_checkpoints(
        before, after, task, local_lr=c.local_lr, local_steps=c.local_steps, local_batch=c.local_batch,
        batch_size=recipe.data.batch_size, reduction=recipe.data.reduction, model_name=recipe.task.model,
    )


def attack_only(
    recipe: Recipe, observation: Observation, *, out: str | Path, seed: int = 0, device: str = "cpu", progress: Any = None
) -> dict[str, Any]:
    """The attacker's side alone: recover inputs from a saved observation (no truth, no scores).

    Returns:
        {"recipe", "recovery" (what was recovered, the gradient distance, status, seconds), "provenance"}.
    """
    check_device(device)
    hooks = hooks_for(recipe)
    task = hooks.build_task(recipe, seed=seed)
    recipe = recipe.adapted_to(observation.batch_size, local_steps=observation.local_steps,
                               determined=lambda: hooks.determined(task, observation.batch_size))
    run = RunDir(out)
    run.write_config({"recipe": recipe.to_dict(), "seed": seed, "device": device, "observation": observation.metadata()})
    if progress is not None:
        progress.start("attack", _progress_total(recipe))
    recovery = attack(task, observation, recipe, seed=seed, device=device, callbacks=[progress] if progress else [])
    run.append_trace(recovery.trace)
    result = {
        "recipe": recipe.name,
        "recovery": hooks.save_recovery(task, recovery, run),
        "provenance": provenance(seed=seed, device=device),
    }
    run.write_metrics(result)
    return result
