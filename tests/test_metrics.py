import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leakkit import metrics
from conftest import real_image


def test_psnr_ssim_on_real_image():
    im = real_image(32)
    assert metrics.psnr(im, im) == metrics.PSNR_CAP
    assert metrics.ssim(im, im) == pytest.approx(1.0)
    noisy = np.clip(im + 0.01 * np.random.default_rng(0).standard_normal(im.shape), 0, 1)
    assert 35 < metrics.psnr(im, noisy) < 45
    assert metrics.ssim(im, noisy) < 1.0
    assert metrics.mse(im, noisy) == pytest.approx(np.mean((im - noisy) ** 2), rel=1e-6)


def test_psnr_matches_definition():
    a, b = np.zeros((3, 4, 4)), np.full((3, 4, 4), 0.1)
    assert metrics.psnr(a, b) == pytest.approx(20.0)


@settings(max_examples=25, deadline=None)
@given(st.permutations(list(range(6))))
def test_best_match_undoes_any_permutation(perm):
    truth = np.stack([real_image(16, i) for i in range(6)])
    recovered = truth[list(perm)] + 0.001
    assignment = metrics.best_match(truth, recovered)
    for i in range(6):
        assert perm[assignment[i]] == i


def test_label_accuracy_is_order_free():
    assert metrics.label_accuracy([1, 2, 2, 5], [2, 5, 1, 2]) == 1.0
    assert metrics.label_accuracy([1, 2, 2, 5], [2, 5, 1, 1]) == 0.75


def test_wilson_interval_known_values():
    lo, hi = metrics.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = metrics.wilson_interval(50, 50)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.9287, abs=1e-3)


@pytest.mark.parametrize(
    "psnr, ssim, expected",
    [
        (45.0, 0.99, "exact"),
        (40.0, 0.2, "exact"),  # the tier is about PSNR first: 40 dB is exact whatever SSIM says
        (39.99, 0.9, "close"),
        (30.0, 0.1, "close"),
        (29.9, 0.5, "recognisable"),
        (12.0, 0.51, "recognisable"),
        (29.9, 0.49, "none"),
        (None, None, "none"),
        (float("nan"), 0.7, "recognisable"),
        (float("nan"), float("nan"), "none"),
    ],
)
def test_tier_from_known_scores(psnr, ssim, expected):
    assert metrics.tier(psnr, ssim) == expected


def test_tier_thresholds_are_passed_in():
    strict = metrics.TierThresholds(exact_psnr=50, close_psnr=45, recognisable_ssim=0.8)
    assert metrics.tier(47, 0.9, strict) == "close"
    assert metrics.tier(47, 0.9) == "exact"
    assert metrics.tier(20, 0.6, strict) == "none"


def test_tiers_of_real_recoveries():
    im = real_image(32)
    rng = np.random.default_rng(1)
    for sigma, expected in ((0.003, "exact"), (0.02, "close")):
        noisy = np.clip(im + sigma * rng.standard_normal(im.shape), 0, 1)
        assert metrics.tier(metrics.psnr(im, noisy), metrics.ssim(im, noisy)) == expected
    flat = np.full_like(im, 0.5)
    assert metrics.tier(metrics.psnr(im, flat), metrics.ssim(im, flat)) == "none"


def test_a_tier_needs_more_than_the_mean_colour():
    # a near-uniform crop (like the embedded pool's non-face LFW patches): its own mean colour is
    # already "close" and "recognisable", so a recovery must beat that guess to count
    im = 0.3 + 0.01 * real_image(32)
    flat = metrics.flat_guess(im)
    assert flat.shape == im.shape and np.allclose(flat.mean(axis=(1, 2)), im.mean(axis=(1, 2)))
    fp, fs = metrics.psnr(im, flat), metrics.ssim(im, flat)
    assert fp > 40
    guess = np.clip(flat + 0.005 * np.random.default_rng(0).standard_normal(im.shape), 0, 1)
    p, s = metrics.psnr(im, guess), metrics.ssim(im, guess)
    assert metrics.tier(p, s) in ("exact", "close")  # without the baseline it would count
    assert metrics.tier(p, s, flat_psnr=fp, flat_ssim=fs) == "none"
    assert metrics.tier_rates([{"psnr": p, "ssim": s, "flat_psnr": fp, "flat_ssim": fs}])["recognisable_rate"] == 0
    # the image itself beats its mean colour on every measure
    assert metrics.tier(metrics.psnr(im, im), metrics.ssim(im, im), flat_psnr=fp, flat_ssim=fs) == "exact"
    assert metrics.tier(35.0, 0.9, flat_psnr=20.0, flat_ssim=0.95) == "close"  # PSNR beats it: SSIM need not
    assert metrics.tier(25.0, 0.8, flat_psnr=20.0, flat_ssim=0.85) == "none"


def test_tier_rates_are_cumulative_with_wilson_intervals():
    rows = [{"tier": "exact"}, {"tier": "close"}, {"psnr": 20.0, "ssim": 0.6}, {"psnr": 10.0, "ssim": 0.1}]
    r = metrics.tier_rates(rows)
    assert r["n"] == 4
    assert (r["exact_rate"], r["close_rate"], r["recognisable_rate"]) == (0.25, 0.5, 0.75)
    assert r["close_ci95"] == list(metrics.wilson_interval(2, 4))
    assert metrics.tier_rates([])["exact_rate"] is None
    with pytest.raises(ValueError, match="unknown tier"):
        metrics.tier_rates([{"tier": "perfect"}])
