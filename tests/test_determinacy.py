"""The batch determinacy count: equations against unknowns per layer, from the update's ranks."""

import json

import torch

from leakkit.client.victim import defend, observe
from leakkit.tasks import ImageClassification
from leakkit.vision import determinacy
from conftest import FAST, real_image, run_cli


def _lenet(size: int) -> ImageClassification:
    torch.manual_seed(0)
    return ImageClassification.from_name("lenet", num_classes=100, image_size=size)


def _update(task: ImageClassification, batch: int, size: int):
    x = torch.stack([torch.from_numpy(real_image(size, k)) for k in range(batch)])
    return observe(task, x, torch.arange(batch) * 7)


def test_one_32px_image_is_determined_a_batch_of_four_and_64px_are_not() -> None:
    task = _lenet(32)
    one = determinacy.count(task.model, _update(task, 1, 32).gradients, task.input_shape, 1)
    assert [c.name for c in one] == ["fc", "body.4", "body.2", "body.0"]  # output layer first
    assert all(c.determined for c in one) and determinacy.verdict(one, 1) is None
    four = determinacy.count(task.model, _update(task, 4, 32).gradients, task.input_shape, 4)
    # the output layer's gradient has one rank per distinct label; the second conv's inputs outnumber its equations
    assert four[0].rank == 4 and four[0].forward == 0
    short = [c.name for c in four if not c.determined]
    assert short == ["body.2"], [c.as_dict() for c in four]
    assert "'body.2'" in determinacy.verdict(four, 4)
    big = _lenet(64)
    assert not all(c.determined for c in determinacy.count(big.model, _update(big, 1, 64).gradients, big.input_shape, 1))


def test_noise_makes_the_gradient_full_rank() -> None:
    task = _lenet(32)
    clean = _update(task, 1, 32)
    noisy = defend(clean, "noise:std=1e-3", seed=0)
    assert determinacy.count(task.model, clean.gradients, task.input_shape, 1)[0].rank == 1
    assert determinacy.count(task.model, noisy.gradients, task.input_shape, 1)[0].rank == 100


def test_a_run_reports_its_determinacy(tmp_path) -> None:
    out = tmp_path / "r"
    proc = run_cli("run", "dlg", *FAST, "task.image_size=32", "data.batch_size=4", "--samples", "4", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["determinacy"]["batch_size"] == 4 and len(m["determinacy"]["layers"]) == 4
    assert m["determinacy"]["verdict"] in m["attack_notes"]
    assert "does not determine this batch of 4" in proc.stderr
