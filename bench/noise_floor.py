"""Where a noise-aware image attack stands when its gradient distance reaches the noise floor.

The floor is the relative gradient distance the client's true image has under the recorded noise
(per-entry variance x shared entries / the update's energy). Stopping there is the discrepancy rule
for noisy inverse problems; this bench shows what it would cost by scoring every step against the
truth (metrics only: the attack never sees it).

    python bench/noise_floor.py --images 8 --seed 0                  # dlg, noise std 1e-3, one restart
    python bench/noise_floor.py --recipe dlg --std 1e-2 --images 4

Prints a table (PSNR when the distance first reaches the floor, at the step the attacker keeps,
and at the end) and writes bench/results/noise_floor.json (override with --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from leakkit.client.defenses import noise_variance
from leakkit.engine.matching import StepEvent
from leakkit.metrics import psnr
from leakkit.run import vision as V
from leakkit.run.config import load_recipe
from leakkit.run.rundir import provenance, write_json
from leakkit.run.runner import attack


def floor_of(observation: Any) -> float:
    """The relative gradient distance of the true input: the noise's expected energy over the update's."""
    grads = list(observation.gradients.values())
    energy = float(sum(g.double().pow(2).sum() for g in grads))
    return noise_variance(observation) * sum(g.numel() for g in grads) / energy


def probe(recipe_name: str, std: float, images: int, seed: int, overrides: list[str]) -> list[dict[str, Any]]:
    recipe = load_recipe(recipe_name, [f"defense=noise:std={std}", "attack.restarts=1", *overrides])
    task = V.build_task(recipe, seed=seed)
    batches = V.make_batches(recipe, V.load_samples(recipe, input_path=None, samples=images, seed=seed), seed=seed)
    rows = []
    for i, batch in enumerate(batches):
        observation = V.client_update(task, recipe, batch, seed=seed, batch_index=i)
        floor = floor_of(observation)
        steps: list[tuple[int, float, float]] = []

        def score(event: StepEvent) -> None:
            pixels = task.to_pixels(event.inputs.double()).float()
            steps.append((event.step, event.distance, psnr(batch.pixels.numpy(), pixels.numpy())))

        recovery = attack(task, observation, recipe, seed=seed, device="cpu", callbacks=[score])
        kept = V.score_images(task, batch, recovery, recipe)[0]["psnr"]
        reached = next((s for s in steps if s[1] <= floor), None)
        rows.append({
            "image": i, "floor": floor, "final_distance": recovery.distance, "steps": len(steps),
            "step_at_floor": reached[0] if reached else None, "psnr_at_floor": reached[2] if reached else None,
            "psnr_kept": kept, "psnr_best_step": max(s[2] for s in steps) if steps else None,
        })
        print(f"image {i}: floor {floor:.3g}, reached at step {rows[-1]['step_at_floor']} "
              f"({rows[-1]['psnr_at_floor'] or float('nan'):.1f} dB); kept {kept:.1f} dB after {len(steps)} steps", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="dlg")
    ap.add_argument("--std", type=float, default=1e-3, help="per-entry noise std the client adds")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "noise_floor.json"))
    ap.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = probe(args.recipe, args.std, args.images, args.seed, args.overrides)
    reached = [r for r in rows if r["psnr_at_floor"] is not None]
    summary = {
        "images": len(rows), "reached_floor": len(reached),
        "psnr_at_floor_median": statistics.median(r["psnr_at_floor"] for r in reached) if reached else None,
        "psnr_kept_median": statistics.median(r["psnr_kept"] for r in rows) if rows else None,
    }
    print(f"{'image':>5} {'floor':>9} {'step@floor':>10} {'dB@floor':>8} {'dB kept':>8} {'steps':>6}")
    for r in rows:
        at = f"{r['psnr_at_floor']:.1f}" if r["psnr_at_floor"] is not None else "-"
        print(f"{r['image']:>5} {r['floor']:>9.3g} {str(r['step_at_floor']):>10} {at:>8} {r['psnr_kept']:>8.1f} {r['steps']:>6}")
    print(summary)
    write_json(Path(args.out), {"provenance": provenance(seed=args.seed, device="cpu"), "recipe": args.recipe, "std": args.std,
                                "overrides": args.overrides, "summary": summary, "rows": rows})
    print({"written": args.out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
