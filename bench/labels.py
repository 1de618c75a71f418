"""Batch label inference: the sign rule alone against the `batch` strategy (sign rule + residual search).

Two models, both LeNet-sigmoid 32 px, the update of one FedSGD step:
- `random-100`: the recipes' model at random init, 100 classes, embedded images with drawn labels;
- `digits-10`: LeNet trained 300 SGD steps on scikit-learn's digits (10 classes; confident, so a
  present class is often predicted by the other examples), held-out digits with their true labels.
Label accuracy per batch is the multiset overlap of inferred and true labels over the batch size;
a batch "with distinct labels" holds no class twice (where the issue asks 100 %).

    python bench/labels.py                         # batch sizes 2, 4, 8; 64 batches each
    python bench/labels.py --batches 16 --sizes 4  # a quick look

Prints a table and writes bench/results/labels.json (override with --out).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from collections import Counter
from typing import Any

import numpy as np
import torch

from leakkit import metrics
from leakkit.client.victim import observe
from leakkit.engine import analytic
from leakkit.engine.labels import LABELS
from leakkit.run.rundir import provenance, write_json
from leakkit.tasks import ImageClassification
from leakkit.vision.data import draw, resize


def overlap(predicted: list[int], truth: list[int]) -> float:
    return sum((Counter(predicted) & Counter(truth)).values()) / len(truth)


def trained_digits_lenet(seed: int) -> tuple[ImageClassification, torch.Tensor, torch.Tensor]:
    """LeNet trained on 1,297 digits; returns the task and the 500 held-out digits (inputs, labels)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    pictures = np.stack([resize(np.repeat((x.reshape(8, 8) / 16.0)[..., None], 3, axis=-1), 32, 3) for x in X])
    torch.manual_seed(seed)
    task = ImageClassification.from_name("lenet", num_classes=10, image_size=32)
    inputs = task.from_pixels(torch.from_numpy(pictures).double()).float()
    labels = torch.from_numpy(y).long()
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:500], order[500:]
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(seed + 1)
    for _ in range(300):
        idx = rng.choice(train, 32, replace=False)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(task.model(inputs[idx]), labels[idx]).backward()
        opt.step()
    return task, inputs[test], labels[test]


def run(task: ImageClassification, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    rows = []
    for x, y in batches:
        obs = observe(task, x, y)
        w, b = task.classifier_parameter_names()
        started = time.perf_counter()
        sign = analytic.label_counts(obs.gradients[w], obs.gradients[b], obs.batch_size)
        t_sign = time.perf_counter() - started
        started = time.perf_counter()
        searched = LABELS.get("batch")(obs, task).argmax(-1).tolist()
        t_search = time.perf_counter() - started
        truth = y.tolist()
        rows.append({"distinct": len(set(truth)) == len(truth), "sign": overlap(sign, truth), "batch": overlap(searched, truth),
                     "sign_seconds": t_sign, "batch_seconds": t_search})
    out: dict[str, Any] = {"n_batches": len(rows)}
    for subset, keep in (("all", lambda r: True), ("distinct", lambda r: r["distinct"])):
        sel = [r for r in rows if keep(r)]
        for key in ("sign", "batch"):
            exact = sum(r[key] == 1.0 for r in sel)
            out[f"{subset}_{key}_accuracy"] = float(np.mean([r[key] for r in sel])) if sel else None
            out[f"{subset}_{key}_all_right"] = [exact, len(sel), metrics.wilson_interval(exact, len(sel)) if sel else None]
    out["sign_seconds_median"] = float(np.median([r["sign_seconds"] for r in rows]))
    out["batch_seconds_median"] = float(np.median([r["batch_seconds"] for r in rows]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2,4,8")
    p.add_argument("--batches", type=int, default=64)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default="bench/results/labels.json")
    a = p.parse_args()
    gen = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    random_task = ImageClassification.from_name("lenet", num_classes=100, image_size=32)
    digits_task, dx, dy = trained_digits_lenet(a.seed)
    results: dict[str, Any] = {"provenance": provenance(seed=a.seed, device="cpu"), "rows": {}}
    print(f"{'model':<11} {'B':>2} {'batches':>7} {'distinct':>8} | {'sign rule: all right':>21} {'+ search: all right':>20} | "
          f"{'distinct, sign':>14} {'distinct, search':>16} | {'s search':>8}")
    for size in [int(s) for s in a.sizes.split(",")]:
        samples = draw("embedded", "", size * a.batches, seed=a.seed)
        pix = torch.from_numpy(np.stack([resize(s.image, 32, 3) for s in samples])).float()
        ys = torch.randint(100, (len(samples),), generator=gen)
        rb = [(random_task.from_pixels(pix[k : k + size].double()).float(), ys[k : k + size]) for k in range(0, len(samples), size)]
        perm = torch.randperm(len(dy), generator=gen)
        db = [(dx[perm[k : k + size]], dy[perm[k : k + size]]) for k in range(0, size * a.batches, size)]
        for name, task, batches in (("random-100", random_task, rb), ("digits-10", digits_task, db)):
            r = run(task, batches)
            results["rows"][f"{name}-b{size}"] = r
            fmt = lambda v: f"{v[0]}/{v[1]}" if v else "-"  # noqa: E731
            print(f"{name:<11} {size:>2} {r['n_batches']:>7} {r['distinct_sign_all_right'][1]:>8} | {fmt(r['all_sign_all_right']):>21} "
                  f"{fmt(r['all_batch_all_right']):>20} | {fmt(r['distinct_sign_all_right']):>14} {fmt(r['distinct_batch_all_right']):>16} | "
                  f"{r['batch_seconds_median']:>8.2f}", flush=True)
    write_json(Path(a.out), results)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
