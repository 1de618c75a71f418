"""Built-in image classifiers: twice differentiable (sigmoid / GELU) apart from the ReLU variants
kept for the ReLU question (`lenet-relu`, `resnet-relu`); no BatchNorm.

BatchNorm is avoided on purpose: in training mode its statistics couple the examples of a batch,
which is a different threat model; GroupNorm keeps examples independent.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from leakkit.registry import Registry

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")


class LeNetSigmoid(nn.Module):
    """The DLG paper's LeNet: three strided 5x5 convolutions with sigmoid, one linear layer.

    Weights are drawn uniformly from [-0.5, 0.5], as in the paper's code: with PyTorch's default
    (much smaller) initialisation the sigmoids are nearly linear and the leak is weaker.
    `activation` exists for the paper's sigmoid-vs-ReLU comparison (`lenet-relu`).
    """

    def __init__(self, num_classes: int = 100, channels: int = 3, image_size: int = 32, activation: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, 5, padding=2, stride=2),
            activation(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2),
            activation(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1),
            activation(),
        )
        side = ((image_size + 1) // 2 + 1) // 2  # after two stride-2 convolutions with padding 2
        self.fc = nn.Linear(12 * side * side, num_classes)
        for p in self.parameters():
            nn.init.uniform_(p, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class ConvNet(nn.Module):
    """A small VGG-like network: three conv-GroupNorm-GELU stages with average pooling."""

    def __init__(self, num_classes: int = 10, channels: int = 3, image_size: int = 32, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for c_out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.GELU(), nn.AvgPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, activation: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)
        self.act = activation()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(min(8, c_out), c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNetGELU(nn.Module):
    """A CIFAR-style ResNet (3 stages, `blocks` basic blocks each) with GELU and GroupNorm.

    `activation` exists for the ReLU variant (`resnet-relu`), the network the Inverting Gradients paper attacked.
    """

    def __init__(
        self, num_classes: int = 10, channels: int = 3, image_size: int = 32, width: int = 16, blocks: int = 1,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.GroupNorm(min(8, width), width), activation())
        stages: list[nn.Module] = []
        c_in = width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                stages.append(_Block(c_in, c_out, stride=2 if (i > 0 and b == 0) else 1, activation=activation))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


@MODELS.register("lenet", description="DLG paper's LeNet with sigmoid (3 strided convs + linear), uniform init")
def _lenet(**kw: int) -> nn.Module:
    return LeNetSigmoid(**kw)


@MODELS.register("lenet-relu", description="the same LeNet with ReLU: second derivatives vanish almost everywhere (DLG's negative case)")
def _lenet_relu(**kw: int) -> nn.Module:
    return LeNetSigmoid(activation=nn.ReLU, **kw)


@MODELS.register("convnet", description="small conv-GroupNorm-GELU network, width 32")
def _convnet(**kw: int) -> nn.Module:
    return ConvNet(**kw)


@MODELS.register("resnet", description="CIFAR-style ResNet-8 with GELU and GroupNorm, width 16")
def _resnet(**kw: int) -> nn.Module:
    return ResNetGELU(**kw)


@MODELS.register("resnet-relu", description="the same ResNet-8 with ReLU (as Inverting Gradients attacked; GroupNorm instead of BatchNorm)")
def _resnet_relu(**kw: int) -> nn.Module:
    return ResNetGELU(activation=nn.ReLU, **kw)


def torchvision_available() -> bool:
    """True when torchvision imports on this torch (it is an optional extra)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA torchvision on CPU torch fails with errors other than ImportError
        return False
    return True


def user_model(spec: str, **options: int) -> nn.Module:
    """Instantiate `FILE.py:Class`, a model class from a Python file the user names.

    The file is imported, so its top-level code runs: it is code the user chose to run. The class is
    called with whichever of num_classes / channels / image_size its constructor accepts.

    Raises:
        ConfigError: no such file or class, an import error in the file, or a class that is not an nn.Module.
    """
    import importlib.util
    import inspect
    import sys
    from pathlib import Path

    from leakkit.errors import ConfigError

    file, _, cls_name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"task.model={spec}: no such file {file}")
    module_name = f"leakkit_user_model_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    if loader is None or loader.loader is None:
        raise ConfigError(f"task.model={spec}: {file} cannot be imported as Python")
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module  # so dataclasses and pickling inside the file find it
    try:
        loader.loader.exec_module(module)
    except Exception as e:  # the user's file: report its error in one line, whatever it is
        sys.modules.pop(module_name, None)
        raise ConfigError(f"task.model={spec}: importing {file} failed: {type(e).__name__}: {e}") from None
    cls = getattr(module, cls_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        found = sorted(n for n, v in vars(module).items() if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == module_name)
        raise ConfigError(f"task.model={spec}: {file} has no nn.Module class {cls_name!r}; it defines: {', '.join(found) or 'none'}")
    accepted = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in options.items() if takes_any or k in accepted}
    try:
        return cls(**kwargs)
    except Exception as e:
        raise ConfigError(f"task.model={spec}: {cls_name}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) failed: {type(e).__name__}: {e}") from None


def is_user_model(name: str) -> bool:
    """True for `FILE.py:Class` model names."""
    return ".py:" in name


def build_model(name: str, *, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """Build a built-in model by name, a torchvision model (`torchvision:resnet18`) when available,
    or a user's class (`my_models.py:Net`, see `user_model`)."""
    if is_user_model(name):
        return user_model(name, num_classes=num_classes, channels=channels, image_size=image_size)
    if name.startswith("torchvision:"):
        from leakkit.errors import ConfigError

        if not torchvision_available():
            raise ConfigError(f"model {name!r} needs torchvision, which does not import here")
        import torchvision

        return torchvision.models.get_model(name.split(":", 1)[1], weights=None, num_classes=num_classes)
    return MODELS.get(name)(num_classes=num_classes, channels=channels, image_size=image_size)
