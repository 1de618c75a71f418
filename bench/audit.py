"""Audit throughput: the same CPU-bound grid run by the local backend and by `--backend ray`.

Both runs are fresh audits of identical cells (DLG on LeNet, 32 px, a fixed step budget so every
cell does the same work). The local backend runs cells one after another with torch's default
threads; Ray runs one single-threaded cell per core. Wall time includes Ray's start-up.

    python bench/audit.py                 # 4 settings x 12 samples, 60 L-BFGS steps per cell
    python bench/audit.py --samples 2     # a quick look

Prints a table and writes bench/results/audit.json (override with --out).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from leakkit.audit.grid import AuditSpec, run_audit
from leakkit.run.rundir import provenance, write_json

OVERRIDES = ["attack.steps=60", "attack.restarts=1", "attack.patience=0", "attack.stop_distance=0"]
DEFENSES = ["noise:std=0,1e-4,1e-3,1e-2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "audit.json"))
    args = ap.parse_args()
    spec = AuditSpec(recipe="dlg", overrides=OVERRIDES, defenses=DEFENSES, samples=args.samples, utility=False)
    rows = []
    for backend in ("local", "ray"):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            summary = run_audit(spec, out=Path(tmp) / "a", backend=backend, backend_options={"workers": args.workers})
            wall = time.perf_counter() - started
        cells = sum(s["batches"] for s in summary["settings"])
        rows.append({"backend": backend, "cells": cells, "wall_seconds": round(wall, 1), "cells_per_minute": round(60 * cells / wall, 2),
                     "workers": 1 if backend == "local" else args.workers,
                     "success_rates": [s["success_rate"] for s in summary["settings"]]})
    speedup = rows[1]["cells_per_minute"] / rows[0]["cells_per_minute"]
    print(f"{'backend':<8} {'cells':>5} {'wall s':>8} {'cells/min':>10}")
    for r in rows:
        print(f"{r['backend']:<8} {r['cells']:>5} {r['wall_seconds']:>8.1f} {r['cells_per_minute']:>10.2f}")
    print(f"ray / local throughput: {speedup:.2f}x on {os.cpu_count()} cores")
    write_json(Path(args.out), {"rows": rows, "speedup": round(speedup, 3), "spec": {"overrides": OVERRIDES, "defenses": DEFENSES, "samples": args.samples},
                                "provenance": provenance(seed=0, device="cpu")})


if __name__ == "__main__":
    main()
