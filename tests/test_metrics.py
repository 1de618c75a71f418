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
