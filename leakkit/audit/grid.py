"""The leakage audit: a grid of (setting x client batch) cells, run locally or on Ray, resumable.

A setting is the recipe with one grid combination of overrides (`--grid data.batch_size=1,4`)
and one defense chain (`--defense noise:std=0,1e-3`). Every setting attacks the same drawn data
with the same model (one seed), so settings differ only in what they vary. A cell is one client
batch of one setting: it runs as an ordinary `leakkit run` restricted to that batch, and its run
directory is moved into place in one rename, so a cell is either finished or absent.

Layout of an audit directory:
    audit.json            what was asked (recipe, overrides, grid, defenses, samples, seed) and the settings
    cells/SETTING/batch-N/  one finished cell: metrics.json, config.json, grid.png or diff.txt
    utility/KEY.json      accuracy of the task's model trained under a defense
    samples.csv           every attacked example of every setting
    summary.csv, summary.json   one row per setting: success rate + Wilson 95 % CI, quantiles, time, utility
    plots/*.png, report.html    written by `leakkit report`
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from leakkit import metrics
from leakkit.run.capture import Capture
from leakkit.run.config import Recipe, load_recipe
from leakkit.client.defenses import epsilon_of, strength, sweep
from leakkit.errors import ConfigError, InputError, Interrupted, LeakkitError
from leakkit.files import apply_mode
from leakkit.registry import Registry
from leakkit.run.rundir import provenance, write_json
from leakkit.tasks import modality_of

AUDIT_VERSION = 1


@dataclass
class Setting:
    """One point of the grid: the recipe's overrides plus a defense chain."""

    id: str
    grid: list[str]
    defense: str
    series: str
    strength: float | None
    batches: int
    utility_key: str | None = None

    @property
    def label(self) -> str:
        return " ".join(self.grid + ([] if self.defense == "none" and self.grid else [self.defense]))


@dataclass
class AuditSpec:
    """What the user asked for; two audits with equal specs are the same audit."""

    recipe: str
    overrides: list[str] = field(default_factory=list)
    grid: list[str] = field(default_factory=list)
    defenses: list[str] = field(default_factory=list)
    samples: int | None = None
    input: str | None = None
    seed: int = 0
    device: str = "cpu"
    utility: bool = True
    baseline: bool = True
    source: str | None = None

    def resolve(self, name: str, overrides: Iterable[str] = ()) -> Recipe:
        # a capture's clients trained in its own setting: the attack recipe takes it over, then the user's overrides
        captured = Capture.read(self.source).simulation["setting_overrides"] if self.source else []
        return load_recipe(name, [*captured, *self.overrides, *overrides])

    @classmethod
    def from_capture(cls, spec: "AuditSpec", source: str) -> "AuditSpec":
        """The audit of a `leakkit flower simulate` capture: its data, seed and sample count, no utility runs."""
        sim = Capture.read(source).simulation
        return dataclasses.replace(spec, source=str(Path(source).resolve()), input=sim["input"], samples=int(sim["samples"]),
                                   seed=int(sim["seed"]), utility=False, baseline=False)


@dataclass
class Job:
    """One unit of work: an attacked client batch of a setting, or a utility measurement."""

    kind: str  # "cell" or "utility"
    setting: str
    batch: int = 0


