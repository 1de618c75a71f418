"""leakkit against breaching 0.1.2 on the same images, weights and gradients, in one process.

breaching (Geiping et al., github.com/JonasGeiping/breaching) is the peer a user would pick instead.
Its attacks do not use torchvision, but its package imports torchvision at import time, and torchvision
cannot be imported here (see ../shared/DESIGN.md). For this measurement only, a stand-in module
answers breaching's import-time references to torchvision (a class to subclass, functions never
called by the attacks); nothing of it runs during an attack. Where a real torchvision imports, the
stand-in is not installed.

Setup (not part of leakkit's dependencies; breaching's own requirements would pull torchvision):

    .venv/bin/pip install --no-deps breaching==0.1.2 && .venv/bin/pip install hydra-core

Usage:
    python bench/peers.py                                  # ReLU ResNet-8, 8 held-out images, 2,000 steps each
    python bench/peers.py --models resnet-relu,lenet-relu --images 8 --steps 2000

Each row: one model; every image is attacked by leakkit's recipes for that model and by breaching's
Inverting Gradients (its shipped config with max_iterations set to the same step budget, labels
recovered by breaching itself, as leakkit recovers its own). PSNR/SSIM are scored by leakkit's
metrics against the truth, which neither attack sees. Prints a table, writes bench/results/peers.json.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leakkit.errors import ConfigError  # noqa: E402
from leakkit.metrics import score_image  # noqa: E402
from leakkit.run.attacks import ATTACKS  # noqa: E402
from leakkit.run.config import load_recipe  # noqa: E402
from leakkit.run.rundir import provenance, write_json  # noqa: E402
from leakkit.run.runner import attack, hooks_for  # noqa: E402

# leakkit's attacks per model (recipe name, overrides); the strongest that applies is listed first
LEAKKIT: dict[str, list[tuple[str, list[str]]]] = {
    "resnet-relu": [("inverting-gradients", [])],
    "lenet-relu": [("rgap", []), ("inverting-gradients", [])],
    "lenet": [("rgap", []), ("dlg", [])],
}


class _StandIn(types.ModuleType):
    """A module whose every attribute is a stand-in: a class for capitalised or private names (breaching
    subclasses torchvision.models.densenet._DenseLayer at import), a submodule otherwise."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper() or name.startswith("_"):
            value: Any = type(name, (torch.nn.Module,), {})
        else:
            value = _StandIn(f"{self.__name__}.{name}")
            sys.modules[value.__name__] = value
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandIn(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # type: ignore[attr-defined]


def import_breaching() -> Any:
    """breaching, with the torchvision stand-in where the real one does not import."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StandInFinder())
    try:
        import breaching
    except ImportError as e:
        raise SystemExit(f"breaching is not installed ({e}); see this script's docstring for the setup line")
    return breaching


def breaching_ig(breaching: Any, task: Any, observation: Any, steps: int, seed: int) -> tuple[torch.Tensor, float]:
    """breaching's Inverting Gradients on one leakkit observation. Returns (normalised inputs [1, C, H, W], seconds)."""
    from omegaconf import OmegaConf

    cfg = breaching.get_attack_config("invertinggradients", overrides=[f"optim.max_iterations={steps}", f"optim.callback={steps + 1}"])
    model = task.model
    names = [n for n, _ in model.named_parameters()]
    grads = observation.upcast().gradients
    missing = [n for n in names if n not in grads]
    if missing:
        raise SystemExit(f"the observation lacks {missing[0]}: breaching matches every parameter's gradient")
    mean = task.mean.flatten().tolist()
    std = task.std.flatten().tolist()
    meta = OmegaConf.create({"shape": list(task.input_shape), "mean": mean, "std": std, "modality": "vision", "classes": task.num_classes})
    setup = {"dtype": torch.float, "device": torch.device("cpu")}
    attacker = breaching.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), cfg, setup)
    payload = [{"parameters": [p.detach().float() for p in model.parameters()], "buffers": [b for b in model.buffers()] or None, "metadata": meta}]
    shared = [{"gradients": [grads[n].float() for n in names], "buffers": None,
               "metadata": {"num_data_points": observation.batch_size, "labels": None, "local_hyperparams": None}}]
    torch.manual_seed(seed)
    started = time.perf_counter()
    result, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    return result["data"].detach().double(), time.perf_counter() - started


