"""Text benchmark: sentences from BERT gradients on CoLA, SST-2 and Rotten Tomatoes.

Every row runs a bundled recipe through `leakkit.run.runner.run_recipe` (the same code
path as `leakkit run`) on the first N sentences of a data set in ../shared/data/text and reports
mean ROUGE-1/2, exact-sentence rate with a 95 % Wilson interval, and seconds per batch.

    python bench/text.py                          # the full table (about 30 minutes on 2 cores)
    python bench/text.py --rows mlm-cola --n 5    # one row, quickly
    python bench/text.py --rows cls-rt-b4 --skip 1000   # sentences 1001.. of the file: held out from tuning

Rows (name: recipe and overrides):
  mlm-cola         bert-exact, MiniLM masked LM, batch 1
  mlm-cola-b4      bert-exact, batch 4
  cls-{cola,sst2,rt}  bert-exact on the classification task, batch 1
  frozen-cola      bert-exact with the word-embedding gradient withheld (task.frozen=word_embeddings)
  match-frozen     dlg-bert (continuous matching only), word-embedding gradient withheld
  dlg              dlg-bert as shipped on the 20 shipped sentences (soft-token mixtures, every gradient matched)
  tag / lamp       tag-bert-cls and lamp-bert-cls on CoLA (slow: a few sentences)
  tiger            tiger-bert (subspace objective over soft-token mixtures, then discrete moves) on CoLA
  bert-base        bert-exact on a randomly initialised bert-base-shaped masked LM (seconds, peak memory)
  bert-base-b4     the same, batch 4 (the beam sentence search)
  bert-base-cls-frozen / -b4  classification on that shape, word and position embedding gradients withheld
  held out (nothing was tuned on these sentences):
  mlm-sst2         bert-exact, masked LM, batch 1 (seconds per sentence)
  tiger-sst2       tiger-bert on SST-2
  cls-sst2-b4 / mlm-sst2-b4   encoder batches of 4 (the beam sentence search)
  cls-rt-b4 / mlm-rt-b4       the same on Rotten Tomatoes (with --skip 1000: sentences no one looked at)
  cls-cola-b16 / mlm-cola-b16 / cls-sst2-b16   encoder batches of 16 (MiniLM's width 384 bounds the
                              batch's tokens the first layer can tell apart: CoLA's short sentences fit)
  cls-noise-1e-4 / -1e-3      classification, batch 1, Gaussian noise on the update
  cls-noise-{1e-5,1e-4}-b4    classification, batch 4, noise (sentences matched to the embedding gradients)
  mlm-noise-{1e-5,1e-4}-b4    masked LM, batch 4, noise
  cls-frozen-sst2 / -b4       classification with word and position embedding gradients withheld
  dec-frozen-sst2-b4          decoder-exact with the word-embedding gradient withheld (vocabulary scan)
  dec-sst2-b4 / dec-sst2-b16 / dec-rt-b16   decoder-exact (random GPT-2-shaped causal LM), batches of 4 and 16
  dec-noise-{1e-5,1e-4,3e-4}-b4              decoder-exact, batch 4, Gaussian noise on the update (spans cut at the noise)

Prints a table and writes bench/results/text.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from leakkit.run.config import load_recipe
from leakkit.run.rundir import provenance, write_json
from leakkit.run.runner import run_recipe

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "text"
FILES = {"cola": "cola_dev.tsv", "sst2": "sst2_dev.tsv", "rt": "mr_dev.tsv", "embedded": None}  # None: the 20 shipped sentences

ROWS: dict[str, tuple[str, str, list[str], int]] = {
    # name: (recipe, data set, overrides, default sentence count)
    "mlm-cola": ("bert-exact", "cola", [], 50),
    "mlm-cola-b4": ("bert-exact", "cola", ["data.batch_size=4"], 20),
    "cls-cola": ("bert-exact", "cola", ["task.name=sequence-classification"], 50),
    "cls-sst2": ("bert-exact", "sst2", ["task.name=sequence-classification"], 50),
    "cls-rt": ("bert-exact", "rt", ["task.name=sequence-classification"], 50),
    "frozen-cola": ("bert-exact", "cola", ["task.frozen=word_embeddings"], 20),
    "match-frozen": ("dlg-bert", "cola", ["task.frozen=word_embeddings", "text.space=embeddings"], 3),
    "dlg": ("dlg-bert", "embedded", [], 20),
    "tag": ("tag-bert-cls", "cola", [], 3),
    "lamp": ("lamp-bert-cls", "cola", [], 3),
    "tiger": ("tiger-bert", "cola", [], 20),
    # held out: nothing below was tuned on SST-2 or Rotten Tomatoes
    "mlm-sst2": ("bert-exact", "sst2", [], 50),
    "tiger-sst2": ("tiger-bert", "sst2", [], 20),
    "cls-sst2-b4": ("bert-exact", "sst2", ["task.name=sequence-classification", "data.batch_size=4"], 32),
    "mlm-sst2-b4": ("bert-exact", "sst2", ["data.batch_size=4"], 32),
    "cls-rt-b4": ("bert-exact", "rt", ["task.name=sequence-classification", "data.batch_size=4"], 32),
    "mlm-rt-b4": ("bert-exact", "rt", ["data.batch_size=4"], 32),
    "cls-cola-b16": ("bert-exact", "cola", ["task.name=sequence-classification", "data.batch_size=16"], 64),
    "mlm-cola-b16": ("bert-exact", "cola", ["data.batch_size=16"], 64),
    "cls-sst2-b16": ("bert-exact", "sst2", ["task.name=sequence-classification", "data.batch_size=16"], 64),
    "cls-noise-1e-4": ("bert-exact", "sst2", ["task.name=sequence-classification", "defense=noise:std=1e-4"], 30),
    "cls-noise-1e-3": ("bert-exact", "sst2", ["task.name=sequence-classification", "defense=noise:std=1e-3"], 30),
    "cls-noise-1e-5-b4": ("bert-exact", "sst2", ["task.name=sequence-classification", "defense=noise:std=1e-5", "data.batch_size=4"], 16),
    "cls-noise-1e-4-b4": ("bert-exact", "sst2", ["task.name=sequence-classification", "defense=noise:std=1e-4", "data.batch_size=4"], 16),
    "mlm-noise-1e-5-b4": ("bert-exact", "sst2", ["defense=noise:std=1e-5", "data.batch_size=4"], 16),
    "mlm-noise-1e-4-b4": ("bert-exact", "sst2", ["defense=noise:std=1e-4", "data.batch_size=4"], 16),
    "cls-frozen-sst2": ("bert-exact", "sst2", ["task.name=sequence-classification", "task.frozen=word_embeddings,position_embeddings"], 20),
    "cls-frozen-sst2-b4": ("bert-exact", "sst2", ["task.name=sequence-classification", "task.frozen=word_embeddings,position_embeddings", "data.batch_size=4"], 8),
    "dec-frozen-sst2-b4": ("decoder-exact", "sst2", ["task.frozen=wte", "data.batch_size=4"], 16),
    "dec-sst2-b4": ("decoder-exact", "sst2", ["data.batch_size=4"], 64),
    "dec-sst2-b16": ("decoder-exact", "sst2", ["data.batch_size=16"], 64),
    "dec-rt-b16": ("decoder-exact", "rt", ["data.batch_size=16"], 64),
    "dec-noise-1e-5-b4": ("decoder-exact", "sst2", ["data.batch_size=4", "defense=noise:std=1e-5"], 16),
    "dec-noise-1e-4-b4": ("decoder-exact", "sst2", ["data.batch_size=4", "defense=noise:std=1e-4"], 16),
    "dec-noise-3e-4-b4": ("decoder-exact", "sst2", ["data.batch_size=4", "defense=noise:std=3e-4"], 16),
}


# rows on a random bert-base-shaped model, built at run time: name -> (recipe, data, overrides, default sentence count)
_CLS_FROZEN = ["task.name=sequence-classification", "task.frozen=word_embeddings,position_embeddings"]
BERT_BASE: dict[str, tuple[str, str, list[str], int]] = {
    "bert-base": ("bert-exact", "cola", [], 10),
    "bert-base-b4": ("bert-exact", "cola", ["data.batch_size=4"], 8),
    "bert-base-cls-frozen": ("bert-exact", "sst2", _CLS_FROZEN, 8),
    "bert-base-cls-frozen-b4": ("bert-exact", "sst2", [*_CLS_FROZEN, "data.batch_size=4"], 8),
}


def bert_base_dir() -> str:
    """A bert-base-shaped masked LM (12 layers, width 768) with MiniLM's vocabulary, random weights."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from leakkit.tasks.text import resolve_model_path

    out = Path(tempfile.mkdtemp(prefix="leakkit-bert-base-"))
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(out)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig()).save_pretrained(out)
    return str(out)