def parse_grid(items: list[str]) -> list[list[str]]:
    """`key=v1,v2` per axis -> every combination as a list of `key=value` overrides."""
    axes = []
    for item in items:
        key, eq, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or not key.strip() or not vals:
            raise ConfigError(f"--grid {item!r} must look like section.key=v1,v2,...")
        if key.strip().startswith("defense"):
            raise ConfigError("sweep defenses with --defense, not --grid")
        axes.append([f"{key.strip()}={v}" for v in vals])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def plan(spec: AuditSpec) -> tuple[Recipe, list[Setting]]:
    """Resolve every setting of the audit (validating each) and count its client batches.

    Raises:
        ConfigError: unknown recipe, key, defense or parameter; out-of-range value; empty grid.
    """
    base = spec.resolve(spec.recipe)
    if spec.source:
        capture = Capture.read(spec.source)
        rounds = capture.simulation["rounds"]
        label = f"flower capture ({capture.simulation['clients']} clients x {rounds} rounds)"
        return base, [Setting(_slug(f"capture {spec.source}"), [], base.defense, label, None, capture.batches())]
    chains: list[str] = []
    for d in spec.defenses or [base.defense]:
        for chain in sweep(d):
            if chain not in chains:
                chains.append(chain)
    if spec.baseline and spec.defenses and not any(c == "none" or strength(c)[1] == 0 for c in chains):
        chains.insert(0, "none")  # the reference row: what the defenses changed
    combos = parse_grid(spec.grid)
    if not chains or not combos:
        raise ConfigError("the audit grid is empty: give at least one --defense or --grid value")
    if spec.samples is not None and spec.samples < 1:
        raise InputError("--samples must be at least 1")
    settings: list[Setting] = []
    for combo, chain in itertools.product(combos, chains):
        recipe = spec.resolve(spec.recipe, [*combo, f"defense={chain}"])
        n = spec.samples if spec.samples is not None else (None if spec.input else recipe.data.samples)
        if n is None:
            n = _count_input(spec.input, recipe)
        batches = math.ceil(n / recipe.data.batch_size)
        series, value = _series(combo, chain, len(combos) > 1, len(chains) > 1)
        key = _slug(" ".join(combo + [chain]))
        settings.append(Setting(key, combo, chain, series, value, batches, _utility_key(recipe) if spec.utility else None))
    ids = [s.id for s in settings]
    if len(set(ids)) != len(ids):
        raise ConfigError("two grid points resolve to the same setting; list each value once")
    return base, settings


def _count_input(path: str | None, recipe: Recipe) -> int:
    from leakkit.run.runner import hooks_for

    return hooks_for(recipe).count_input(path)


def _series(combo: list[str], chain: str, many_combos: bool, many_chains: bool) -> tuple[str, float | None]:
    """Which curve a setting belongs to, and its x value: the swept defense parameter, or the
    numeric grid value when only the grid varies."""
    if many_chains or not many_combos:
        name, value = strength(chain)
        return (" ".join(combo + [name]).strip(), value)
    key, _, value = combo[-1].partition("=")
    try:
        x: float | None = float(value)
    except ValueError:
        x = None
    return (" ".join(combo[:-1] + [key]) + (f" ({chain})" if chain != "none" else "")).strip() if x is not None else combo[-1], x


def _slug(text: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in text.replace("=", "-").replace(" ", "__"))
    return safe[:80] + "-" + hashlib.sha256(text.encode()).hexdigest()[:6]


def _utility_key(recipe: Recipe) -> str | None:
    from leakkit.audit.utility import utility_available

    if not utility_available(recipe):
        return None
    t, u = recipe.task, recipe.utility
    if u.data and not Path(u.data).is_file():
        raise InputError(f"utility.data {u.data}: no such file")
    return _slug(f"{t.name} {t.model} {t.image_size} {t.channels} {','.join(t.frozen)} {u.data} {u.steps} {u.batch} {u.lr} {recipe.defense}")


# --- running one job (in this process or in a Ray worker) ---------------------------------
def run_job(spec: dict[str, Any], setting: dict[str, Any], job: dict[str, Any]) -> dict[str, bytes]:
    """Run one job and return the files it produced (name -> bytes); writes nothing that stays.

    Pure in its inputs so it can run in another process or machine: the caller places the files.
    """
    a = AuditSpec(**spec)
    s = Setting(**setting)
    recipe = a.resolve(a.recipe, [*s.grid, f"defense={s.defense}"])
    _maybe_fault(job)
    if job["kind"] == "utility":
        from leakkit.audit.utility import measure_utility

        result = measure_utility(recipe, seed=a.seed)
        return {"utility.json": json.dumps(result).encode()}
    from leakkit.run.runner import run_recipe

    with tempfile.TemporaryDirectory(prefix="leakkit-cell-") as tmp:
        capture = Capture.read(a.source) if a.source else None
        run_recipe(recipe, out=tmp, input_path=a.input, samples=a.samples, seed=a.seed, device=a.device, only_batches=[job["batch"]], capture=capture)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file() and p.name != "trace.jsonl"}