def _score(task: Any, pixels: torch.Tensor, inputs: torch.Tensor) -> dict[str, Any]:
    """PSNR, SSIM and leakage tier (against the image's flat guess too), as leakkit's runner scores."""
    rec = task.to_pixels(inputs.double())[0].float().numpy()
    truth = pixels[0].float().numpy()
    return score_image(truth, rec)


def bench_model(model: str, images: int, steps: int, seed: int, breaching: Any) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    attackers = LEAKKIT[model]
    first = load_recipe(attackers[0][0], [f"task.model={model}", *attackers[0][1]])
    hooks = hooks_for(first)
    pool = hooks.load_samples(first, input_path=None, samples=images, seed=seed)
    task = hooks.build_task(first, seed=seed)
    batches = hooks.make_batches(task, first, pool, seed=seed)
    for b, batch in enumerate(batches):
        observation = hooks.client_update(task, first, batches, b, seed=seed)
        row: dict[str, Any] = {"image": b}
        for name, overrides in attackers:
            recipe = load_recipe(name, [f"task.model={model}", *overrides])
            if ATTACKS.get(recipe.method).iterative:  # the shared step budget; a closed form has none
                recipe = load_recipe(name, [f"task.model={model}", *overrides, f"attack.steps={steps}"])
            try:
                recovery = attack(task, observation, recipe, seed=seed + b, device="cpu")
            except ConfigError as e:  # a recipe that does not apply to this model (rgap on a residual network)
                row[name] = {"error": str(e).splitlines()[0]}
                continue
            row[name] = {**_score(task, batch.pixels, recovery.inputs), "seconds": recovery.seconds}
        inputs, seconds = breaching_ig(breaching, task, observation, steps, seed + b)
        row["breaching-ig"] = {**_score(task, batch.pixels, inputs), "seconds": seconds}
        rows.append(row)
        print(f"  {model} image {b}: " + ", ".join(
            f"{k} {v['psnr']:.1f} dB" if "psnr" in v else f"{k} n/a" for k, v in row.items() if k != "image"), flush=True)
    summary: dict[str, Any] = {}
    for key in [n for n, _ in attackers] + ["breaching-ig"]:
        scored = [r[key] for r in rows if "psnr" in r.get(key, {})]
        if scored:
            summary[key] = {
                "n": len(scored),
                "psnr_median": statistics.median(r["psnr"] for r in scored),
                "ssim_median": statistics.median(r["ssim"] for r in scored),
                "recognisable": sum(r["tier"] != "none" for r in scored) / len(scored),
                "seconds_median": statistics.median(r["seconds"] for r in scored),
            }
    return {"model": model, "images": images, "steps": steps, "seed": seed, "summary": summary, "rows": rows}


def main() -> None:
    from rich.console import Console
    from rich.table import Table


    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet-relu", help=f"comma-separated: {', '.join(LEAKKIT)}")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2000, help="optimisation steps for every iterative attack (both libraries)")
    ap.add_argument("--seed", type=int, default=11, help="weights and images (11: held out from every tuned setting)")
    ap.add_argument("--out", default="bench/results/peers.json")
    args = ap.parse_args()
    unknown = [m for m in args.models.split(",") if m not in LEAKKIT]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; models: {', '.join(LEAKKIT)}")
    breaching = import_breaching()
    result: dict[str, Any] = {"provenance": provenance(seed=args.seed, device="cpu"), "breaching": getattr(breaching, "__version__", "0.1.2"), "models": {}}
    for model in args.models.split(","):
        result["models"][model] = bench_model(model, args.images, args.steps, args.seed, breaching)
        write_json(Path(args.out), result)
    table = Table(title=f"leakkit vs breaching 0.1.2, batch 1, seed {args.seed}, {args.steps} steps per iterative attack")
    for col in ("model", "attack", "n", "PSNR median", "SSIM median", "recognisable", "s / image"):
        table.add_column(col, justify="right")
    for model, r in result["models"].items():
        for key, s in r["summary"].items():
            table.add_row(model, key, str(s["n"]), f"{s['psnr_median']:.1f}", f"{s['ssim_median']:.3f}",
                          f"{100 * s['recognisable']:.0f}%", f"{s['seconds_median']:.1f}")
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
