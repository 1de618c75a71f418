"""The `opacus` defense: a DP-SGD step computed by Opacus itself, checked against `clip-noise` and its own accountant."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import real_image
from leakkit.client.defenses import dp_epsilon, epsilon_of, noise_variance
from leakkit.client.dpsgd import PrivateBatch
from leakkit.client.victim import defend, observe, per_example_gradients
from leakkit.errors import ConfigError
from leakkit.tasks import ImageClassification

pytest.importorskip("opacus")


def _client(batch: int = 4):
    torch.manual_seed(0)
    task = ImageClassification.from_name("lenet", num_classes=10, image_size=16)
    x = torch.stack([torch.from_numpy(real_image(16, i)) for i in range(batch)])
    y = torch.arange(batch)
    return task, x, y


def _defended(task, x, y, spec: str, seed: int = 0):
    return defend(observe(task, x, y), spec, seed=seed, per_example=lambda: per_example_gradients(task, x, y),
                  batch=PrivateBatch(task, x, y))


def _flat(obs) -> torch.Tensor:
    return torch.cat([g.double().flatten() for g in obs.gradients.values()])


def test_without_noise_opacus_clips_as_clip_noise_does() -> None:
    task, x, y = _client()
    for clip in (0.5, 100.0):  # clipping active, and a bound no example reaches (the plain mean gradient)
        ours = _flat(_defended(task, x, y, f"clip-noise:clip={clip},multiplier=0"))
        theirs = _flat(_defended(task, x, y, f"opacus:max_grad_norm={clip},noise_multiplier=0"))
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7), float((ours - theirs).abs().max())
    plain = _flat(observe(task, x, y))
    assert torch.allclose(_flat(_defended(task, x, y, "opacus:max_grad_norm=100,noise_multiplier=0")), plain, rtol=1e-4, atol=1e-7)


def test_noise_agrees_in_distribution_with_clip_noise() -> None:
    task, x, y = _client()
    clean = _flat(_defended(task, x, y, "opacus:max_grad_norm=1,noise_multiplier=0"))
    expected_std = 0.5 * 1.0 / x.shape[0]  # multiplier x clip on the sum, divided by the batch (mean reduction)
    stds = {}
    for name, spec in (("opacus", "opacus:max_grad_norm=1,noise_multiplier=0.5"), ("clip-noise", "clip-noise:clip=1,multiplier=0.5")):
        noise = torch.cat([_flat(_defended(task, x, y, spec, seed=s)) - clean for s in range(3)])
        stds[name] = float(noise.std())
        assert abs(float(noise.mean())) < 0.05 * expected_std
    assert stds["opacus"] == pytest.approx(expected_std, rel=0.05) and stds["clip-noise"] == pytest.approx(expected_std, rel=0.05)
    # different seeds give different noise, the same seed the same
    a, b = (_flat(_defended(task, x, y, "opacus:noise_multiplier=0.5", seed=s)) for s in (1, 2))
    assert not torch.equal(a, b) and torch.equal(a, _flat(_defended(task, x, y, "opacus:noise_multiplier=0.5", seed=1)))


def test_epsilon_and_noise_scale_are_recorded() -> None:
    task, x, y = _client()
    obs = _defended(task, x, y, "opacus:noise_multiplier=1.0,max_grad_norm=2,sample_rate=0.02,steps=50")
    (record,) = obs.extra["defenses"]
    assert record["name"] == "opacus" and record["accountant"] == "opacus-rdp" and record["opacus"]
    assert record["epsilon"] == pytest.approx(dp_epsilon(1.0, sample_rate=0.02, steps=50, delta=1e-5))
    assert epsilon_of("opacus:noise_multiplier=1.0,max_grad_norm=2,sample_rate=0.02,steps=50") == pytest.approx(record["epsilon"])
    assert math.isinf(epsilon_of("opacus:noise_multiplier=0")) and epsilon_of("noise:std=1") is None
    assert noise_variance(obs) == pytest.approx((1.0 * 2 / x.shape[0]) ** 2)


def test_the_users_model_is_left_untouched() -> None:
    task, x, y = _client()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    _defended(task, x, y, "opacus:noise_multiplier=0.5")
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())
    hooks = [m for m in task.model.modules() if m._forward_hooks or m._backward_hooks or m._forward_pre_hooks]
    assert not hooks and all(not hasattr(p, "grad_sample") for p in task.model.parameters())


def test_opacus_needs_the_clients_batch() -> None:
    task, x, y = _client()
    with pytest.raises(ConfigError, match="victim side"):
        defend(observe(task, x, y), "opacus", seed=0)
