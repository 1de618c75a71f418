"""Attack families by name: what `attack.method` in a recipe chooses, per modality.

A new attack family is one module (in `leakkit/vision/` or `leakkit/text/`) plus one
registration here. Each implementation is called as

    fn(task, observation, recipe, *, seed, device, callbacks) -> recovery

where `recipe` is a resolved `leakkit.run.config.Recipe` (the implementation reads the sections it
needs: `recipe.attack` for the engine, `recipe.text` for text decoding) and the recovery is the
modality's own type (`leakkit.engine.Recovery` for images, `leakkit.text.attack.TextRecovery`).
The implementations import their modules when called, so listing attacks stays light.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from leakkit.errors import AttackDiverged, ConfigError
from leakkit.registry import Registry

AttackFn = Callable[..., Any]


@dataclass
class AttackFamily:
    """One published attack: its citation and one implementation per modality it applies to."""

    paper: str
    description: str
    iterative: bool = True  # runs the engine's step loop (progress is counted in attack.steps)
    implementations: dict[str, AttackFn] = field(default_factory=dict)


ATTACKS: Registry[AttackFamily] = Registry("attack")


def register_attack(
    name: str, *, modality: str, paper: str, description: str, iterative: bool = True
) -> Callable[[AttackFn], AttackFn]:
    """Add `name`'s implementation for `modality` (the family is created by its first registration).

    iterative: the attack runs the engine's optimisation loop; False for closed-form attacks.
    """

    def add(fn: AttackFn) -> AttackFn:
        if name not in ATTACKS:
            ATTACKS.register(name, description=f"{description} ({paper})")(AttackFamily(paper, description, iterative))
        family = ATTACKS.get(name)
        if modality in family.implementations:
            raise ValueError(f"attack {name!r} has two {modality} implementations")
        family.implementations[modality] = fn
        return fn

    return add


def attack_for(method: str, modality: str) -> AttackFn:
    """The implementation of attack `method` for `modality`.

    Raises:
        ConfigError: unknown attack, or one that does not apply to this modality (lists those that do).
    """
    family = ATTACKS.get(method)
    if modality not in family.implementations:
        valid = [n for n in ATTACKS.names() if modality in ATTACKS.get(n).implementations]
        raise ConfigError(f"attack.method {method!r} does not apply to {modality} tasks; valid: {', '.join(valid)}")
    return family.implementations[modality]


def describe() -> list[tuple[str, str]]:
    """(name, "modalities: description (paper)") for `leakkit list attacks`."""
    return [(n, f"{', '.join(sorted(ATTACKS.get(n).implementations))}: {d}") for n, d in ATTACKS.describe()]


# --- the families ------------------------------------------------------------------------------
_MATCH = "gradient matching with the shared engine: over pixels, or over word embeddings decoded to the nearest tokens (+ LAMP discrete steps)"
_DLG = ("Zhu, Liu, Han, Deep Leakage from Gradients, NeurIPS 2019; Geiping et al., Inverting Gradients, NeurIPS 2020; "
        "Deng et al., TAG, EMNLP 2021; Balunovic et al., LAMP, NeurIPS 2022")


@register_attack("match", modality="image", paper=_DLG,
                 description=_MATCH)
def _match_images(task: Any, observation: Any, recipe: Any, *, callbacks: Any = (), closed_form: Any = None, **options: Any) -> Any:
    from leakkit.engine.matching import reconstruct

    if recipe.attack.start != "closed-form":
        return reconstruct(task, observation, recipe.attack, callbacks=callbacks, **options)
    started = time.perf_counter()
    start, labels, note = _closed_form_start(closed_form or _closed_form(task, observation))
    offset = time.perf_counter() - started
    # the closed-form solve is part of the attack: its seconds count in the step times and the total
    recovery = reconstruct(task, observation, recipe.attack, start=start, start_labels=labels,
                           callbacks=[_shift(cb, offset) for cb in callbacks], **options)
    if note:
        recovery.notes.append(note)
    return dataclasses.replace(recovery, seconds=recovery.seconds + offset)


def _closed_form(task: Any, observation: Any) -> Callable[[], Any]:
    """R-GAP on this update, solved at the first call and kept: `auto`'s candidates share one solve
    (the rgap candidate's recovery, or idlg's and dlg's start) instead of three.

    The callable returns the recovery, or raises the ConfigError that says why the closed form does
    not apply, each time it is called.
    """
    from leakkit.vision.rgap import rgap_attack

    @functools.cache
    def solve() -> tuple[Any, ConfigError | None]:
        try:
            return rgap_attack(task, observation), None
        except ConfigError as e:
            return None, e

    def recovery() -> Any:
        result, error = solve()
        if error is not None:
            raise error
        return result

    return recovery


def _closed_form_start(closed_form: Callable[[], Any]) -> tuple[Any, Any, str | None]:
    """R-GAP's recovery (inputs, labels) as the engine's first start, or (None, None, why not) where the
    closed form does not apply."""
    try:
        recovery = closed_form()
        return recovery.inputs, recovery.labels, None
    except ConfigError as e:
        return None, None, f"attack.start=closed-form: the closed form does not apply ({e}); the first restart starts at attack.init"


@register_attack("match", modality="text", paper=_DLG,
                 description=_MATCH)
def _match_text(task: Any, observation: Any, recipe: Any, **options: Any) -> Any:
    from leakkit.text.attack import match

    return match(task, observation, recipe.attack, recipe.text, **options)


@register_attack("exact", modality="text", paper="leakkit's analytic leaks, after Petrov et al., DAGER, NeurIPS 2024",
                 description="token set, span checks, order and labels read off the gradient; no optimisation", iterative=False)
def _exact_text(task: Any, observation: Any, recipe: Any, **options: Any) -> Any:
    from leakkit.text.attack import exact

    return exact(task, observation, recipe.attack, recipe.text, **options)


@register_attack("rgap", modality="image", paper="Zhu, Blaschko, R-GAP, ICLR 2021; R-CONV, 2024", iterative=False,
                 description="closed-form recovery of one image, layer by layer from the output back (no optimisation)")
def _rgap_images(task: Any, observation: Any, recipe: Any, *, callbacks: Any = (), closed_form: Any = None, **options: Any) -> Any:
    from leakkit.engine.matching import StepEvent

    recovery = (closed_form or _closed_form(task, observation))()
    for callback in callbacks:  # one step: the solution
        callback(StepEvent(0, 1, 0, 0, recovery.distance, recovery.seconds, recovery.inputs))
    return recovery


@register_attack("auto", modality="image", paper="the strategy of Croce & Hein, AutoAttack, ICML 2020",
                 description="the strongest of several attacks per batch: runs each candidate recipe's attack "
                             "and keeps the recovery with the lowest gradient distance (never the truth)")
def _auto_images(task: Any, observation: Any, recipe: Any, *, callbacks: Any = (), **options: Any) -> Any:
    from leakkit.vision.determinacy import determined_in_general

    started = time.perf_counter()
    best, tried = None, {}
    # the count runs once per update, and only if a candidate's table asks for it
    determined = functools.cache(lambda: determined_in_general(task, observation.batch_size))
    # one R-GAP solve per update, whichever candidate needs it first (rgap itself, or idlg's start)
    closed_form = _closed_form(task, observation)

    for name in recipe.choice.candidates:
        member = recipe.attacked_as(name, batch_size=observation.batch_size, local_steps=observation.local_steps,
                                    determined=determined)
        # auto's own budget caps every candidate's, so one override bounds the whole search
        member.attack.steps = min(member.attack.steps, recipe.attack.steps)
        member.attack.restarts = min(member.attack.restarts, recipe.attack.restarts)
        offset = time.perf_counter() - started
        # step times count from the start of `auto`, so time-to-success includes the candidates before
        shifted = [_shift(cb, offset) for cb in callbacks]
        try:
            recovery = attack_for(member.method, "image")(task, observation, member, callbacks=shifted,
                                                          closed_form=closed_form, **options)
        except ConfigError as e:  # e.g. iDLG's label rule on a batch: that attack does not apply here
            tried[name] = f"not applicable ({e})"
            continue
        except AttackDiverged:
            tried[name] = "diverged"
            continue
        tried[name] = recovery.distance
        if best is None or recovery.distance < best.distance:
            best = dataclasses.replace(recovery, attack=name)
        if recovery.status == "converged" or recovery.distance <= recipe.attack.stop_distance:
            break  # the gradient is matched to the stop distance: the rest cannot do better by much
    if best is None:
        raise AttackDiverged("no candidate attack applied or converged: " + "; ".join(f"{k}: {v}" for k, v in tried.items()))
    # what each candidate reached (or why it did not run): the run's `attack_report` per example
    report = {**(best.report or {}), "candidates": tried}
    return dataclasses.replace(best, seconds=time.perf_counter() - started, report=report)


def _shift(callback: Callable[[Any], None], offset: float) -> Callable[[Any], None]:
    return lambda event: callback(dataclasses.replace(event, seconds=event.seconds + offset))
