"""The matching engine: the only optimisation loop in leakkit.

`reconstruct(task, observation, attack)` searches the task's input space (and, with soft labels,
the label simplex) for examples whose gradient matches the observed one. It never receives
ground truth: restarts are ranked by gradient distance alone.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from leakkit.errors import AttackDiverged, ConfigError, ObservationMismatch
from leakkit.engine.labels import LABELS
from leakkit.engine.objectives import LAYER_WEIGHTS, OBJECTIVES, InputObjective, Objective, ObjectiveOptions, relative_distance
from leakkit.client.defenses import noise_variance, zeroed_by
from leakkit.client.observation import Observation
from leakkit.engine.optimizers import OPTIMIZERS, SCHEDULES
from leakkit.engine.priors import PRIORS, Prior
from leakkit.tasks.base import Task

DTYPES = {"float64": torch.float64, "float32": torch.float32}
INITS = ("uniform", "gaussian", "mid")
# Where the first restart starts: "none" (attack.init) or "closed-form" (R-GAP's recovery, computed by
# the caller and passed as `reconstruct(start=...)`; where it does not apply, attack.init is used).
STARTS = ("none", "closed-form")
# With the right labels the feature solve fits to ~1e-10 or better (float32 gradients); wrong labels leave >1e-3.
FEATURE_RESIDUAL_LIMIT = 1e-6


@dataclass
class AttackConfig:
    """What the matching engine reads. Field names are keys of the recipe's `[attack]` table.

    objective: name in OBJECTIVES; l1_weight: TAG's L1 weight; layer_weights: name in LAYER_WEIGHTS.
    optimizer: name in OPTIMIZERS; lr; steps: optimizer steps per restart; inner_steps: L-BFGS
    iterations per step; history: L-BFGS memory; schedule: name in SCHEDULES.
    labels: name in LABELS; init: "uniform", "gaussian" or "mid" (see the task's initial_guess); start:
    "closed-form" makes the first restart begin at R-GAP's recovery where it applies (batch size 1,
    FedSGD, a plain chain of layers), "none" at attack.init; priors: prior name -> weight;
    box: project onto the feasible set after each step.
    subspace_weight: with a gradient objective, add this weight times the `subspace` objective
    (TIGER's term: the candidate's first-layer inputs against the span that layer's gradient
    reveals); 0 = off, the papers' own objectives.
    feature_weight: weight of matching each example's output-layer input to the values solved from
    the output layer's gradient (`analytic.linear_layer_inputs`); 0 = off. Batches need fixed labels;
    for batch size 1 the solve is exact and label-free.
    ignore_zeros: match only the entries the update does not hold as exactly 0, whatever its
    metadata says.
    prune_aware: the same, when the update's metadata records a defense that writes exact zeros
    (prune, topk, mask); false models an attacker who matches the client's zeros as gradient values.
    noise_aware: when the update's metadata records added noise (noise, laplace, clip-noise), weigh
    a total-variation prior by the noise energy (variance x matched entries) on image-shaped inputs,
    unless the recipe sets `priors.tv` itself; false models an attacker who does not know the noise.
    restarts: independent starts, best kept by gradient distance; stop_distance: a restart ends
    once the relative gradient distance falls below it; patience: steps without a 1 % improvement
    before a restart is declared stalled (0 = never); precision: "float64" or "float32".
    """

    objective: str = "l2"
    l1_weight: float = 1e-2
    layer_weights: str = "uniform"
    optimizer: str = "lbfgs"
    lr: float = 1.0
    steps: int = 300
    inner_steps: int = 20
    history: int = 100
    schedule: str = "none"
    labels: str = "soft"
    init: str = "uniform"
    start: str = "none"
    priors: dict[str, float] = field(default_factory=dict)
    box: bool = False
    feature_weight: float = 0.0
    subspace_weight: float = 0.0
    restarts: int = 4
    stop_distance: float = 1e-12
    patience: int = 50
    precision: str = "float64"
    ignore_zeros: bool = False
    prune_aware: bool = True
    noise_aware: bool = True

    def validate(self) -> None:
        """Raise ConfigError for unknown names or out-of-range numbers."""
        OBJECTIVES.get(self.objective)
        LAYER_WEIGHTS.get(self.layer_weights)
        OPTIMIZERS.get(self.optimizer)
        SCHEDULES.get(self.schedule)
        LABELS.get(self.labels)
        for name in self.priors:
            PRIORS.get(name)
        if self.init not in INITS:
            raise ConfigError(f"attack.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.start not in STARTS:
            raise ConfigError(f"attack.start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.precision not in DTYPES:
            raise ConfigError(f"attack.precision must be one of {', '.join(DTYPES)}, got {self.precision!r}")
        for key in ("steps", "inner_steps", "history", "restarts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"attack.{key} must be at least 1")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError("attack.lr must be a positive number")
        if self.feature_weight < 0:
            raise ConfigError("attack.feature_weight must be 0 (off) or positive")
        if self.subspace_weight < 0 or not math.isfinite(self.subspace_weight):
            raise ConfigError("attack.subspace_weight must be 0 (off) or positive")
        if self.patience < 0:
            raise ConfigError("attack.patience must be 0 (off) or positive")


@dataclass
class StepEvent:
    """What a step callback sees. `inputs` is a detached view of the current candidate."""

    restart: int
    restarts: int
    step: int
    steps: int
    distance: float
    seconds: float
    inputs: torch.Tensor


@dataclass
class Recovery:
    """The attacker's result.

    inputs: [B, *input_shape] float32 on the CPU, in the task's input space.
    labels: [B, num_classes] probabilities (one-hot when fixed by an analytic strategy).
    distance: relative gradient distance of the returned candidate.
    status: "converged", "stalled", "budget" (ran all steps) or "diverged" per restart; the chosen one here.
    trace: one dict per step of every restart (restart, step, distance, seconds).
    attack: which attack produced it, when a strategy chose among several (`auto`); "" otherwise.
    notes: settings the engine chose from the update itself (e.g. the noise-aware prior).
    report: attack-specific facts for the run output (e.g. R-GAP's per-layer determinacy); JSON-ready.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    distance: float
    restart: int
    status: str
    steps: int
    seconds: float
    restart_status: list[str]
    trace: list[dict[str, Any]]
    attack: str = ""
    notes: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def label_ids(self) -> list[int]:
        return [int(i) for i in self.labels.argmax(dim=-1)]


StepCallback = Callable[[StepEvent], None]


def reconstruct(
    task: Task,
    observation: Observation,
    attack: AttackConfig,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    callbacks: Sequence[StepCallback] = (),
    start: torch.Tensor | None = None,
    start_labels: torch.Tensor | None = None,
) -> Recovery:
    """Recover a batch of inputs (and labels) whose gradient matches `observation`.

    Args:
        task: the adapter (its model's weights are what the attacker holds; it is copied, not changed).
        observation: the shared gradient and its metadata.
        attack: the attacker's choices.
        seed: makes initialisation, and so the whole search, deterministic.
        device: where to run ("cpu", "cuda").
        callbacks: called after every step with a StepEvent (progress bars, external probes).
        start: where the first restart begins instead of attack.init (e.g. a closed-form recovery),
            in the task's input coordinates. Shape: [batch_size, *input_shape].
        start_labels: label probabilities the first restart's soft labels begin at (with `start`;
            unused where the labels are fixed). Shape: [label rows, num_classes].
    Returns:
        The best restart by gradient distance.
    Raises:
        ObservationMismatch: gradient names/shapes do not fit the model.
        AttackDiverged: every restart ended in NaN/inf.
    """
    attack.validate()
    observation.check_against(task.model)
    observation = observation.upcast()
    fedavg = observation.extra.get("fedavg")
    if fedavg and attack.feature_weight > 0:
        raise ConfigError("attack.feature_weight needs a single-gradient (FedSGD) update, not a FedAvg weight difference")
    dtype = DTYPES[attack.precision]
    work = task.prepare(observation).copy_to(dtype=dtype, device=device)
    matched = [n for n, _ in work.matched_parameters()]
    names = [n for n in matched if n in observation.gradients]
    if not names:
        raise ObservationMismatch("the update holds none of the gradients this attack matches")
    withheld = [n for n in matched if n not in observation.gradients]
    if withheld:
        warnings.warn(f"the update withholds {len(withheld)} parameter gradient(s) ({', '.join(withheld[:3])}{', ...' if len(withheld) > 3 else ''}); matching the {len(names)} it shares", stacklevel=2)
    target = [observation.gradients[n].to(device=device, dtype=dtype) for n in names]
    fixed = LABELS.get(attack.labels)(observation, task)
    objective = OBJECTIVES.get(attack.objective)
    def fitted(entry: InputObjective) -> Callable[[torch.Tensor], torch.Tensor]:
        return entry.fit(work, dict(zip(names, target)), math.sqrt(noise_variance(observation)))

    score = fitted(objective) if isinstance(objective, InputObjective) else None
    subspace = (fitted(OBJECTIVES.get("subspace")), attack.subspace_weight) if score is None and attack.subspace_weight > 0 else None  # type: ignore[arg-type]
    options = ObjectiveOptions(l1_weight=attack.l1_weight)
    weights = LAYER_WEIGHTS.get(attack.layer_weights)(target)
    priors = [(PRIORS.get(n), w) for n, w in attack.priors.items() if w != 0]
    notes: list[str] = []
    if attack.noise_aware:
        priors += _noise_priors(work, observation, target, attack, notes)
    features = _feature_targets(work, observation, fixed, dtype, device) if attack.feature_weight > 0 else None
    kept = [(t != 0).to(dtype) for t in target] if attack.ignore_zeros or _prune_aware(observation, attack, notes) else None

    problem = _Problem(
        work, observation.reduction, target, objective, weights, options, priors, features,
        attack.feature_weight, observation.batch_size, fedavg,
        kept,
        [i for i, n in enumerate(matched) if n in observation.gradients] if withheld else None,
        score, subspace,
    )
    started = time.perf_counter()
    trace: list[dict[str, Any]] = []
    statuses: list[str] = []
    best: _Candidate | None = None
    if start is not None:
        if tuple(start.shape) != (problem.batch, *work.input_shape):
            raise ConfigError(f"the start has shape {tuple(start.shape)}, the batch needs {(problem.batch, *work.input_shape)}")
        if start_labels is not None and tuple(start_labels.shape) != (work.label_rows(problem.batch), work.num_classes):
            start_labels = None  # soft labels of another shape: the first restart draws its own
        if not _start_beats_init(problem, attack, fixed, start, start_labels, seed, device):
            notes.append("the given start matched the update worse than attack.init's (a defended update?): the first restart starts at attack.init")
            start = start_labels = None
    for restart in range(attack.restarts):
        gen = _restart_generator(seed, restart)
        first = (start, start_labels) if restart == 0 else (None, None)
        status, candidate = _run_restart(problem, attack, fixed, restart, gen, started, trace, callbacks, device, *first)
        statuses.append(status)
        if candidate is not None and (best is None or candidate.distance < best.distance):
            best = candidate
        if status == "converged":
            break

    if best is None or all(status == "diverged" for status in statuses):
        raise AttackDiverged(f"all {len(statuses)} restart(s) diverged to NaN/inf; try a smaller attack.lr")
    return Recovery(
        inputs=best.inputs.to("cpu", torch.float32),
        labels=best.labels.to("cpu", torch.float32),
        distance=best.distance,
        restart=best.restart,
        status=statuses[best.restart],
        steps=best.step,
        seconds=time.perf_counter() - started,
        restart_status=statuses,
        trace=trace,
        notes=notes,
    )


def _restart_generator(seed: int, restart: int) -> torch.Generator:
    """The random stream of one restart: its start and its soft labels."""
    return torch.Generator().manual_seed(seed * 1_000_003 + restart)


def _start_beats_init(
    problem: "_Problem", attack: AttackConfig, fixed: torch.Tensor | None, start: torch.Tensor, start_labels: torch.Tensor | None,
    seed: int, device: str | torch.device,
) -> bool:
    """Whether a given start's update is closer to the observed one than the first restart's own start.

    A closed form solved from a pruned update can land far from any input (a seed-0 image at pruning
    0.5 came back at 5.4 dB when the search began there; from a uniform start that setting's median
    was 21.9 dB). The attacker's own gradient distance decides, with the same labels for both points,
    so that only the inputs compete.
    """
    dtype = problem.target[0].dtype
    labels = fixed if fixed is not None else start_labels
    if labels is None:
        return True  # soft labels drawn at random: nothing to compare the inputs with
    labels = labels.to(device=device, dtype=dtype)
    init = problem.task.initial_guess(problem.batch, init=attack.init, generator=_restart_generator(seed, 0)).to(device=device, dtype=dtype)
    with torch.enable_grad():
        ours = relative_distance(problem.update(start.to(device=device, dtype=dtype), labels, create_graph=False), problem.target)
        theirs = relative_distance(problem.update(init, labels, create_graph=False), problem.target)
    return ours <= theirs


def _noise_priors(task: Task, observation: Observation, target: list[torch.Tensor], attack: AttackConfig, notes: list[str]) -> list[tuple[Prior, float]]:
    """A TV prior as strong as the noise the update carries: the gradient alone can no longer pin
    the image below the noise floor, so smoothness decides there (measured: std 1e-3 on LeNet,
    26.6/29.2 dB without, 34.1/34.3 dB with)."""
    variance = noise_variance(observation)
    if variance <= 0 or "tv" in attack.priors or len(task.input_shape) != 3:
        return []
    weight = variance * sum(t.numel() for t in target)
    notes.append(f"noise-aware attacker: total-variation prior {weight:.3g} (noise variance {variance:.2e} from the update's metadata); attack.noise_aware=false turns it off")
    return [(PRIORS.get("tv"), weight)]


def _prune_aware(observation: Observation, attack: AttackConfig, notes: list[str]) -> bool:
    """Whether to skip the update's exact zeros because its metadata says a defense wrote them
    (against the naive match, seed 0: pruning 0.1 stopped 8 of 8 images; skipping the zeros, none)."""
    zeroing = zeroed_by(observation) if attack.prune_aware else []
    if zeroing:
        notes.append(f"pruning-aware attacker: the update's exact zeros are skipped ({', '.join(zeroing)} in its metadata); attack.prune_aware=false matches them")
    return bool(zeroing)


@dataclass
class _Candidate:
    """A point of the search with its relative gradient distance."""

    distance: float
    restart: int
    inputs: torch.Tensor
    labels: torch.Tensor
    step: int


@dataclass
class _Problem:
    """What every restart matches against: fixed for one call of `reconstruct`."""

    task: Task
    reduction: str
    target: list[torch.Tensor]
    objective: Objective
    weights: list[float]
    options: ObjectiveOptions
    priors: list[tuple[Prior, float]]
    features: tuple[torch.Tensor, float] | None
    feature_weight: float
    batch: int
    fedavg: dict[str, Any] | None = None
    masks: list[torch.Tensor] | None = None
    shared: list[int] | None = None  # positions of the shared tensors among the matched ones (None: all)
    score: Callable[[torch.Tensor], torch.Tensor] | None = None  # an InputObjective fitted to the update
    subspace: tuple[Callable[[torch.Tensor], torch.Tensor], float] | None = None  # added to a gradient objective

    def _pick(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        # the candidate's tensors are paired with the target's by name, never by position
        out = grads if self.shared is None else [grads[i] for i in self.shared]
        return out if self.masks is None else [g * m for g, m in zip(out, self.masks)]

    def update(self, x: torch.Tensor, labels: torch.Tensor, *, create_graph: bool) -> list[torch.Tensor]:
        """What the client would have shared for (x, labels): its gradient, or with FedAvg the
        weight difference after the same local steps; with `masks`, only the entries the client kept."""
        if self.fedavg:
            out = self.task.local_update(
                x, labels, steps=int(self.fedavg["local_steps"]), lr=float(self.fedavg["local_lr"]),
                local_batch=int(self.fedavg.get("local_batch", 0)), reduction=self.reduction, create_graph=create_graph, matched=True,
            )
        else:
            out = self.task.gradients(x, labels, reduction=self.reduction, create_graph=create_graph, matched=True)
        return self._pick(out)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Matching loss (objective + feature term + priors) and the candidate's update ([] for an
        input objective, which never computes it)."""
        if self.score is not None:
            loss, grads = self.score(x), []
        elif self.features is None:
            grads = self.update(x, labels, create_graph=True)
            loss = self.objective(grads, self.target, self.weights, self.options)
        else:
            grads, feats = self.task.gradients_and_features(x, labels, reduction=self.reduction, create_graph=True, matched=True)
            grads = self._pick(grads)
            loss = self.objective(grads, self.target, self.weights, self.options)
            loss = loss + self.feature_weight * (feats - self.features[0]).pow(2).sum() / self.features[1]
        if self.subspace is not None:
            loss = loss + self.subspace[1] * self.subspace[0](x)
        for prior, w in self.priors:
            loss = loss + w * prior(x, self.task)
        return loss, grads


def _run_restart(
    problem: _Problem,
    attack: AttackConfig,
    fixed: torch.Tensor | None,
    restart: int,
    gen: torch.Generator,
    started: float,
    trace: list[dict[str, Any]],
    callbacks: Sequence[StepCallback],
    device: str | torch.device,
    start: torch.Tensor | None = None,
    start_labels: torch.Tensor | None = None,
) -> tuple[str, _Candidate | None]:
    """One independent start (at `start` where given): returns its status and its best point by gradient distance."""
    work, dtype = problem.task, problem.target[0].dtype
    if start is not None:  # its shape was checked by reconstruct
        x = start.detach().to(device=device, dtype=dtype).clone()
        if attack.box:
            x = work.project(x)
    else:
        x = work.initial_guess(problem.batch, init=attack.init, generator=gen).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    variables = [x]
    if fixed is None:
        logits = torch.randn((work.label_rows(problem.batch), work.num_classes), generator=gen, dtype=torch.float64)
        if start is not None and start_labels is not None:
            # soft labels begin at the given probabilities (log-probabilities are logits of the same softmax)
            logits = start_labels.double().clamp_min(1e-6).log()
        logits = logits.to(device=device, dtype=dtype).requires_grad_(True)
        variables.append(logits)
    else:
        fixed_labels = fixed.to(device=device, dtype=dtype)

    def labels_now() -> torch.Tensor:
        return torch.softmax(logits, dim=-1) if fixed is None else fixed_labels

    optimizer = OPTIMIZERS.get(attack.optimizer)(variables, lr=attack.lr, inner_steps=attack.inner_steps, history=attack.history)
    schedule = SCHEDULES.get(attack.schedule)(optimizer, attack.steps)
    first_eval: list[float] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss, grads = problem.loss(x, labels_now())
        # only the search variables need gradients, not the attacker's copy of the weights
        loss.backward(inputs=variables)
        # an input objective ranks its steps by its own value: the gradient distance would cost a backward pass each
        first_eval.append(float(loss) if problem.score is not None else relative_distance(grads, problem.target))
        return loss

    status, best = "budget", None
    last_improvement, reference = 0, math.inf
    step = 0
    for step in range(1, attack.steps + 1):
        first_eval.clear()
        before = (x.detach().clone(), labels_now().detach().clone())
        optimizer.step(closure)
        if schedule is not None:
            schedule.step()
        if attack.box:
            with torch.no_grad():
                x.copy_(work.project(x))
        # the first evaluation of a step is at the point the step started from
        distance = first_eval[0] if first_eval else math.nan
        elapsed = time.perf_counter() - started
        trace.append({"restart": restart, "step": step, "distance": distance, "seconds": round(elapsed, 4)})
        if not math.isfinite(distance) or not torch.isfinite(x).all():
            return "diverged", best
        if best is None or distance < best.distance:
            best = _Candidate(distance, restart, before[0], before[1], step - 1)
        event = StepEvent(restart, attack.restarts, step, attack.steps, distance, elapsed, before[0])
        for callback in callbacks:
            callback(event)
        if distance < attack.stop_distance:
            status = "converged"
            break
        if distance < 0.99 * reference:
            reference, last_improvement = distance, step
        elif attack.patience and step - last_improvement >= attack.patience:
            status = "stalled"
            break
    if problem.score is not None:
        with torch.no_grad():
            final = float(problem.score(x.detach()))
    else:
        final = relative_distance(problem.update(x.detach(), labels_now().detach(), create_graph=False), problem.target)
    if math.isfinite(final) and (best is None or final < best.distance):
        best = _Candidate(final, restart, x.detach().clone(), labels_now().detach().clone(), step)
    if problem.score is not None and best is not None:
        # restarts are compared, and the recovery reported, by gradient distance like every other objective
        best = replace(best, distance=relative_distance(problem.update(best.inputs, best.labels, create_graph=False), problem.target))
    return status, best

def _feature_targets(
    task: Task, observation: Observation, fixed: torch.Tensor | None, dtype: torch.dtype, device: str | torch.device
) -> tuple[torch.Tensor, float] | None:
    """Per-example output-layer inputs solved from the observation, and their squared norm.

    None (with a warning) when the solve cannot fit the gradient: then the labels are wrong and
    the targets would pull every example away from the truth.
    """
    from leakkit.engine import analytic

    w_name, b_name = task.classifier_parameter_names()
    if b_name is None:
        raise ConfigError("attack.feature_weight needs an output layer with a bias")
    if fixed is None and observation.batch_size > 1:
        raise ConfigError("attack.feature_weight with batch size > 1 needs fixed labels (attack.labels=batch)")
    params = dict(task.parameters())
    labels = fixed if fixed is not None else torch.eye(task.num_classes, dtype=torch.float64)[:1]
    H, residual = analytic.linear_layer_inputs(
        observation.gradients[w_name], observation.gradients[b_name], params[w_name], params[b_name],
        labels, reduction=observation.reduction,
    )
    if residual > FEATURE_RESIDUAL_LIMIT:
        warnings.warn(
            f"output-layer features do not fit the inferred labels (residual {residual:.1e}); "
            "matching without feature targets for this batch",
            stacklevel=3,
        )
        return None
    H = H.to(device=device, dtype=dtype)
    return H, float(H.pow(2).sum())
