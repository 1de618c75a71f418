"""Metrics: pure functions of (truth, recovery). The only place ground truth meets the attack."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

PSNR_CAP = 100.0  # identical images have infinite PSNR; JSON cannot say so, and 100 dB is exact to 1e-5


def mse(truth: np.ndarray, recovered: np.ndarray) -> float:
    """Mean squared error of two images with values in [0, 1]."""
    return float(np.mean((np.asarray(truth, np.float64) - np.asarray(recovered, np.float64)) ** 2))


def psnr(truth: np.ndarray, recovered: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for data range 1 (scikit-image), capped at PSNR_CAP."""
    from skimage.metrics import peak_signal_noise_ratio

    if mse(truth, recovered) == 0:
        return PSNR_CAP
    value = peak_signal_noise_ratio(np.asarray(truth, np.float64), np.asarray(recovered, np.float64), data_range=1.0)
    return float(min(value, PSNR_CAP))


def ssim(truth: np.ndarray, recovered: np.ndarray) -> float:
    """Structural similarity (scikit-image) of C x H x W images in [0, 1]."""
    from skimage.metrics import structural_similarity

    side = min(truth.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return float("nan")
    return float(
        structural_similarity(
            np.asarray(truth, np.float64), np.asarray(recovered, np.float64),
            data_range=1.0, channel_axis=0, win_size=win,
        )
    )


def best_match(truth: np.ndarray, recovered: np.ndarray) -> list[int]:
    """Assignment of recovered examples to true ones minimising total MSE (order is not recoverable).

    Shape: truth [B, ...], recovered [B, ...]. Returns perm with recovered[perm[i]] matched to truth[i].
    """
    from scipy.optimize import linear_sum_assignment

    t = np.asarray(truth, np.float64).reshape(len(truth), -1)
    r = np.asarray(recovered, np.float64).reshape(len(recovered), -1)
    cost = ((t[:, None, :] - r[None, :, :]) ** 2).mean(axis=2)
    rows, cols = linear_sum_assignment(cost)
    perm = [0] * len(truth)
    for i, j in zip(rows, cols):
        perm[int(i)] = int(j)
    return perm


def label_accuracy(truth: list[int], recovered: list[int]) -> float:
    """Fraction of labels recovered, as multisets (a batch's labels come back in any order)."""
    if not truth:
        return float("nan")
    from collections import Counter

    common = Counter(truth) & Counter(recovered)
    return sum(common.values()) / len(truth)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a success rate (scipy's binomial test); (0, 1) when n is 0."""
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (max(0.0, float(ci.low)), min(1.0, float(ci.high)))


@dataclass(frozen=True)
class TierThresholds:
    """Where an image recovery's leakage tiers begin (the recipe's `[metrics]` may override them).

    exact_psnr: PSNR (dB) of an exact recovery; close_psnr: of a close one; recognisable_ssim: SSIM
    against the truth at which a person recognises the image.
    """

    exact_psnr: float = 40.0
    close_psnr: float = 30.0
    recognisable_ssim: float = 0.5


# The one place the default thresholds live.
DEFAULT_TIERS = TierThresholds()
# From most to least leakage; each tier includes the ones before it when rates are counted.
TIERS = ("exact", "close", "recognisable", "none")


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def flat_guess(truth: np.ndarray) -> np.ndarray:
    """The reconstruction that knows nothing but the average colour: each channel of a C x H x W
    image filled with its mean. What a recovery must beat before it says anything about the image."""
    t = np.asarray(truth, np.float64)
    return np.broadcast_to(t.mean(axis=(-2, -1), keepdims=True), t.shape).copy()


def tier(
    psnr: float | None, ssim: float | None, thresholds: TierThresholds = DEFAULT_TIERS, *,
    flat_psnr: float | None = None, flat_ssim: float | None = None,
) -> str:
    """Leakage tier of one image: "exact", "close", "recognisable" or "none".

    exact: PSNR >= exact_psnr; close: PSNR >= close_psnr; recognisable: SSIM >= recognisable_ssim.
    Given the flat guess's scores on the same image (`flat_guess`), a tier also needs the recovery to
    beat them on its measure: a near-uniform image is "close" to its mean colour, and a blur of the
    right colour reaches SSIM 0.5 on it, without anything having leaked (of the 259 embedded images,
    the flat guess reaches SSIM 0.5 on 51 and 30 dB on 16, at 32 px).
    A missing (None/NaN) score never meets a threshold.
    """
    if _beats(psnr, flat_psnr) and psnr >= thresholds.exact_psnr:
        return "exact"
    if _beats(psnr, flat_psnr) and psnr >= thresholds.close_psnr:
        return "close"
    if _beats(ssim, flat_ssim) and ssim >= thresholds.recognisable_ssim:
        return "recognisable"
    return "none"


def _beats(score: float | None, flat: float | None) -> bool:
    """A finite score above the flat guess's (or no flat score to beat)."""
    return _finite(score) and (not _finite(flat) or score > flat)


def score_image(truth: np.ndarray, recovered: np.ndarray, thresholds: TierThresholds = DEFAULT_TIERS) -> dict[str, Any]:
    """One recovered C x H x W image against the truth: psnr, ssim, mse, the flat guess's
    flat_psnr and flat_ssim, and the tier those give."""
    flat = flat_guess(truth)
    row: dict[str, Any] = {
        "psnr": psnr(truth, recovered), "ssim": ssim(truth, recovered), "mse": mse(truth, recovered),
        "flat_psnr": psnr(truth, flat), "flat_ssim": ssim(truth, flat),
    }
    row["tier"] = tier(row["psnr"], row["ssim"], thresholds, flat_psnr=row["flat_psnr"], flat_ssim=row["flat_ssim"])
    return row


def tier_rates(rows: Iterable[Mapping[str, Any]], thresholds: TierThresholds = DEFAULT_TIERS) -> dict[str, Any]:
    """Cumulative tier rates with 95 % Wilson intervals: an exact image is also close and recognisable.

    Args:
        rows: per-image records with a "tier" key, or with "psnr" and "ssim" (and optionally
            "flat_psnr", "flat_ssim") to compute it from.
        thresholds: used only for rows without a "tier".
    Returns:
        {"n", "exact_rate", "exact_ci95", "close_rate", "close_ci95", "recognisable_rate",
        "recognisable_ci95"}; rates are None when there are no rows.
    """
    tiers = [r["tier"] if r.get("tier") is not None
             else tier(r.get("psnr"), r.get("ssim"), thresholds, flat_psnr=r.get("flat_psnr"), flat_ssim=r.get("flat_ssim"))
             for r in rows]
    unknown = set(tiers) - set(TIERS)
    if unknown:
        raise ValueError(f"unknown tier(s) {sorted(unknown)}; valid: {', '.join(TIERS)}")
    n = len(tiers)
    out: dict[str, Any] = {"n": n}
    for level, name in enumerate(TIERS[:-1]):
        hits = sum(1 for t in tiers if TIERS.index(t) <= level)
        out[f"{name}_rate"] = hits / n if n else None
        out[f"{name}_ci95"] = list(wilson_interval(hits, n))
    return out


def rouge(reference: str, recovered: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (Google's `rouge-score`, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    scores = scorer.score(reference, recovered)
    return {k: float(v.fmeasure) for k, v in scores.items()}


def token_accuracy(reference: list[int], recovered: list[int]) -> float:
    """Fraction of the reference's positions holding the same token in the recovery."""
    if not reference:
        return 0.0
    same = sum(1 for a, b in zip(reference, recovered) if a == b)
    return same / max(len(reference), len(recovered))


def best_match_text(references: list[str], recovered: list[str]) -> list[int]:
    """perm[i] = index of the recovered sentence assigned to reference i, maximising total ROUGE-1,
    then ROUGE-L among pairings that tie (two sentences with one bag of words, in a batch of 16,
    were paired crosswise and each counted wrong)."""
    from scipy.optimize import linear_sum_assignment

    def paired(r: str, c: str) -> float:
        s = rouge(r, c)
        return s["rouge1"] + 1e-6 * s["rougeL"]  # 1e-6 * batch stays below a ROUGE-1 step

    score = np.array([[paired(r, c) for c in recovered] for r in references])
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = [0] * len(references)
    for r, c in zip(rows, cols):
        perm[r] = int(c)
    return perm
