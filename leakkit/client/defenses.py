"""Client-side defenses: composable transforms of the shared update, looked up by name.

A defense maps an Observation to a new Observation; it never changes the model. A chain is
written `name:key=value,key=value+name2:...`, e.g. `clip-noise:clip=1,multiplier=0.5+fp16`, and
applied left to right. Defenses that need more than the update itself -- per-example gradients
(DP-SGD clipping) or other clients' updates (aggregation) -- get them from a `ClientContext`
supplied by the simulation; the attacker never sees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from leakkit.errors import ConfigError
from leakkit.client.dpsgd import PrivateBatch, opacus_gradients
from leakkit.client.observation import Observation
from leakkit.registry import Registry

Gradients = dict[str, torch.Tensor]


@dataclass
class ClientContext:
    """What the client holds besides its update, for defenses that need it.

    generator: the client's randomness (noise, random masks), seeded by the simulation.
    per_example: returns one gradient dict per example of the batch (summed loss, unreduced).
    other_clients: returns the updates of `n` other clients of the same round.
    batch: the client's model and batch, for defenses that recompute the update (`opacus`).
    """

    generator: torch.Generator
    per_example: Callable[[], list[Gradients]] | None = None
    other_clients: Callable[[int], list[Observation]] | None = None
    batch: PrivateBatch | None = None


@dataclass(frozen=True)
class Param:
    """One numeric parameter of a defense: default and allowed interval."""

    default: float
    low: float = 0.0
    high: float = math.inf
    low_open: bool = False
    integer: bool = False

    def check(self, defense: str, name: str, value: float) -> float:
        ok = math.isfinite(value) or self.high == math.inf and value == math.inf
        ok = ok and (value > self.low if self.low_open else value >= self.low) and value <= self.high
        if self.integer and ok:
            ok = float(value).is_integer()
        if not ok:
            lo = "(" if self.low_open else "["
            kind = "an integer in " if self.integer else ""
            raise ConfigError(f"{defense}:{name}={value:g} is out of range; it must be {kind}{lo}{self.low:g}, {self.high:g}]")
        return int(value) if self.integer else float(value)


Transform = Callable[[Observation, dict[str, float], ClientContext], Observation]


@dataclass
class Defense:
    """A registered defense: its transform, its parameters, and the parameter an audit sweeps."""

    transform: Transform
    params: dict[str, Param] = field(default_factory=dict)
    strength: str | None = None
    doc: str = ""
    zeroes: bool = False  # writes exact zeros where it drops entries (what a pruning-aware attacker skips)


DEFENSES: Registry[Defense] = Registry("defense")


def defense(name: str, doc: str, strength: str | None = None, *, zeroes: bool = False, **params: Param) -> Callable[[Transform], Transform]:
    """Register a transform under `name` with its documented parameters.

    zeroes: the transform drops entries by writing exact zeros (pruning, sparsification, masking).
    """

    def add(fn: Transform) -> Transform:
        names = ", ".join(f"{k}={p.default:g}" for k, p in params.items())
        DEFENSES.register(name, description=doc + (f" (defaults: {names})" if names else ""))(Defense(fn, params, strength, doc, zeroes))
        return fn

    return add


def _replace(obs: Observation, grads: Gradients, note: dict[str, Any]) -> Observation:
    extra = dict(obs.extra)
    extra["defenses"] = list(extra.get("defenses", [])) + [note]
    return Observation(gradients=grads, batch_size=obs.batch_size, reduction=obs.reduction, model=obs.model, fingerprint=obs.fingerprint, extra=extra)


def _map(obs: Observation, fn: Callable[[torch.Tensor], torch.Tensor]) -> Gradients:
    return {n: fn(g) for n, g in obs.gradients.items()}


@defense("none", "no defense: the update is shared as computed")
def _none(obs: Observation, p: dict[str, float], ctx: ClientContext) -> Observation:
    return obs


@defense("noise", "add Gaussian noise N(0, std^2) to every entry", "std", std=Param(1e-3))
def _gaussian(obs: Observation, p: dict[str, float], ctx: ClientContext) -> Observation:
    std = p["std"]
    noisy = _map(obs, lambda g: g + std * torch.randn(g.shape, generator=ctx.generator, dtype=torch.float64).to(g.dtype))
    return _replace(obs, noisy, {"name": "noise", "std": std})


@defense("laplace", "add Laplace noise of the given scale to every entry", "scale", scale=Param(1e-3))
def _laplace(obs: Observation, p: dict[str, float], ctx: ClientContext) -> Observation:
    scale = p["scale"]

    def add(g: torch.Tensor) -> torch.Tensor:
        # inverse CDF from uniforms so the draw follows the client's generator
        u = torch.rand(g.shape, generator=ctx.generator, dtype=torch.float64) - 0.5
        return g + (-scale * torch.sign(u) * torch.log1p(-2 * u.abs())).to(g.dtype)

    return _replace(obs, _map(obs, add), {"name": "laplace", "scale": scale})


@defense(
    "clip-noise",
    "DP-SGD step: clip each example's gradient to norm `clip`, sum, add N(0, (multiplier*clip)^2), average",
    "multiplier",
    clip=Param(1.0, low_open=True),
    multiplier=Param(1.0),
    delta=Param(1e-5, 0.0, 1.0, low_open=True),
    sample_rate=Param(0.01, 0.0, 1.0, low_open=True),
    steps=Param(1, 1, math.inf, integer=True),
)
def _clip_noise(obs: Observation, p: dict[str, float], ctx: ClientContext) -> Observation:
    if ctx.per_example is None:
        raise ConfigError("clip-noise needs the client's per-example gradients; apply it on the victim side (run, observe, audit)")
    if obs.extra.get("fedavg"):
        raise ConfigError("clip-noise is a single-step (FedSGD) defense; use client.local_steps=1")
    clip, mult = p["clip"], p["multiplier"]
    per = ctx.per_example()
    total: Gradients = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in obs.gradients.items()}
    for grads in per:
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
        factor = min(1.0, clip / max(norm, 1e-12))
        for n in total:
            total[n] += factor * grads[n].double()
    out: Gradients = {}
    for n, g in total.items():
        noisy = g + mult * clip * torch.randn(g.shape, generator=ctx.generator, dtype=torch.float64)
        out[n] = (noisy / len(per) if obs.reduction == "mean" else noisy).to(obs.gradients[n].dtype)
    epsilon = dp_epsilon(mult, sample_rate=p["sample_rate"], steps=int(p["steps"]), delta=p["delta"])
    note = {"name": "clip-noise", "clip": clip, "multiplier": mult, "delta": p["delta"], "epsilon": epsilon,
            "accountant": "opacus-rdp" if epsilon is not None or mult == 0 else None, "sample_rate": p["sample_rate"], "steps": int(p["steps"])}
    return _replace(obs, out, note)


@defense(
    "opacus",
    "DP-SGD step computed by Opacus (GradSampleModule + DPOptimizer): per-sample clipping to max_grad_norm, "
    "Gaussian noise noise_multiplier*max_grad_norm; ε from Opacus' RDP accountant",
    "noise_multiplier",
    noise_multiplier=Param(1.0),
    max_grad_norm=Param(1.0, low_open=True),
    delta=Param(1e-5, 0.0, 1.0, low_open=True),
    sample_rate=Param(0.01, 0.0, 1.0, low_open=True),
    steps=Param(1, 1, math.inf, integer=True),
)
def _opacus(obs: Observation, p: dict[str, float], ctx: ClientContext) -> Observation:
    if ctx.batch is None:
        raise ConfigError("the opacus defense needs the client's image batch: apply it on the victim side (run, observe, audit) "
                          "of an image task; for text tasks use clip-noise")
    if obs.extra.get("fedavg"):
        raise ConfigError("the opacus defense is a single-step (FedSGD) defense; use client.local_steps=1")
    mult, clip = p["noise_multiplier"], p["max_grad_norm"]
    grads = opacus_gradients(ctx.batch, noise_multiplier=mult, max_grad_norm=clip, generator=ctx.generator)
    out = {n: grads[n].to(g.dtype) for n, g in obs.gradients.items()}
    epsilon = dp_epsilon(mult, sample_rate=p["sample_rate"], steps=int(p["steps"]), delta=p["delta"])
    note = {"name": "opacus", "noise_multiplier": mult, "max_grad_norm": clip, "delta": p["delta"], "epsilon": epsilon,
            "accountant": "opacus-rdp", "sample_rate": p["sample_rate"], "steps": int(p["steps"]), "opacus": _opacus_version()}
    return _replace(obs, out, note)


def _opacus_version() -> str:
    from importlib.metadata import version

    return version("opacus")


def dp_epsilon(multiplier: float, *, sample_rate: float, steps: int, delta: float) -> float | None:
    """The ε of `steps` subsampled Gaussian steps at (multiplier, sample_rate), from Opacus' RDP accountant.

    Returns inf without noise, and None when Opacus is not installed (the `dp` extra).
    """
    if multiplier == 0:
        return math.inf
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        return None
    accountant = RDPAccountant()
    accountant.history = [(multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


# The DP defenses: their parameter names for (noise multiplier, sample rate, steps, delta).
DP_PARAMETERS = {"clip-noise": ("multiplier", "sample_rate", "steps", "delta"), "opacus": ("noise_multiplier", "sample_rate", "steps", "delta")}


def epsilon_of(spec: str) -> float | None:
    """The ε a defense chain guarantees (its DP steps' ε added up, basic composition), None without a DP step.

    Args:
        spec: a chain such as "opacus:noise_multiplier=0.5".
    Returns:
        ε (inf where the noise is 0), or None when no step is a DP mechanism or Opacus is missing.
    """
    total: float | None = None
    for name, params in parse_chain(spec):
        if name in DP_PARAMETERS:
            mult, rate, steps, delta = (params[k] for k in DP_PARAMETERS[name])
            eps = dp_epsilon(mult, sample_rate=rate, steps=int(steps), delta=delta)
            if eps is None:
                return None
            total = eps + (total or 0.0)
    return total


def _cast(dtype: torch.dtype, name: str) -> Transform:
    def cast(obs: Observation, p: dict[str, float], ctx: ClientContext) -> Observation:
        # the update is shared in the low precision itself: the file holds these dtypes
        return _replace(obs, _map(obs, lambda g: g.to(dtype)), {"name": name})

    return cast


defense("fp16", "share the update in IEEE half precision")(_cast(torch.float16, "fp16"))
defense("bf16", "share the update in bfloat16")(_cast(torch.bfloat16, "bf16"))


@defense("int8", "per-tensor symmetric 8-bit quantization (the server dequantizes with the shared scale)", "bits", bits=Param(8, 2, 16, integer=True))
def _int8(obs: Observation, p: dict[str, float], ctx: ClientContext) -> Observation:
    levels = 2 ** (int(p["bits"]) - 1) - 1

    def quantize(g: torch.Tensor) -> torch.Tensor:
        scale = float(g.abs().max()) / levels
        return g if scale == 0 else (torch.round(g / scale).clamp(-levels, levels) * scale).to(g.dtype)

    return _replace(obs, _map(obs, quantize), {"name": "int8", "bits": int(p["bits"])})


@defense("prune", "zero the `ratio` smallest-magnitude entries of each tensor (DLG's gradient pruning)", "ratio", zeroes=True, ratio=Param(0.5, 0.0, 1.0))
def _prune(obs: Observation, p: dict[str, float], ctx: ClientContext) -> Observation:
    ratio = p["ratio"]

    def prune(g: torch.Tensor) -> torch.Tensor:
        k = int(round(ratio * g.numel()))
        if k == 0:
            return g
        flat = g.flatten().clone()
        flat[flat.abs().argsort()[:k]] = 0
        return flat.view_as(g)

    return _replace(obs, _map(obs, prune), {"name": "prune", "ratio": ratio})


@defense("topk", "keep only the `keep` fraction of largest-magnitude entries over the whole update", "keep", zeroes=True, keep=Param(0.1, 0.0, 1.0))
def _topk(obs: Observation, p: dict[str, float], ctx: ClientContext) -> Observation:
    flat = torch.cat([g.double().flatten() for g in obs.gradients.values()])
    k = int(round(p["keep"] * flat.numel()))
    threshold = flat.abs().topk(k).values[-1] if k > 0 else math.inf
    out = {n: torch.where(g.double().abs() >= threshold, g, torch.zeros_like(g)) for n, g in obs.gradients.items()}
    return _replace(obs, out, {"name": "topk", "keep": p["keep"]})


@defense("mask", "zero each entry independently with probability `ratio` (random masking)", "ratio", zeroes=True, ratio=Param(0.5, 0.0, 1.0))
def _mask(obs: Observation, p: dict[str, float], ctx: ClientContext) -> Observation:
    ratio = p["ratio"]
    out = _map(obs, lambda g: g * (torch.rand(g.shape, generator=ctx.generator) >= ratio).to(g.dtype))
    return _replace(obs, out, {"name": "mask", "ratio": ratio})


@defense("clients", "the server sees only the average of `n` clients' updates (secure aggregation)", "n", n=Param(1, 1, math.inf, integer=True))
def _clients(obs: Observation, p: dict[str, float], ctx: ClientContext) -> Observation:
    n = int(p["n"])
    if n == 1:
        return obs
    if ctx.other_clients is None:
        raise ConfigError("clients:n needs other clients' updates; apply it on the victim side (run, observe, audit)")
    others = ctx.other_clients(n - 1)
    out = {k: (g.double() + sum(o.gradients[k].double() for o in others)).div(n).to(g.dtype) for k, g in obs.gradients.items()}
    return _replace(obs, out, {"name": "clients", "n": n})


# --- specs ---------------------------------------------------------------------------------
Step = tuple[str, dict[str, float]]


def parse_chain(spec: str) -> list[Step]:
    """Parse `name:key=v,key=v+name2` into [(name, params)], defaults filled in and ranges checked.

    Raises:
        ConfigError: empty spec, unknown defense or parameter, a non-number, or a value out of range.
    """
    steps: list[Step] = []
    text = spec.strip()
    if not text:
        raise ConfigError("empty defense; see `leakkit list defenses`")
    for part in text.split("+"):
        name, _, args = part.strip().partition(":")
        entry = DEFENSES.get(name.strip())
        given: dict[str, float] = {}
        for item in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq:
                raise ConfigError(f"defense parameter {item!r} must look like key=value (e.g. {name}:{next(iter(entry.params), 'key')}=...)")
            if key not in entry.params:
                valid = ", ".join(entry.params) or "none"
                raise ConfigError(f"unknown parameter {key!r} for defense {name!r}; valid: {valid}")
            try:
                given[key] = float(value)
            except ValueError:
                raise ConfigError(f"{name}:{key} expects a number, got {value.strip()!r}") from None
        params = {k: p.check(name, k, given.get(k, p.default)) for k, p in entry.params.items()}
        steps.append((name.strip(), params))
    return steps


def format_chain(steps: Iterable[Step]) -> str:
    """The canonical spec string of a chain (the strength and non-default parameters are written)."""
    parts = []
    for name, params in steps:
        entry = DEFENSES.get(name)
        args = ",".join(f"{k}={v:g}" for k, v in params.items() if k == entry.strength or v != entry.params[k].default)
        parts.append(f"{name}:{args}" if args else name)
    return "+".join(parts)


# How each recorded defense step changes the per-entry variance of the noise in the update:
# (variance so far, the step's record in extra["defenses"], batch size, reduction) -> variance after it.
NoiseRule = Callable[[float, dict[str, Any], int, str], float]
NOISE_RULES: Registry[NoiseRule] = Registry("noise rule")
NOISE_RULES.register("noise")(lambda v, rec, b, red: v + float(rec["std"]) ** 2)
NOISE_RULES.register("laplace")(lambda v, rec, b, red: v + 2 * float(rec["scale"]) ** 2)


def _dp_sgd_rule(multiplier: str, clip: str) -> NoiseRule:
    """DP-SGD's noise: std multiplier x clip on the summed gradient, divided by the batch for a mean."""
    return lambda v, rec, b, red: v + (float(rec[multiplier]) * float(rec[clip]) / (b if red == "mean" else 1)) ** 2


NOISE_RULES.register("clip-noise")(_dp_sgd_rule("multiplier", "clip"))
NOISE_RULES.register("opacus")(_dp_sgd_rule("noise_multiplier", "max_grad_norm"))
NOISE_RULES.register("clients")(lambda v, rec, b, red: v / float(rec["n"]) ** 2)  # only this client's noise so far is averaged down


def noise_variance(observation: Observation) -> float:
    """Per-entry variance of the noise the client's recorded defenses added to its update (0 if none).

    Read from `extra["defenses"]`, which the client writes and the server receives with the update:
    what an attacker who knows the protocol knows (the attack never sees the noise itself).
    """
    variance = 0.0
    for record in observation.extra.get("defenses", []):
        if record.get("name") in NOISE_RULES:
            variance = NOISE_RULES.get(record["name"])(variance, record, observation.batch_size, observation.reduction)
    return variance


def zeroed_by(observation: Observation) -> list[str]:
    """The recorded defenses that dropped entries by writing exact zeros (prune, topk, mask), in order.

    Read from `extra["defenses"]`, like `noise_variance`: an attacker who knows the protocol knows
    that the update's exact zeros are the client's, not the gradient's.
    """
    return [r["name"] for r in observation.extra.get("defenses", []) if r.get("name") in DEFENSES and DEFENSES.get(r["name"]).zeroes]


def apply(observation: Observation, spec: str | list[Step], context: ClientContext) -> Observation:
    """Apply a defense chain to an update, left to right.

    Args:
        observation: the update as the client computed it.
        spec: a chain string (`noise:std=1e-3+fp16`) or parsed steps.
        context: the client's randomness and data access.
    Returns:
        The update as the server receives it; `extra["defenses"]` records what was applied.
    """
    steps = parse_chain(spec) if isinstance(spec, str) else spec
    for name, params in steps:
        observation = DEFENSES.get(name).transform(observation, params, context)
    return observation


def sweep(spec: str) -> list[str]:
    """Expand a spec whose parameters list several values (`prune:ratio=0.1,0.3`) into one chain each.

    Several swept steps give their product. Returns canonical chain strings.
    """
    text = spec.strip()
    if not text:
        raise ConfigError("empty --defense; see `leakkit list defenses`")
    parts = text.split("+")
    for i, part in enumerate(parts):
        name, _, args = part.partition(":")
        items = [a for a in args.split(",") if a.strip()]
        # a bare value after key=value continues that key's list: ratio=0.1,0.3 -> [0.1, 0.3]
        groups: list[list[str]] = []
        for item in items:
            if "=" in item or not groups:
                groups.append([item])
            else:
                groups[-1].append(item)
        multi = [g for g in groups if len(g) > 1]
        if len(multi) > 1:
            raise ConfigError(f"--defense {spec!r}: sweep one parameter per step")
        if multi:
            key = multi[0][0].split("=")[0]
            values = [multi[0][0].split("=", 1)[1]] + multi[0][1:]
            fixed = [g[0] for g in groups if g is not multi[0]]
            out: list[str] = []
            for v in values:
                out += sweep("+".join(parts[:i] + [f"{name}:" + ",".join(fixed + [f"{key}={v}"])] + parts[i + 1 :]))
            return out
    return [format_chain(parse_chain(text))]


def strength(spec: str) -> tuple[str, float | None]:
    """(series name, strength) of a chain for plots: the swept parameter of its last parametrised step."""
    steps = parse_chain(spec)
    for name, params in reversed(steps):
        key = DEFENSES.get(name).strength
        if key is not None:
            series = "+".join(format_chain([s]) for s in steps if s[0] != name) or ""
            return (f"{series}+{name}:{key}" if series else f"{name}:{key}"), params[key]
    return format_chain(steps), None
