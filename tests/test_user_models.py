"""A user's own model class, trained weights and checkpoint pairs: loaded exactly, refused clearly, attacked."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import real_image
from leakkit.cli import main
from leakkit.client.checkpoints import update_from_checkpoints
from leakkit.errors import ConfigError, InputError
from leakkit.tasks import ImageClassification
from leakkit.tasks.models import build_model
from leakkit.tasks.weights import load_weights, normalise_keys, read_state_dict

USER_MODEL = '''
import torch
from torch import nn

SIDE_EFFECT = []


class Net(nn.Module):
    """Two sigmoid convolutions and a linear classifier, PyTorch's default initialisation."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.Sigmoid(),
                                      nn.Conv2d(8, 8, 5, stride=1, padding=2), nn.Sigmoid())
        self.classifier = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class Helper:
    pass
'''


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "my_models.py").write_text(USER_MODEL, encoding="utf-8")
    return tmp_path


def _net(user_dir: Path) -> nn.Module:
    return build_model(f"{user_dir}/my_models.py:Net", num_classes=10, channels=3, image_size=16)


def test_user_class_is_built_with_the_arguments_it_takes(user_dir: Path) -> None:
    net = _net(user_dir)
    assert type(net).__name__ == "Net" and net.classifier.out_features == 10  # image_size/channels not passed: it takes neither
    with pytest.raises(ConfigError, match="has no nn.Module class 'Helper'; it defines: Net"):
        build_model(f"{user_dir}/my_models.py:Helper", num_classes=10, channels=3, image_size=16)
    with pytest.raises(ConfigError, match="no such file"):
        build_model(f"{user_dir}/nothing.py:Net", num_classes=10, channels=3, image_size=16)
    (user_dir / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(ConfigError, match="importing .*broken.py failed: ModuleNotFoundError"):
        build_model(f"{user_dir}/broken.py:Net", num_classes=10, channels=3, image_size=16)


def test_weights_load_exactly_and_wrapper_prefixes_are_normalised(user_dir: Path) -> None:
    torch.manual_seed(3)
    trained = _net(user_dir)
    # as Opacus inside DDP would save it: module._module.features.0.weight
    save_file({f"module._module.{k}": v for k, v in trained.state_dict().items()}, str(user_dir / "w.safetensors"))
    fresh = _net(user_dir)
    assert load_weights(fresh, user_dir / "w.safetensors") == ["module."]
    for (n, a), (_, b) in zip(trained.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    assert list(normalise_keys({"_module.fc.weight": torch.zeros(1)})) == ["fc.weight"]


def test_weights_that_do_not_fit_are_named(user_dir: Path) -> None:
    state = _net(user_dir).state_dict()
    state.pop("classifier.bias")
    state["extra.weight"] = torch.zeros(2)
    state["features.0.weight"] = torch.zeros(4, 3, 5, 5)
    save_file(state, str(user_dir / "bad.safetensors"))
    with pytest.raises(InputError) as err:
        load_weights(_net(user_dir), user_dir / "bad.safetensors")
    message = str(err.value)
    assert "missing classifier.bias" in message and "unexpected extra.weight" in message and "features.0.weight (4, 3, 5, 5)" in message


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("model.pt", "model.pth", "model.bin"):
        (tmp_path / name).write_bytes(pickle.dumps(Evil()))
        with pytest.raises(InputError, match="pickles and are never loaded"):
            read_state_dict(tmp_path / name)
    assert not marker.exists()


def test_run_uses_the_users_model_and_weights(user_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(user_dir)
    torch.manual_seed(5)
    save_file(_net(user_dir).state_dict(), str(user_dir / "trained.safetensors"))
    argv = ["run", "rgap", "task.model=my_models.py:Net", "task.num_classes=10", "task.image_size=16",
            "task.weights=trained.safetensors", "--out", "r", "--quiet"]
    assert main(argv) == 0
    saved = load_file(str(user_dir / "r" / "recovered.safetensors"))
    assert saved["pixels"].shape == (1, 3, 16, 16) and 0 <= float(saved["pixels"].min()) and float(saved["pixels"].max()) <= 1
    import json

    metrics = json.loads((user_dir / "r" / "metrics.json").read_text())
    assert metrics["summary"]["psnr_median"] > 30


def _sgd_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int = 1) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def test_a_checkpoint_pair_from_plain_pytorch_sgd_is_attacked(user_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's figure: one torch.optim.SGD step on a user's class, saved before and after: >= 30 dB."""
    monkeypatch.chdir(user_dir)
    torch.manual_seed(1)
    net = _net(user_dir)
    save_file(net.state_dict(), "before.safetensors")
    x = torch.from_numpy(real_image(16, 2))[None]
    _sgd_step(net, x, torch.tensor([4]), lr=0.1)
    save_file(net.state_dict(), "after.safetensors")
    argv = ["attack", "rgap", "task.model=my_models.py:Net", "task.num_classes=10", "task.image_size=16", "client.local_lr=0.1",
            "--checkpoints", "before.safetensors", "after.safetensors", "--out", "a", "--quiet"]
    assert main(argv) == 0
    pixels = load_file("a/recovered.safetensors")["pixels"].numpy()
    psnr = 10 * np.log10(1 / np.mean((pixels - x.numpy()) ** 2))
    assert psnr >= 30, psnr


def test_checkpoint_update_equals_the_simulated_client(user_dir: Path, tmp_path: Path) -> None:
    """(before - after) / lr is the gradient; several steps give Task.local_update's weight difference."""
    torch.manual_seed(2)
    task = ImageClassification(_net(user_dir), num_classes=10, image_size=16)
    x = torch.stack([torch.from_numpy(real_image(16, i)) for i in range(2)])
    y = torch.tensor([1, 7])
    save_file(task.model.state_dict(), str(tmp_path / "b.safetensors"))
    for steps in (1, 3):
        net = _net(user_dir)
        net.load_state_dict(task.model.state_dict())
        _sgd_step(net, x, y, lr=0.05, steps=steps)
        save_file(net.state_dict(), str(tmp_path / "a.safetensors"))
        obs = update_from_checkpoints(tmp_path / "b.safetensors", tmp_path / "a.safetensors", task, local_lr=0.05, local_steps=steps, batch_size=2)
        expected = [t.detach() for t in (task.gradients(x, y) if steps == 1 else task.local_update(x, y, steps=steps, lr=0.05))]
        for (name, got), want in zip(obs.gradients.items(), expected):
            scale = float(want.abs().max())
            assert float((got - want).abs().max()) <= 1e-4 * scale + 1e-7, name
        assert bool(obs.extra.get("fedavg")) == (steps > 1)
    with pytest.raises(InputError, match="same weights"):
        update_from_checkpoints(tmp_path / "b.safetensors", tmp_path / "b.safetensors", task, local_lr=0.05, batch_size=2)