def _maybe_fault(job: dict[str, Any]) -> None:
    """Fault injection for the retry test: LEAKKIT_FAULT_ONCE=DIR kills the worker process the
    first time it runs each job (a marker file in DIR remembers), as a crashed machine would."""
    marker_dir = os.environ.get("LEAKKIT_FAULT_ONCE")
    if not marker_dir:
        return
    marker = Path(marker_dir) / f"{job['kind']}-{job['setting']}-{job['batch']}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("killed once\n")
        os._exit(17)


def _ray_entry(spec: dict[str, Any], setting: dict[str, Any], job: dict[str, Any]) -> dict[str, bytes]:
    import torch

    torch.set_num_threads(1)  # one core per task: Ray schedules one task per CPU
    return run_job(spec, setting, job)


# --- backends ------------------------------------------------------------------------------
Done = Callable[[Job, "dict[str, bytes] | BaseException"], None]
Backend = Callable[[AuditSpec, dict[str, Setting], list[Job], Done, dict[str, Any]], None]
BACKENDS: Registry[Backend] = Registry("backend")


@BACKENDS.register("local", description="run cells one after another in this process (default; no Ray needed)")
def _local(spec: AuditSpec, settings: dict[str, Setting], jobs: list[Job], done: Done, options: dict[str, Any]) -> None:
    for job in jobs:
        try:
            result: dict[str, bytes] | BaseException = run_job(asdict(spec), asdict(settings[job.setting]), asdict(job))
        except Interrupted:
            raise KeyboardInterrupt from None
        except LeakkitError as e:
            result = e
        done(job, result)


@BACKENDS.register("ray", description="run cells as Ray tasks on an existing cluster (--ray-address) or a local one")
def _ray(spec: AuditSpec, settings: dict[str, Setting], jobs: list[Job], done: Done, options: dict[str, Any]) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'leakkit[ray]'") from None
    address = options.get("ray_address") or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address:
            ray.init(address=address, **init)
        else:
            ray.init(num_cpus=options.get("workers") or os.cpu_count(), **init)
    # a task whose worker dies (killed, out of memory) is run again; an error raised by the
    # attack itself is deterministic and is reported instead of retried
    remote = ray.remote(num_cpus=1, max_retries=options.get("retries", 3), retry_exceptions=False)(_ray_entry)
    s = asdict(spec)
    pending = {remote.remote(s, asdict(settings[j.setting]), asdict(j)): j for j in jobs}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result: dict[str, bytes] | BaseException = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = e.as_instanceof_cause()
                    result = cause if isinstance(cause, LeakkitError) else RuntimeError(str(e).splitlines()[0])
                except ray.exceptions.RayError as e:
                    result = RuntimeError(f"worker lost after retries: {str(e).splitlines()[0]}")
                done(job, result)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


# --- the audit -----------------------------------------------------------------------------
class AuditDir:
    """The files of one audit directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def cell(self, job: Job) -> Path:
        if job.kind == "utility":
            return self.path / "utility" / job.setting
        return self.path / "cells" / job.setting / f"batch-{job.batch:04d}"

    def finished(self, job: Job) -> bool:
        return (self.cell(job) / ("utility.json" if job.kind == "utility" else "metrics.json")).is_file()

    def place(self, job: Job, files: dict[str, bytes]) -> None:
        """Write a cell's files into a temporary directory, then rename it into place."""
        final = self.cell(job)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = apply_mode(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))  # mkdtemp makes 0700
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def read_spec(self) -> dict[str, Any] | None:
        f = self.path / "audit.json"
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputError(f"{f} is not readable JSON; is {self.path} an audit directory?") from None