def held_out(path: Path, skip: int, n: int, into: str) -> str:
    """A copy of the first `n` rows after `skip` of a headerless TSV, so a row can be measured on
    sentences that nobody looked at while tuning (the files are tuned on from their start)."""
    rows = path.read_text(encoding="utf-8").splitlines()[skip : skip + n]
    if len(rows) < n:
        raise SystemExit(f"bench: error: {path.name} has {skip + len(rows)} rows, fewer than --skip {skip} + {n}")
    out = Path(into) / f"skip{skip}-{path.name}"
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(out)


def run_row(name: str, n: int | None, seed: int, skip: int = 0) -> dict[str, Any]:
    if name in BERT_BASE:
        recipe, data, extra, default = BERT_BASE[name]
        overrides = [f"task.model={bert_base_dir()}", *extra]
    else:
        recipe, data, overrides, default = ROWS[name]
    r = load_recipe(recipe, overrides)
    samples = n or default
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if FILES[data] is None:
            if skip:
                raise SystemExit("bench: error: --skip needs a row on a data file, not the embedded sentences")
            path = None
        else:
            path = held_out(DATA / FILES[data], skip, samples, scratch) if skip else str(DATA / FILES[data])
        started = time.perf_counter()
        result = run_recipe(r, out=out, input_path=path, samples=samples, seed=seed)
        wall = time.perf_counter() - started
    s = result["summary"]
    return {
        "row": name, "recipe": recipe, "data": data, "skip": skip, "overrides": overrides, "batch_size": r.data.batch_size,
        "n": s["n"], "rouge1": s["rouge1_mean"], "rouge2": s["rouge2_mean"], "exact_rate": s["exact_rate"],
        "exact_ci95": s["exact_ci95"], "label_accuracy": s["label_accuracy"], "seconds_per_batch": s["seconds_median"],
        "verified": s["verified"], "verified_wrong": s["verified_wrong"],
        "seconds_per_sentence": (s["seconds_median"] or 0) / r.data.batch_size, "wall_seconds": round(wall, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "rouge1_at_least_0_9": sum(1 for x in result["samples"] if (x["rouge1"] or 0) >= 0.9) / max(1, len(result["samples"])),
        "failures": [(x["reference"], x["recovered"]) for x in result["samples"] if not x["exact"]][:5],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join([*ROWS, *BERT_BASE]), help="comma-separated row names")
    p.add_argument("--n", type=int, help="sentences per row (default: each row's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=int, default=0, help="start after this many sentences of the data file (held-out draws)")
    p.add_argument("--out", default="bench/results/text.json")
    args = p.parse_args(argv)
    names = [x for x in args.rows.split(",") if x]
    unknown = [x for x in names if x not in ROWS and x not in BERT_BASE]
    if unknown:
        print(f"bench: error: unknown row(s) {', '.join(unknown)}; valid: {', '.join([*ROWS, *BERT_BASE])}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    results = []
    for name in names:
        results.append(run_row(name, args.n, args.seed, args.skip))
        write_json(Path(args.out), {"rows": results, "provenance": provenance(seed=args.seed, device="cpu")})
    table = Table(title="leakkit text benchmark (2-core CPU)", title_justify="left")
    for col in ("row", "data", "B", "n", "ROUGE-1", "R-1 ≥ 0.9", "exact", "95 % CI", "verified", "labels", "s/batch", "s/sentence", "peak RSS GiB"):
        table.add_column(col, justify="right")
    for r in results:
        lo, hi = r["exact_ci95"]
        table.add_row(
            r["row"], r["data"], str(r["batch_size"]), str(r["n"]), f"{r['rouge1']:.3f}", f"{r['rouge1_at_least_0_9']:.0%}",
            f"{r['exact_rate']:.0%}", f"{lo:.0%}–{hi:.0%}", "-" if r["verified"] is None else str(r["verified"]), f"{r['label_accuracy']:.0%}", f"{r['seconds_per_batch']:.1f}",
            f"{r['seconds_per_sentence']:.2f}", f"{r['peak_rss_gib']:.2f}",
        )
    Console().print(table)
    print(json.dumps({"written": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
