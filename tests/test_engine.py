"""The engine must actually recover data: these tests fail if the attack is broken."""

import inspect

import pytest
import torch

from leakkit import metrics
from leakkit.engine.matching import AttackConfig, reconstruct
from leakkit.errors import AttackDiverged
from leakkit.tasks import ImageClassification
from leakkit.client.victim import observe
from conftest import real_image


def _victim(size=16, label=3, index=0, classes=10, batch=1):
    torch.manual_seed(0)
    task = ImageClassification.from_name("lenet", num_classes=classes, image_size=size)
    x = torch.stack([torch.from_numpy(real_image(size, index + i)) for i in range(batch)])
    labels = torch.tensor([label + i for i in range(batch)])
    return task, x, labels, observe(task, x, labels)


FAST = dict(restarts=1, steps=80, stop_distance=1e-10, patience=0)


def test_idlg_recovers_a_real_image_to_high_psnr():
    task, x, _, obs = _victim()
    rec = reconstruct(task, obs, AttackConfig(labels="idlg", **FAST), seed=0)
    psnr = metrics.psnr(x[0].numpy(), task.to_pixels(rec.inputs.double())[0].float().numpy())
    assert psnr > 35, psnr
    assert rec.label_ids == [3]
    assert rec.distance < 1e-7


def test_dlg_soft_labels_recover_image_and_label():
    task, x, _, obs = _victim(label=7, index=3)
    rec = reconstruct(task, obs, AttackConfig(labels="soft", **FAST), seed=1)
    psnr = metrics.psnr(x[0].numpy(), task.to_pixels(rec.inputs.double())[0].float().numpy())
    assert psnr > 30, psnr
    assert rec.label_ids == [7]
    assert torch.allclose(rec.labels.sum(-1), torch.ones(1))


def test_same_seed_same_result_different_seed_different_start():
    task, _, _, obs = _victim()
    cfg = AttackConfig(labels="idlg", restarts=1, steps=3, patience=0)
    a = reconstruct(task, obs, cfg, seed=5)
    b = reconstruct(task, obs, cfg, seed=5)
    c = reconstruct(task, obs, cfg, seed=6)
    assert torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.inputs, c.inputs)


def test_restarts_are_chosen_by_gradient_distance():
    task, _, _, obs = _victim()
    rec = reconstruct(task, obs, AttackConfig(labels="idlg", restarts=3, steps=4, patience=0, stop_distance=0.0), seed=0)
    assert len(rec.restart_status) == 3
    finals = {}
    for row in rec.trace:
        finals[row["restart"]] = min(finals.get(row["restart"], float("inf")), row["distance"])
    assert rec.distance <= min(finals.values()) + 1e-12


def test_engine_never_takes_ground_truth():
    # start/start_labels are a starting point the attacker computed from the observation (R-GAP's closed form)
    params = set(inspect.signature(reconstruct).parameters)
    assert params == {"task", "observation", "attack", "seed", "device", "callbacks", "start", "start_labels"}


def test_users_model_is_left_untouched():
    task, _, _, obs = _victim()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    model_id = id(task.model)
    reconstruct(task, obs, AttackConfig(labels="idlg", restarts=1, steps=2, feature_weight=1.0), seed=0)
    assert id(task.model) == model_id
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == torch.float32
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in task.model.modules())
    assert all(p.grad is None for p in task.model.parameters())


def test_divergence_is_reported_not_hidden():
    # GroupNorm's variance overflows for a huge step, so the search really reaches NaN
    torch.manual_seed(0)
    task = ImageClassification.from_name("convnet", num_classes=10, image_size=16)
    obs = observe(task, torch.from_numpy(real_image(16))[None], torch.tensor([3]))
    cfg = AttackConfig(optimizer="adam", lr=1e300, labels="idlg", restarts=2, steps=5, patience=0)
    with pytest.raises(AttackDiverged, match="all 2 restart"):
        reconstruct(task, obs, cfg, seed=0)


def test_callbacks_see_every_step():
    task, _, _, obs = _victim()
    seen = []
    reconstruct(task, obs, AttackConfig(labels="idlg", restarts=1, steps=4, patience=0, stop_distance=0.0), callbacks=[seen.append])
    assert [e.step for e in seen] == [1, 2, 3, 4]
    assert all(e.inputs.shape == (1, 3, 16, 16) for e in seen)


@pytest.mark.parametrize("objective,optimizer", [("cosine", "signed-adam"), ("l2+l1", "adam"), ("l2", "lbfgs-plain")])
def test_every_objective_and_optimizer_reduces_the_distance(objective, optimizer):
    task, _, _, obs = _victim()
    cfg = AttackConfig(objective=objective, optimizer=optimizer, lr=0.05 if "adam" in optimizer else 1.0,
                       labels="idlg", restarts=1, steps=30, patience=0, stop_distance=0.0, box=True, priors={"tv": 1e-4})
    rec = reconstruct(task, obs, cfg, seed=0)
    assert rec.distance < rec.trace[0]["distance"] * 0.5


def test_batch_labels_and_features_are_used_for_batches():
    task, x, labels, obs = _victim(batch=2)
    rec = reconstruct(task, obs, AttackConfig(labels="batch", feature_weight=1.0, restarts=1, steps=2), seed=0)
    assert sorted(rec.label_ids) == sorted(labels.tolist())
    assert rec.inputs.shape == x.shape


def test_a_start_worse_than_the_init_is_dropped():
    # the attacker compares its given start with attack.init's by its own gradient distance
    task, x, _, obs = _victim()
    config = AttackConfig(labels="idlg", restarts=1, steps=1, inner_steps=1, patience=0)
    plain = reconstruct(task, obs, config, seed=0)
    far = torch.full_like(x, 40.0, dtype=torch.float64)  # far outside any image
    dropped = reconstruct(task, obs, config, seed=0, start=far)
    assert any("worse than attack.init" in n for n in dropped.notes)
    assert torch.allclose(dropped.inputs, plain.inputs)
    kept = reconstruct(task, obs, config, seed=0, start=x.double())  # the truth itself: kept
    assert not any("worse than attack.init" in n for n in kept.notes) and kept.distance < 1e-6
