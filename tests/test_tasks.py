import pytest
import torch
from torch import nn

from leakkit.tasks import MODELS, ImageClassification, torchvision_available


class ReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.head = nn.Linear(4 * 14 * 14, 5)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).flatten(1))


def test_relu_model_gets_a_clear_warning():
    with pytest.warns(UserWarning, match="second derivative is zero"):
        ImageClassification(ReluNet(), num_classes=5, image_size=16)


def test_any_user_module_works_and_classifier_is_found():
    with pytest.warns(UserWarning):
        task = ImageClassification(ReluNet(), num_classes=5, image_size=16)
    assert task.classifier_parameter_names() == ("head.weight", "head.bias")
    grads = task.gradients(torch.rand(2, 3, 16, 16), torch.tensor([0, 4]))
    assert [tuple(g.shape) for g in grads] == [tuple(p.shape) for _, p in task.parameters()]


@pytest.mark.parametrize("name", MODELS.names())
def test_builtin_models_are_twice_differentiable(name):
    task = ImageClassification.from_name(name, num_classes=10, image_size=32)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    grads = task.gradients(x, torch.tensor([1, 2]), create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), x)[0]
    assert second.abs().sum() > 0


def test_normalisation_round_trip_and_box():
    task = ImageClassification.from_name("lenet", num_classes=10, image_size=8, mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4])
    pixels = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(task.to_pixels(task.from_pixels(pixels)), pixels)
    projected = task.to_pixels(task.project(task.from_pixels(pixels * 3 - 1)))
    assert projected.min() >= 0 and projected.max() <= 1


def test_initial_guesses():
    task = ImageClassification.from_name("lenet", num_classes=10, image_size=8)
    g = torch.Generator().manual_seed(0)
    for init in ("uniform", "gaussian", "mid"):
        assert task.initial_guess(2, init=init, generator=g).shape == (2, 3, 8, 8)


@pytest.mark.skipif(not torchvision_available(), reason="torchvision does not import on this torch")
def test_torchvision_model_by_name():
    task = ImageClassification.from_name("torchvision:resnet18", num_classes=10, image_size=32)
    assert task.classifier_parameter_names() == ("fc.weight", "fc.bias")
