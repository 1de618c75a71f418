"""Plots and a static, self-contained HTML report of an audit directory (readable offline).

Plots: success rate per setting with 95 % Wilson intervals; for each swept series, success rate,
score (PSNR or ROUGE-1, median and quartiles) and attacker time against strength; privacy
against utility. Images are embedded in the HTML as data URIs, so the file stands alone.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

from leakkit.audit.grid import AuditDir, Job, collect

MAX_DIFF_CHARS = 4000


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _score_name(rows: list[dict[str, Any]]) -> str:
    return "ROUGE-1" if rows and rows[0]["score"] == "rouge1" else "PSNR (dB)"


def plot_success(rows: list[dict[str, Any]], path: Path) -> Path:
    """Bar chart: success rate of every setting with its 95 % Wilson interval."""
    plt = _pyplot()
    # horizontal bars: setting names of any length stay readable and never overlap
    fig, ax = plt.subplots(figsize=(8.0, max(2.5, 0.35 * len(rows) + 1.2)))
    rates = [r["success_rate"] or 0.0 for r in rows]
    ax.barh(range(len(rows)), rates, xerr=_ci_errors(rows), capsize=3, color="#4c72b0")
    ax.set_yticks(range(len(rows)), [r["label"] or "none" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("attack success rate")
    thr = rows[0]["success_threshold"] if rows else None
    what = f"{rows[0]['success_tier']} tier" if rows and rows[0].get("success_tier") else f"{_score_name(rows).split()[0]} ≥ {thr:g}"
    ax.set_title(f"success = {what} · bars: 95 % Wilson CI", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_series(series: str, rows: list[dict[str, Any]], path: Path) -> Path:
    """Success rate, score and attacker time against the swept strength of one series."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["strength"])
    x = [r["strength"] for r in rows]
    positive = [v for v in x if v > 0]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    rate = [r["success_rate"] or 0.0 for r in rows]
    axes[0].errorbar(x, rate, yerr=_ci_errors(rows), marker="o", capsize=3)
    axes[0].set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("success rate (95 % CI)")
    med = [r["score_median"] for r in rows]
    axes[1].plot(x, [math.nan if v is None else v for v in med], marker="o")
    axes[1].fill_between(x, [math.nan if r["score_q25"] is None else r["score_q25"] for r in rows],
                         [math.nan if r["score_q75"] is None else r["score_q75"] for r in rows], alpha=0.25)
    axes[1].axhline(rows[0]["success_threshold"], color="grey", ls="--", lw=1)
    axes[1].set_ylabel(f"{_score_name(rows)}: median, quartiles")
    axes[2].plot(x, [math.nan if r["attacker_seconds_median"] is None else r["attacker_seconds_median"] for r in rows], marker="o")
    axes[2].set_ylabel("attacker seconds / batch (median)")
    for ax in axes:
        ax.set_xlabel(series)
        if positive and max(positive) / min(positive) >= 100:
            if len(positive) < len(x):  # a zero strength (the undefended baseline) needs a linear piece at 0
                ax.set_xscale("symlog", linthresh=min(positive))
                ax.set_xlim(0, max(positive) * 2)
            else:
                ax.set_xscale("log")
    fig.suptitle(series, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_privacy_utility(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Attack success against the accuracy the model reaches under the same defense."""
    points = [r for r in rows if r["utility_accuracy"] is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in points:  # a legend instead of annotations: nearby points' labels would overlap
        ax.errorbar(r["utility_accuracy"], r["success_rate"] or 0.0, yerr=_ci_errors([r]), marker="o", capsize=3, label=r["label"] or "none")
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("utility: held-out accuracy trained under the defense")
    ax.set_ylabel("privacy loss: attack success rate")
    ax.set_ylim(-0.03, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ci_errors(rows: list[dict[str, Any]]) -> list[list[float]]:
    """Error-bar lengths below and above each success rate (never negative: the Wilson bounds
    can sit a rounding error inside a rate of 0 or 1)."""
    rates = [r["success_rate"] or 0.0 for r in rows]
    return [[max(0.0, a - r["success_ci95"][0]) for a, r in zip(rates, rows)], [max(0.0, r["success_ci95"][1] - a) for a, r in zip(rates, rows)]]


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_report(audit_dir: str | Path) -> Path:
    """Write plots/*.png and report.html for an audit directory; returns the HTML path."""
    adir = AuditDir(audit_dir)
    summary = collect(adir.path)
    rows = summary["settings"]
    plots = adir.path / "plots"
    plots.mkdir(exist_ok=True)
    figures: list[tuple[str, Path]] = []
    if rows:
        figures.append(("Success rate per setting", plot_success(rows, plots / "success.png")))
    by_series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["strength"] is not None and r["n"]:
            by_series.setdefault(r["series"], []).append(r)
    for k, (series, members) in enumerate(by_series.items()):
        if len(members) > 1:
            figures.append((f"Sweep: {series}", plot_series(series, members, plots / f"series-{k}.png")))
    pu = plot_privacy_utility([r for r in rows if r["n"]], plots / "privacy-utility.png")
    if pu is not None:
        figures.append(("Privacy against utility", pu))
    page = _html(summary, figures, adir)
    out = adir.path / "report.html"
    tmp = out.with_name("report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def success_words(row: dict[str, Any]) -> str:
    """What counts as a successful attack in an audit row, with its thresholds (table titles, report)."""
    if row.get("success_tier"):
        th = row["tier_thresholds"]
        return (f"the {row['success_tier']} tier or better (exact: PSNR ≥ {th['exact_psnr']:g} dB; close: PSNR ≥ "
                f"{th['close_psnr']:g} dB; recognisable: SSIM ≥ {th['recognisable_ssim']:g})")
    return f"{_score_name([row]).split()[0]} ≥ {row['success_threshold']:g}"


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _html(summary: dict[str, Any], figures: list[tuple[str, Path]], adir: AuditDir) -> str:
    """report.html from its Jinja2 template (autoescaped: labels, sentences and paths are data)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    rows = summary["settings"]
    score = _score_name(rows)
    sf = ".3f" if score == "ROUGE-1" else ".1f"
    table = [
        [" ".join(r["grid"]) or "-", r["defense"], r["n"], _fmt(r["success_rate"], ".0%"),
         f"{r['success_ci95'][0]:.0%}–{r['success_ci95'][1]:.0%}", _fmt(r["score_median"], sf),
         f"{_fmt(r['score_q25'], sf)}–{_fmt(r['score_q75'], sf)}", _fmt(r["label_accuracy"], ".0%"),
         _fmt(r["attacker_seconds_median"], ".2f"), _fmt(r["utility_accuracy"], ".1%")]
        for r in rows
    ]
    recoveries = []
    for r in rows:
        cells = []
        for b in range(r["batches"]):
            cell = adir.cell(Job("cell", r["setting"], b))
            if (cell / "grid.png").is_file():
                cells.append({"batch": b, "image": _data_uri(cell / "grid.png")})
            elif (cell / "diff.txt").is_file():
                cells.append({"batch": b, "text": (cell / "diff.txt").read_text(encoding="utf-8")[:MAX_DIFF_CHARS]})
        recoveries.append({"label": r["label"] or "none", "cells": cells, "total": r["batches"]})
    env = Environment(loader=PackageLoader("leakkit.audit", "."), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2").render(
        recipe=summary["recipe"], spec=summary["spec"], success_words=success_words(rows[0]) if rows else "-",
        head=["setting", "defense", "n", "success", "95 % CI", f"{score} median", "q25–q75", "label acc.", "attacker s/batch", "utility acc."],
        table=table, figures=[(title, _data_uri(path)) for title, path in figures], recoveries=recoveries,
        cells_done=sum(r["batches_done"] for r in rows), cells_total=sum(r["batches"] for r in rows),
        has_baseline=any(r["defense"] == "none" for r in rows) and len(rows) > 1,
    )