def run_audit(
    spec: AuditSpec,
    *,
    out: str | Path,
    resume: bool = False,
    backend: str = "local",
    backend_options: dict[str, Any] | None = None,
    on_done: Callable[[Job, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run (or finish) an audit and write its tables; returns the summary.

    Args:
        spec: what to run.
        out: the audit directory.
        resume: skip cells already finished in `out` (the spec must be the same).
        backend: name in BACKENDS.
        backend_options: workers, ray_address, retries.
        on_done: called with (job, finished count, total) after each job.
    Raises:
        ConfigError / InputError: a bad spec, or `out` holding a different audit or (without
            --resume) this one.
        AuditIncomplete: some cells failed; the others are saved and `--resume` retries them.
    """
    run_backend = BACKENDS.get(backend)
    base, settings = plan(spec)
    adir = AuditDir(out)
    record = {"audit_version": AUDIT_VERSION, "spec": asdict(spec), "settings": [asdict(s) for s in settings]}
    existing = adir.read_spec()
    if existing is not None:
        if existing.get("spec") != record["spec"]:
            raise InputError(f"{out} holds a different audit ({existing.get('spec', {}).get('recipe')}); choose another --out")
        if not resume:
            raise InputError(f"{out} already holds this audit; pass --resume to finish it")
    elif adir.path.exists() and any(adir.path.iterdir()):
        raise InputError(f"{out} exists and is not an audit directory; choose another --out")
    record["provenance"] = provenance(seed=spec.seed, device=spec.device)
    write_json(adir.path / "audit.json", record if existing is None else existing)

    by_id = {s.id: s for s in settings}
    jobs = [Job("cell", s.id, b) for s in settings for b in range(s.batches)]
    utility_owner: dict[str, str] = {}
    for s in settings:
        if s.utility_key and s.utility_key not in utility_owner:
            utility_owner[s.utility_key] = s.id
    jobs += [Job("utility", key, 0) for key in utility_owner]
    # utility jobs run under the setting that first needs them
    job_settings = {**by_id, **{key: by_id[sid] for key, sid in utility_owner.items()}}
    todo = [j for j in jobs if not adir.finished(j)]
    failures: list[tuple[Job, BaseException]] = []
    count = len(jobs) - len(todo)
    started = time.perf_counter()

    def done(job: Job, result: dict[str, bytes] | BaseException) -> None:
        nonlocal count
        if isinstance(result, BaseException):
            failures.append((job, result))
        else:
            adir.place(job, result)
        count += 1
        if on_done is not None:
            on_done(job, count, len(jobs))

    try:
        run_backend(spec, job_settings, todo, done, backend_options or {})
    except KeyboardInterrupt:
        raise Interrupted(f"audit interrupted: {count} of {len(jobs)} cells are finished and saved in {out}; --resume finishes it") from None
    finally:
        summary = collect(adir.path)
        summary["wall_seconds"] = round(time.perf_counter() - started, 2)
        summary["jobs_run"] = len(todo) - len(failures)
        write_json(adir.path / "summary.json", summary)
    if failures:
        job, err = failures[0]
        raise AuditIncomplete(f"{len(failures)} of {len(todo)} cell(s) failed, first {job.setting} batch {job.batch}: {err}; the rest are saved, --resume retries them")
    return summary


class AuditIncomplete(LeakkitError):
    """Some cells failed; finished cells are saved."""

    exit_code = 4


# --- tables --------------------------------------------------------------------------------
def collect(path: str | Path) -> dict[str, Any]:
    """Read every finished cell of an audit directory and summarise each setting.

    Writes samples.csv and summary.csv; returns {"settings": [...], "recipe": ...}.
    """
    adir = AuditDir(path)
    record = adir.read_spec()
    if record is None:
        raise InputError(f"{path} is not an audit directory (no audit.json)")
    spec = AuditSpec(**record["spec"])
    settings = [Setting(**s) for s in record["settings"]]
    rows_all: list[dict[str, Any]] = []
    out = []
    for s in settings:
        recipe = spec.resolve(spec.recipe, [*s.grid, f"defense={s.defense}"])
        rows: list[dict[str, Any]] = []
        for b in range(s.batches):
            f = adir.cell(Job("cell", s.id, b)) / "metrics.json"
            if f.is_file():
                rows += json.loads(f.read_text(encoding="utf-8"))["samples"]
        util = None
        if s.utility_key:
            uf = adir.cell(Job("utility", s.utility_key)) / "utility.json"
            util = json.loads(uf.read_text(encoding="utf-8")) if uf.is_file() else None
        summary = summarize_setting(rows, recipe)
        summary.update({"setting": s.id, "label": s.label, "series": s.series, "strength": s.strength, "defense": s.defense,
                        "grid": s.grid, "batches_done": len({r["batch"] for r in rows}), "batches": s.batches,
                        "epsilon": epsilon_of(s.defense), "utility_accuracy": util["accuracy"] if util else None, "utility": util})
        out.append(summary)
        for r in rows:
            rows_all.append({"setting": s.id, "label": s.label, **{k: v for k, v in r.items() if not isinstance(v, (list, dict))}})
    _write_csv(adir.path / "samples.csv", rows_all)
    _write_csv(adir.path / "summary.csv", [{k: v for k, v in s.items() if k not in ("utility", "grid")} for s in out])
    return {"recipe": spec.recipe, "spec": record["spec"], "settings": out}


def summarize_setting(rows: list[dict[str, Any]], recipe: Recipe) -> dict[str, Any]:
    """Success rate with its 95 % Wilson interval, score quantiles, label accuracy, attacker time.

    The score and its threshold are the task's modality's (`leakkit.tasks.MODALITIES`), as the recipe sets them.
    """
    modality = modality_of(recipe.task.name)
    score, threshold = modality.score, recipe.metrics.threshold(modality.score)
    text = modality.name == "text"
    tiers: dict[str, Any] = {}
    if not text:  # images: success is a leakage tier (recognisable by default), every tier reported
        tiers = metrics.tier_rates(rows, recipe.metrics.tiers())
        tiers.pop("n")
        tiers["success_tier"] = recipe.metrics.success_tier
        tiers["tier_thresholds"] = dataclasses.asdict(recipe.metrics.tiers())
    n = len(rows)
    values = [float(r[score]) for r in rows if r.get(score) is not None]
    if text:
        ok = sum(1 for r in rows if r.get(score) is not None and r[score] >= threshold)
    else:
        reached = metrics.TIERS[: metrics.TIERS.index(recipe.metrics.success_tier) + 1]
        ok = sum(1 for r in rows if (r.get("tier") or "none") in reached)
    lo, hi = metrics.wilson_interval(ok, n)

    def q(p: float) -> float | None:
        return float(np.quantile(values, p)) if values else None

    secs = [r["seconds"] for r in rows if r.get("seconds") is not None]
    per_batch: dict[int, float] = {r["batch"]: r["seconds"] for r in rows if r.get("seconds") is not None}
    return {
        "n": n,
        "score": score,
        "success_threshold": threshold,
        "successes": ok,
        "success_rate": ok / n if n else None,
        "success_ci95": [lo, hi],
        "score_median": q(0.5),
        "score_q25": q(0.25),
        "score_q75": q(0.75),
        "label_accuracy": (sum(1 for r in rows if r.get("label_correct")) / n) if n else None,
        "attacker_seconds_median": float(statistics.median(list(per_batch.values()))) if secs else None,
        "exact_rate": (sum(1 for r in rows if r.get("exact")) / n) if (text and n) else None,
        **tiers,
    }


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    tmp.replace(path)
