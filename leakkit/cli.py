"""Command line: `leakkit run | list | observe | attack | audit | report`.

User mistakes end with one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from datetime import datetime
from typing import Any, Callable, Sequence


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog="leakkit", description="Reconstruct private training data from shared gradients and measure the leak.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, optional_recipe: bool = False) -> None:
        sp.add_argument("recipe", nargs="?" if optional_recipe else None, help="bundled recipe name (see `leakkit list recipes`) or path to a recipe .toml")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="override any recipe field, e.g. attack.steps=2000")
        sp.add_argument("--seed", type=int, default=0, help="fixes model weights, data draw and attack start (default 0)")
        sp.add_argument("--device", default="cpu", help="cpu (default) or cuda")
        sp.add_argument("--quiet", action="store_true", help="no progress bar or summary table")

    def out_policy(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--resume", action="store_true", help=f"continue the {what} in --out, skipping what is finished")
        sp.add_argument("--overwrite", action="store_true", help=f"replace the {what} in --out")

    def defense_option(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--defense", action="append", default=[], metavar="SPEC",
                        help="client-side defense, e.g. noise:std=1e-3 or prune:ratio=0.5 (repeat or join with + to compose; see `leakkit list defenses`)")

    run = sub.add_parser("run", help="simulate a client, attack its gradient, score the recovery")
    common(run)
    defense_option(run)
    run.add_argument("--input", help="an image file or folder of images; for text recipes a .txt (one sentence per line) or .tsv")
    run.add_argument("--samples", type=int, help="number of images to attack (default: the recipe's data.samples, or every --input image)")
    run.add_argument("--out", help="run directory (default runs/RECIPE-TIMESTAMP)")
    out_policy(run, "run")

    obs = sub.add_parser("observe", help="victim side: write the (defended) shared update of one client round (safetensors)")
    common(obs)
    defense_option(obs)
    obs.add_argument("--input", help="an image file or folder, or a .txt/.tsv of sentences (default: the recipe's data)")
    obs.add_argument("--out", required=True, help="output .safetensors file")
    obs.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    att = sub.add_parser("attack", help="attacker side: recover inputs from a saved gradient file")
    common(att, optional_recipe=True)
    att.add_argument("--task", help="attack a captured update of this text task (see `leakkit list tasks`) with the bert-exact recipe")
    att.add_argument("--model", help="the model the update came from (directory, cached hub id, or minilm); same as model=...")
    source = att.add_mutually_exclusive_group(required=True)
    source.add_argument("--gradients", help="a .safetensors update: written by `leakkit observe`, or captured from Flower")
    source.add_argument("--checkpoints", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="two safetensors state_dicts around one client round; the protocol comes from client.local_lr, "
                             "client.local_steps, data.batch_size (overrides)")
    att.add_argument("--out", help="run directory (default runs/RECIPE-attack-TIMESTAMP)")
    att.add_argument("--overwrite", action="store_true", help="replace the run in --out if it holds one")

    aud = sub.add_parser("audit", help="success rates of a recipe over a grid of defenses / settings, with utility, resumable")
    common(aud)
    defense_option(aud)
    aud.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="sweep a recipe field, e.g. data.batch_size=1,2,4 (repeat for a product)")
    aud.add_argument("--input", help="as for `leakkit run`")
    aud.add_argument("--from", dest="source", metavar="CAPTURE", help="score every update of a `leakkit flower simulate` capture instead of simulating clients")
    aud.add_argument("--samples", type=int, help="examples attacked per setting (default: the recipe's data.samples)")
    aud.add_argument("--out", help="audit directory (default audits/RECIPE-TIMESTAMP)")
    out_policy(aud, "audit")
    aud.add_argument("--backend", default="local", help="local (default) or ray")
    aud.add_argument("--workers", type=int, help="Ray CPUs to start locally (default: all cores)")
    aud.add_argument("--ray-address", help="address of an existing Ray cluster (default: $RAY_ADDRESS, else start one)")
    aud.add_argument("--no-utility", action="store_true", help="skip training the model under each defense")
    aud.add_argument("--no-baseline", action="store_true", help="do not add the undefended setting as the reference row")
    aud.add_argument("--no-report", action="store_true", help="do not write plots and report.html at the end")

    fl = sub.add_parser("flower", help="a Flower simulation whose server captures every client's update (needs the flower extra)")
    fl.add_argument("action", choices=["simulate"], help="simulate: run a Flower simulation with Flower's simulation engine")
    common(fl)
    defense_option(fl)
    fl.add_argument("--clients", type=int, default=2, help="number of Flower clients (supernodes), each training every round (default 2)")
    fl.add_argument("--rounds", type=int, default=1, help="FedAvg rounds (default 1)")
    fl.add_argument("--input", help="images or sentences for the clients (default: the recipe's data)")
    fl.add_argument("--out", required=True, help="capture directory: round-R/client-K.safetensors, round-R/global.safetensors, truth/")
    fl.add_argument("--workers", type=int, help="CPUs the simulation may use (default: all)")

    rep = sub.add_parser("report", help="plots and an offline HTML report of an audit directory")
    rep.add_argument("audit_dir", help="a directory written by `leakkit audit`")
    rep.add_argument("--quiet", action="store_true")

    lst = sub.add_parser("list", help="recipes, tasks, models, objectives, label strategies, ...")
    lst.add_argument("what", nargs="?", default="all", help="one of: all, " + ", ".join(_CATALOGUES))
    lst.add_argument("--json", action="store_true", help="machine-readable: every entry with its description and parameters")
    return p, {"run": run, "observe": obs, "attack": att, "audit": aud, "report": rep, "list": lst, "flower": fl}


def _catalogue_recipes() -> list[tuple[str, str]]:
    from leakkit.run.config import bundled_recipes, load_recipe

    return [(name, load_recipe(name).description) for name in sorted(bundled_recipes())]


def _catalogue_attacks() -> list[tuple[str, str]]:
    from leakkit.run.attacks import describe

    return describe()


def _registry(module: str, attr: str) -> Callable[[], list[tuple[str, str]]]:
    def rows() -> list[tuple[str, str]]:
        import importlib

        return getattr(importlib.import_module(module), attr).describe()

    return rows


_CATALOGUES: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "recipes": _catalogue_recipes,
    "tasks": _registry("leakkit.tasks", "TASKS"),
    "models": _registry("leakkit.tasks", "MODELS"),
    "objectives": _registry("leakkit.engine.objectives", "OBJECTIVES"),
    "layer-weights": _registry("leakkit.engine.objectives", "LAYER_WEIGHTS"),
    "labels": _registry("leakkit.engine.labels", "LABELS"),
    "optimizers": _registry("leakkit.engine.optimizers", "OPTIMIZERS"),
    "schedules": _registry("leakkit.engine.optimizers", "SCHEDULES"),
    "priors": _registry("leakkit.engine.priors", "PRIORS"),
    "data": _registry("leakkit.vision.data", "SOURCES"),
    "text-data": _registry("leakkit.text.data", "TEXT_SOURCES"),
    "decoders": _registry("leakkit.text.decoders", "TOKEN_DECODERS"),
    "attacks": _catalogue_attacks,
    "defenses": _registry("leakkit.client.defenses", "DEFENSES"),
    "backends": _registry("leakkit.audit.grid", "BACKENDS"),
}


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def cmd_list(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from leakkit.errors import ConfigError

    if args.what != "all" and args.what not in _CATALOGUES:
        raise ConfigError(f"unknown catalogue {args.what!r}; valid: all, {', '.join(_CATALOGUES)}")
    chosen = list(_CATALOGUES) if args.what == "all" else [args.what]
    if args.json:
        import json

        out = {what: [{"name": n, "description": d, "parameters": _parameters(what, n)} for n, d in _CATALOGUES[what]()] for what in chosen}
        if args.what == "all":
            from leakkit.run.config import recipe_keys

            out["recipe-keys"] = recipe_keys()
        print(json.dumps(out, indent=2, default=str))
        return 0
    console = _console()
    for what in chosen:
        table = Table(title=what, title_justify="left", show_header=False, box=None, pad_edge=False)
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("description")
        for name, desc in _CATALOGUES[what]():
            table.add_row(escape(name), escape(desc))
        console.print(table)
        console.print()
    return 0


def _defense_parameters(name: str) -> dict[str, Any]:
    from leakkit.client.defenses import DEFENSES

    d = DEFENSES.get(name)
    return {k: {"default": p.default, "low": p.low, "high": p.high, "low_open": p.low_open, "integer": p.integer, "swept": k == d.strength}
            for k, p in d.params.items()}


def _recipe_parameters(name: str) -> dict[str, Any]:
    from leakkit.run.config import load_recipe

    return load_recipe(name).to_dict()


# what `list --json` tells a script about an entry beyond its description, per catalogue
_PARAMETERS: dict[str, Callable[[str], dict[str, Any]]] = {"defenses": _defense_parameters, "recipes": _recipe_parameters}


def _parameters(catalogue: str, name: str) -> dict[str, Any]:
    return _PARAMETERS[catalogue](name) if catalogue in _PARAMETERS else {}


def _progress(args: argparse.Namespace, console: Any) -> Any:
    if args.quiet:
        return None
    from leakkit.run.progress import RichProgress

    return RichProgress(console)


def _default_out(recipe: str, suffix: str = "") -> str:
    from pathlib import Path

    return f"runs/{Path(recipe).stem}{suffix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _claim(args: argparse.Namespace, default: str, what: str) -> Any:
    """--out, checked: a new directory, or with --resume/--overwrite an existing one (see `claim_output`)."""
    from leakkit.errors import ConfigError
    from leakkit.run.rundir import claim_output

    resume = getattr(args, "resume", False)
    if resume and not args.out:
        raise ConfigError(f"--resume needs --out: the {what} directory to continue")
    audit = what == "audit"
    return claim_output(args.out or default, resume=resume, overwrite=args.overwrite, what=what,
                        marker="audit.json" if audit else "config.json", checks_itself=audit)


def _with_defenses(overrides: list[str], defenses: list[str]) -> list[str]:
    """`--defense A --defense B` composes A then B after any defense the recipe sets."""
    if not defenses:
        return list(overrides)
    return list(overrides) + ["defense=" + "+".join(d.strip() for d in defenses)]


def cmd_run(args: argparse.Namespace) -> int:
    from leakkit.run.config import load_recipe
    from leakkit.run.runner import run_recipe

    recipe = load_recipe(args.recipe, _with_defenses(args.overrides, args.defense))
    out = str(_claim(args, _default_out(args.recipe), "run"))
    console = _console()
    progress = _progress(args, console)
    with progress or contextlib.nullcontext():
        result = run_recipe(recipe, out=out, input_path=args.input, samples=args.samples, seed=args.seed, device=args.device,
                            progress=progress, resume=args.resume)
    if not args.quiet:
        if args.input:
            read = result["input_read"]
            console.print(f"read {read['examples']} example(s) from {args.input}, {read['labelled']} with a label"
                          + ("" if read["labelled"] else " (labels are drawn with the seed)"))
        _print_summary(console, recipe.name, result, out)
    s = result["summary"]
    if s["diverged"]:
        print(f"leakkit: warning: {s['diverged']} of {s['n']} images diverged on every restart (counted as failures)", file=sys.stderr)
    if s["n"] and s["diverged"] == s["n"]:
        return 3
    return 0


def _print_summary(console: Any, name: str, result: dict[str, Any], out: str) -> None:
    from rich.table import Table

    s = result["summary"]
    if "rouge1_mean" in s:
        _print_text_summary(console, name, s, out)
        return
    lo, hi = s["success_ci95"]

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    table = Table(title=f"{name}: {s['n']} image(s)", title_justify="left")
    for col in ("success (PSNR ≥ %g dB)" % s["success_threshold_psnr"], "95 % CI", "PSNR median", "SSIM median", "label acc.", "s / batch (median)"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{s['successes']}/{s['n']} ({fmt(s['success_rate'], '.0%')})",
        f"{lo:.0%}–{hi:.0%}",
        fmt(s["psnr_median"], ".1f"),
        fmt(s["ssim_median"], ".3f"),
        fmt(s["label_accuracy"], ".0%"),
        fmt(s["seconds_median"], ".2f"),
    )
    console.print(table)
    console.print(f"results: {out}/metrics.json · pictures: {out}/grid.png")


def _print_text_summary(console: Any, name: str, s: dict[str, Any], out: str) -> None:
    from rich.table import Table

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lo, hi = s["exact_ci95"]
    table = Table(title=f"{name}: {s['n']} sentence(s)", title_justify="left")
    for col in ("exact sentences", "95 % CI", "ROUGE-1", "ROUGE-2", "ROUGE-L", "token acc.", "label acc.", "s / batch (median)"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{s['exact']}/{s['n']} ({fmt(s['exact_rate'], '.0%')})", f"{lo:.0%}–{hi:.0%}",
        fmt(s["rouge1_mean"], ".3f"), fmt(s["rouge2_mean"], ".3f"), fmt(s["rougeL_mean"], ".3f"),
        fmt(s["token_accuracy_mean"], ".0%"), fmt(s["label_accuracy"], ".0%"), fmt(s["seconds_median"], ".2f"),
    )
    console.print(table)
    console.print(f"results: {out}/metrics.json · text diff: {out}/diff.txt")


def cmd_observe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from leakkit.errors import InputError
    from leakkit.run.config import load_recipe
    from leakkit.run.runner import observe_recipe

    recipe = load_recipe(args.recipe, _with_defenses(args.overrides, args.defense))
    target = Path(args.out)
    if target.is_dir():
        raise InputError(f"--out {target} is a directory; give a .safetensors file name")
    if target.exists() and not args.overwrite:
        raise InputError(f"--out {target} exists; pass --overwrite to replace it")
    observation = observe_recipe(recipe, input_path=args.input, seed=args.seed)
    path = observation.save(target)
    if not args.quiet:
        kind = "weight difference" if observation.extra.get("fedavg") else "gradient"
        defended = "" if recipe.defense == "none" else f" (defense {recipe.defense})"
        _console().print(f"wrote the shared {kind} of {observation.batch_size} example(s){defended} to {path}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from leakkit.client.observation import Observation
    from leakkit.errors import ConfigError
    from leakkit.run.config import load_recipe
    from leakkit.run.runner import attack_only, captured_weights, observation_from_checkpoints
    from leakkit.tasks import tasks_of

    overrides = list(args.overrides)
    if args.task:
        overrides.insert(0, f"task.name={args.task}")
    if args.model:
        overrides.insert(0, f"task.model={args.model}")
    if args.recipe is None and not args.task:
        raise ConfigError("name a recipe, or the task of a captured update with --task")
    if args.task and args.task not in tasks_of("text"):
        raise ConfigError(f"--task must be one of {', '.join(tasks_of('text'))}, got {args.task!r}")
    name = args.recipe or "bert-exact"
    if args.checkpoints:
        weights = next((o.split("=", 1)[1] for o in overrides if o.startswith("task.weights=")), None)
        if weights not in (None, args.checkpoints[0]):
            raise ConfigError("with --checkpoints the model's weights are BEFORE; drop task.weights")
        recipe = load_recipe(name, overrides + [f"task.weights={args.checkpoints[0]}"])
        observation = observation_from_checkpoints(recipe, *args.checkpoints, seed=args.seed)
    else:
        observation = Observation.load(args.gradients)
        recipe = load_recipe(name, overrides + captured_weights(observation, args.gradients, overrides))
    out = str(_claim(args, _default_out(name, "-attack"), "run"))
    console = _console()
    progress = _progress(args, console)
    with progress or contextlib.nullcontext():
        result = attack_only(recipe, observation, out=out, seed=args.seed, device=args.device, progress=progress)
    if not args.quiet:
        r = result["recovery"]
        if "sentences" in r:
            for sentence in r["sentences"]:
                console.print(f"  {sentence}")
            console.print(f"recovered {len(r['sentences'])} sentence(s), gradient distance {r['gradient_distance']:.2e} ({r['status']}) -> {out}")
        else:
            console.print(f"recovered {observation.batch_size} input(s), labels {r['labels']}, gradient distance {r['gradient_distance']:.2e} ({r['status']}) -> {out}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from leakkit.audit.grid import AuditSpec, run_audit

    from leakkit.errors import ConfigError

    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    spec = AuditSpec(
        recipe=args.recipe, overrides=list(args.overrides), grid=list(args.grid), defenses=list(args.defense),
        samples=args.samples, input=args.input, seed=args.seed, device=args.device, utility=not args.no_utility,
        baseline=not args.no_baseline,
    )
    if args.source:
        if args.grid or args.defense or args.input or args.samples is not None:
            raise ConfigError("--from scores a capture as it was made: drop --grid, --defense, --input and --samples")
        spec = AuditSpec.from_capture(spec, args.source)
    out = str(_claim(args, _default_out(args.recipe).replace("runs/", "audits/", 1), "audit"))
    console = _console()
    progress = None if args.quiet else _audit_progress(console)
    with progress or contextlib.nullcontext():
        summary = run_audit(
            spec, out=out, resume=args.resume, backend=args.backend,
            backend_options={"workers": args.workers, "ray_address": args.ray_address},
            on_done=progress.advance if progress else None,
        )
    if not args.no_report:
        from leakkit.audit.report import write_report

        write_report(out)
    if not args.quiet:
        _print_audit(console, summary, out)
        _utility_hint(console, spec)
    return 0


def _utility_hint(console: Any, spec: Any) -> None:
    """Say why an audit has no utility column when the user did not turn it off."""
    from leakkit.audit.utility import utility_available

    if not spec.utility:
        return
    recipe = spec.resolve(spec.recipe)
    if utility_available(recipe):
        return
    whys = {"sequence-classification": "a text classifier's utility needs labelled sentences: utility.data=FILE.tsv",
            "masked-lm": "a masked LM's utility needs sentences to fine-tune on: utility.data=FILE"}
    why = whys.get(recipe.task.name, f"no utility measure for task {recipe.task.name}")
    console.print(f"utility not measured ({why})")


class _audit_progress:
    """A rich progress bar over an audit's jobs."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("audit"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
        self._task: Any = None

    def __enter__(self) -> "_audit_progress":
        self._p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._p.__exit__(*exc)

    def advance(self, job: Any, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._p.add_task("cells", total=total)
        self._p.update(self._task, completed=done, total=total)


def _print_audit(console: Any, summary: dict[str, Any], out: str) -> None:
    from rich.table import Table

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    rows = summary["settings"]
    first = rows[0] if rows else {}
    score = "ROUGE-1" if first.get("score") == "rouge1" else "PSNR"
    spec = ".3f" if score == "ROUGE-1" else ".1f"
    done, total = sum(r["batches_done"] for r in rows), sum(r["batches"] for r in rows)
    partial = "" if done == total else f" · INCOMPLETE: {done} of {total} cells"
    from leakkit.audit.report import success_words

    table = Table(title=f"{summary['recipe']}: success = {success_words(first) if rows else '-'}{partial}", title_justify="left")
    grid = any(r["grid"] for r in rows)
    utility = any(r["utility_accuracy"] is not None for r in rows)
    private = any(r.get("epsilon") is not None for r in rows)
    names = ([("setting", lambda r: " ".join(r["grid"]))] if grid else []) + [("defense", lambda r: r["defense"])]
    for name, get in names:  # full names, never cut: the numbers get the room that is left
        table.add_column(name, justify="left", no_wrap=True, min_width=max(len(name), *(len(get(r)) for r in rows)) if rows else None)
    tiers = "exact_rate" in first and first.get("success_tier") is not None
    for col in ("n", "success [95 % CI]") + (("% exact/close/recog.",) if tiers else ()) + (f"{score} median [IQR]", "labels", "s/batch") + (("ε",) if private else ()) + (("utility",) if utility else ()):
        table.add_column(col, justify="right")
    for r in rows:
        lo, hi = r["success_ci95"]
        table.add_row(
            *[get(r) for _, get in names], str(r["n"]), f"{fmt(r['success_rate'], '.0%')} [{lo:.0%}–{hi:.0%}]",
            *(("/".join(fmt(None if r[k] is None else 100 * r[k], ".0f") for k in ("exact_rate", "close_rate", "recognisable_rate")),) if tiers else ()),
            f"{fmt(r['score_median'], spec)} [{fmt(r['score_q25'], spec)}–{fmt(r['score_q75'], spec)}]",
            fmt(r["label_accuracy"], ".0%"), fmt(r["attacker_seconds_median"], ".1f"),
            *((fmt(r.get("epsilon"), ".3g"),) if private else ()),
            *((fmt(r["utility_accuracy"], ".1%"),) if utility else ()),
        )
    console.print(table)
    console.print(f"tables: {out}/summary.csv, {out}/samples.csv · report: {out}/report.html")


def cmd_flower(args: argparse.Namespace) -> int:
    from leakkit.integrations.flower_simulation import simulate

    index = simulate(
        args.recipe, _with_defenses(args.overrides, args.defense), clients=args.clients, rounds=args.rounds,
        out=args.out, input_path=args.input, seed=args.seed, workers=args.workers,
    )
    if not args.quiet:
        sim = index["simulation"]
        _console().print(
            f"Flower {index['flwr']}: {sim['clients']} client(s) x {sim['rounds']} round(s), {len(index['updates'])} update(s) captured "
            f"-> {args.out} (score them: leakkit audit {args.recipe} --from {args.out})"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from leakkit.audit.report import write_report

    path = write_report(args.audit_dir)
    if not args.quiet:
        _console().print(f"wrote {path}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "audit": cmd_audit,
    "report": cmd_report,
    "run": cmd_run,
    "observe": cmd_observe,
    "attack": cmd_attack,
    "flower": cmd_flower,
    "list": cmd_list,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in commands:
        # overrides (positionals) may come after options: `run dlg --samples 5 attack.steps=10`
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command, args.version = argv[0], False
    else:
        args = parser.parse_args(argv)
    if args.version:
        from leakkit import __version__

        print(f"leakkit {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    from leakkit.errors import LeakkitError

    warnings.simplefilter("default")
    warnings.showwarning = _one_line_warning
    try:
        return COMMANDS[args.command](args)
    except LeakkitError as e:
        print(f"leakkit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("leakkit: interrupted", file=sys.stderr)
        return 130


_WARNED: set[str] = set()


def _one_line_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    # each distinct warning once per command: an audit builds the same model for every cell
    text = str(message)
    if text not in _WARNED:
        _WARNED.add(text)
        print(f"leakkit: warning: {text}", file=sys.stderr)
