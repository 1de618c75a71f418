"""Command line: `leakkit run | list | observe | attack`.

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

    run = sub.add_parser("run", help="simulate a client, attack its gradient, score the recovery")
    common(run)
    run.add_argument("--input", help="an image file or folder of images; for text recipes a .txt (one sentence per line) or .tsv")
    run.add_argument("--samples", type=int, help="number of images to attack (default: the recipe's data.samples, or every --input image)")
    run.add_argument("--out", help="run directory (default runs/RECIPE-TIMESTAMP)")

    obs = sub.add_parser("observe", help="victim side: write the shared gradient of one client step (safetensors)")
    common(obs)
    obs.add_argument("--input", help="an image file or folder, or a .txt/.tsv of sentences (default: the recipe's data)")
    obs.add_argument("--out", required=True, help="output .safetensors file")

    att = sub.add_parser("attack", help="attacker side: recover inputs from a saved gradient file")
    common(att, optional_recipe=True)
    att.add_argument("--task", help="attack a captured update of this task (masked-lm, sequence-classification) with the bert-exact recipe")
    att.add_argument("--model", help="the model the update came from (directory, cached hub id, or minilm); same as model=...")
    att.add_argument("--gradients", required=True, help="a .safetensors file written by `leakkit observe`")
    att.add_argument("--out", help="run directory (default runs/RECIPE-attack-TIMESTAMP)")

    lst = sub.add_parser("list", help="recipes, tasks, models, objectives, label strategies, ...")
    lst.add_argument("what", nargs="?", default="all", help="one of: all, " + ", ".join(_CATALOGUES))
    return p, {"run": run, "observe": obs, "attack": att, "list": lst}


def _catalogue_recipes() -> list[tuple[str, str]]:
    from leakkit.config import bundled_recipes, load_recipe

    return [(name, load_recipe(name).description) for name in sorted(bundled_recipes())]


def _registry(module: str, attr: str) -> Callable[[], list[tuple[str, str]]]:
    def rows() -> list[tuple[str, str]]:
        import importlib

        return getattr(importlib.import_module(module), attr).describe()

    return rows


_CATALOGUES: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "recipes": _catalogue_recipes,
    "tasks": _registry("leakkit.tasks", "TASKS"),
    "models": _registry("leakkit.tasks", "MODELS"),
    "objectives": _registry("leakkit.objectives", "OBJECTIVES"),
    "layer-weights": _registry("leakkit.objectives", "LAYER_WEIGHTS"),
    "labels": _registry("leakkit.labels", "LABELS"),
    "optimizers": _registry("leakkit.optimizers", "OPTIMIZERS"),
    "schedules": _registry("leakkit.optimizers", "SCHEDULES"),
    "priors": _registry("leakkit.priors", "PRIORS"),
    "data": _registry("leakkit.data", "SOURCES"),
    "text-data": _registry("leakkit.textdata", "TEXT_SOURCES"),
    "decoders": _registry("leakkit.decoders", "TOKEN_DECODERS"),
    "text-methods": _registry("leakkit.text_attack", "TEXT_METHODS"),
}


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from leakkit.errors import ConfigError

    if args.what != "all" and args.what not in _CATALOGUES:
        raise ConfigError(f"unknown catalogue {args.what!r}; valid: all, {', '.join(_CATALOGUES)}")
    console = _console()
    for what in _CATALOGUES if args.what == "all" else [args.what]:
        table = Table(title=what, title_justify="left", show_header=False, box=None, pad_edge=False)
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("description")
        for name, desc in _CATALOGUES[what]():
            table.add_row(name, desc)
        console.print(table)
        console.print()
    return 0


def _progress(args: argparse.Namespace, console: Any) -> Any:
    if args.quiet:
        return None
    from leakkit.progress import RichProgress

    return RichProgress(console)


def _default_out(recipe: str, suffix: str = "") -> str:
    from pathlib import Path

    return f"runs/{Path(recipe).stem}{suffix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def cmd_run(args: argparse.Namespace) -> int:
    from leakkit.config import load_recipe
    from leakkit.experiment import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    out = args.out or _default_out(args.recipe)
    console = _console()
    progress = _progress(args, console)
    with progress or contextlib.nullcontext():
        result = run_recipe(recipe, out=out, input_path=args.input, samples=args.samples, seed=args.seed, device=args.device, progress=progress)
    if not args.quiet:
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
    from leakkit.config import load_recipe
    from leakkit.experiment import build_task, load_samples, make_batches
    from leakkit.victim import observe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.task.name in ("masked-lm", "sequence-classification"):
        from leakkit.text_experiment import build_text, client_update, load_text_samples, make_text_batch

        text_task = build_text(recipe, seed=args.seed)
        sentences = load_text_samples(recipe, input_path=args.input, samples=recipe.data.batch_size)[: recipe.data.batch_size]
        observation = client_update(text_task, make_text_batch(text_task, sentences, seed=args.seed), recipe)
    else:
        task = build_task(recipe, seed=args.seed)
        pool = load_samples(recipe, input_path=args.input, samples=recipe.data.batch_size, seed=args.seed)
        batch = make_batches(recipe, pool, seed=args.seed)[0]
        inputs = task.from_pixels(batch.pixels.double()).float()
        observation = observe(task, inputs, batch.labels, reduction=recipe.data.reduction, model_name=recipe.task.model)
    observation.extra.update({"recipe": recipe.name, "model_seed": args.seed})
    path = observation.save(args.out)
    if not args.quiet:
        _console().print(f"wrote the shared gradient of {observation.batch_size} example(s) to {path}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from leakkit.config import load_recipe
    from leakkit.experiment import attack_only
    from leakkit.observation import Observation

    from leakkit.errors import ConfigError

    overrides = list(args.overrides)
    if args.task:
        overrides.insert(0, f"task.name={args.task}")
    if args.model:
        overrides.insert(0, f"task.model={args.model}")
    if args.recipe is None and not args.task:
        raise ConfigError("name a recipe, or the task of a captured update with --task")
    if args.task and args.task not in ("masked-lm", "sequence-classification"):
        raise ConfigError(f"--task must be masked-lm or sequence-classification, got {args.task!r}")
    name = args.recipe or "bert-exact"
    recipe = load_recipe(name, overrides)
    observation = Observation.load(args.gradients)
    out = args.out or _default_out(name, "-attack")
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "observe": cmd_observe,
    "attack": cmd_attack,
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


def _one_line_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"leakkit: warning: {message}", file=sys.stderr)
