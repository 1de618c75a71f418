import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from leakkit.engine.objectives import LAYER_WEIGHTS, OBJECTIVES, InputObjective, ObjectiveOptions, relative_distance
from leakkit.engine.priors import PRIORS

floats = st.floats(-10, 10, allow_nan=False, width=64)


def _pair(data):
    shapes = data.draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=4))
    pred = [data.draw(arrays(np.float64, s, elements=floats)) for s in shapes]
    target = [data.draw(arrays(np.float64, s, elements=floats)) for s in shapes]
    return pred, target


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_objectives_match_a_numpy_reference(data):
    pred, target = _pair(data)
    w = [data.draw(st.floats(0.1, 2)) for _ in pred]
    P, T = [torch.tensor(p) for p in pred], [torch.tensor(t) for t in target]
    opts = ObjectiveOptions(l1_weight=0.3)
    l2 = sum(wi * np.sum((p - t) ** 2) for p, t, wi in zip(pred, target, w))
    assert float(OBJECTIVES.get("l2")(P, T, w, opts)) == pytest.approx(l2, rel=1e-9, abs=1e-9)
    l1 = sum(wi * (np.sum((p - t) ** 2) + 0.3 * np.sum(np.abs(p - t))) for p, t, wi in zip(pred, target, w))
    assert float(OBJECTIVES.get("l2+l1")(P, T, w, opts)) == pytest.approx(l1, rel=1e-9, abs=1e-9)
    dot = sum(wi * np.sum(p * t) for p, t, wi in zip(pred, target, w))
    pn = np.sqrt(sum(wi * np.sum(p * p) for p, wi in zip(pred, w)))
    tn = np.sqrt(sum(wi * np.sum(t * t) for t, wi in zip(target, w)))
    if pn > 1e-6 and tn > 1e-6:
        assert float(OBJECTIVES.get("cosine")(P, T, w, opts)) == pytest.approx(1 - dot / (pn * tn), abs=1e-9)


def test_objectives_are_zero_at_the_target_and_differentiable():
    t = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    for name in OBJECTIVES:
        if isinstance(OBJECTIVES.get(name), InputObjective):
            continue  # reads the candidate's inputs, not its gradient (test_text)
        assert float(OBJECTIVES.get(name)(t, t, [1.0, 1.0], ObjectiveOptions())) == pytest.approx(0, abs=1e-12)
    p = [x.clone().requires_grad_() for x in t]
    loss = OBJECTIVES.get("l2")([2 * x for x in p], t, [1.0, 1.0], ObjectiveOptions())
    loss.backward()
    assert all(x.grad is not None for x in p)


def test_layer_weightings():
    t = [torch.ones(2) * 10, torch.ones(3)]
    for name in LAYER_WEIGHTS:
        w = LAYER_WEIGHTS.get(name)(t)
        assert len(w) == 2 and all(x > 0 for x in w)
    inv = LAYER_WEIGHTS.get("inverse-norm")(t)
    assert inv[0] * 200 == pytest.approx(inv[1] * 3)  # each layer weighted by 1/||t||^2
    assert LAYER_WEIGHTS.get("input-first")(t) == [1.0, 0.5]


def test_relative_distance_and_tv():
    t = [torch.ones(4)]
    assert relative_distance([torch.ones(4) * 1.1], t) == pytest.approx(0.01)
    flat = torch.full((1, 3, 8, 8), 0.5)
    assert float(PRIORS.get("tv")(flat)) == 0.0
    checker = torch.zeros(1, 1, 4, 4)
    checker[..., ::2, ::2] = 1
    checker[..., 1::2, 1::2] = 1
    assert float(PRIORS.get("tv")(checker)) == pytest.approx(2.0)
