"""Image classification: the attack searches normalised pixel space."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from leakkit.tasks.base import Task, non_smooth_modules, soft_cross_entropy
from leakkit.tasks.models import build_model

# Modules whose second derivative is zero almost everywhere: gradient matching needs curvature.
PIECEWISE_LINEAR = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.PReLU, nn.MaxPool2d)


class ImageClassification(Task):
    """Adapter for any image classifier `nn.Module` mapping [B, C, H, W] to [B, num_classes] logits.

    The input space is normalised pixels, x = (pixels - mean) / std, with pixels in [0, 1]; the
    adapter keeps mean and std so recoveries can be shown as images.

    Args:
        model: the classifier (used as is; never wrapped or modified).
        num_classes: number of output logits.
        image_size: height and width of the input.
        channels: input channels.
        mean, std: per-channel normalisation (defaults leave pixels in [0, 1]).
    """

    name = "image-classification"

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        image_size: int,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.model = model
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.input_shape = (channels, image_size, image_size)
        self.mean = torch.tensor(mean if mean is not None else [0.0] * channels, dtype=torch.float64).view(1, -1, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0] * channels, dtype=torch.float64).view(1, -1, 1, 1)
        flat = non_smooth_modules(model, PIECEWISE_LINEAR)
        if flat:
            warnings.warn(
                f"model has piecewise-linear modules ({', '.join(flat[:3])}{'...' if len(flat) > 3 else ''}) "
                "whose second derivative is zero: gradient matching (dlg, idlg) is much weaker there; "
                "the closed form still inverts plain chains of such layers: leakkit run rgap "
                "(LeNet-ReLU, batch 1: held-out images came back recognisable, 50/50), or auto for the strongest attack",
                stacklevel=2,
            )

    @classmethod
    def from_name(
        cls,
        model: str,
        *,
        num_classes: int = 100,
        image_size: int = 32,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> "ImageClassification":
        """Build the adapter around a built-in model ("lenet", "convnet", "resnet") or `torchvision:NAME`."""
        net = build_model(model, num_classes=num_classes, channels=channels, image_size=image_size)
        return cls(net, num_classes=num_classes, image_size=image_size, channels=channels, mean=mean, std=std)

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        logits = self.model(inputs)
        return soft_cross_entropy(logits, self._prepare_labels(labels, logits), reduction)

    # pixel box [0, 1] expressed in normalised coordinates
    def _bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.mean.to(like), self.std.to(like)
        return (0 - mean) / std, (1 - mean) / std

    def initial_guess(self, batch_size: int, *, init: str, generator: torch.Generator) -> torch.Tensor:
        shape = (batch_size, *self.input_shape)
        if init == "uniform":  # uniform over the pixel box: the images' own range
            pixels = torch.rand(shape, generator=generator, dtype=torch.float64)
            return (pixels - self.mean) / self.std
        if init == "mid":  # flat mid-grey with faint noise: leaves little energy where gradients cannot see
            pixels = 0.5 + 0.01 * torch.randn(shape, generator=generator, dtype=torch.float64)
            return (pixels - self.mean) / self.std
        if init == "gaussian":  # the DLG paper's N(0, 1) start
            return torch.randn(shape, generator=generator, dtype=torch.float64)
        raise ValueError(f"unknown init {init!r}; valid: gaussian, mid, uniform")

    def project(self, inputs: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bounds(inputs)
        return torch.maximum(torch.minimum(inputs, hi), lo)

    def to_pixels(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised inputs [B, C, H, W] -> pixels in [0, 1], same shape (clamped)."""
        mean, std = self.mean.to(inputs), self.std.to(inputs)
        return (inputs * std + mean).clamp(0, 1)

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1], [B, C, H, W] -> normalised model inputs."""
        mean, std = self.mean.to(pixels), self.std.to(pixels)
        return (pixels - mean) / std

    def classifier_parameter_names(self) -> tuple[str, str | None]:
        last = None
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and module.out_features == self.num_classes:
                last = name
        if last is None:
            raise ValueError("no nn.Linear output layer with num_classes outputs found")
        prefix = f"{last}." if last else ""
        has_bias = getattr(self.model.get_submodule(last), "bias", None) is not None
        return f"{prefix}weight", (f"{prefix}bias" if has_bias else None)
