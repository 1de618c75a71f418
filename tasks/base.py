"""The contract between a task adapter and the engine.

A task owns a model, the differentiable input space the attack searches, and the training loss.
The engine only ever calls the methods below; it knows nothing of pixels or tokens.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
from torch import nn


class Task(ABC):
    """Base class for task adapters.

    Subclasses set `model`, `num_classes` and `input_shape` (per example, without batch) and
    implement `loss`, `initial_guess` and `project`.
    """

    name: str = "task"
    model: nn.Module
    num_classes: int
    input_shape: tuple[int, ...]

    # --- what subclasses define -------------------------------------------------------------
    @abstractmethod
    def loss(self, inputs: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        """Training loss of the model on `inputs`.

        Args:
            inputs: Shape [B, *input_shape], in the task's input space.
            labels: Shape [B] (class ids) or [B, num_classes] (probabilities, soft labels).
            reduction: "mean" or "sum" over the batch.
        Returns:
            A scalar tensor.
        """

    @abstractmethod
    def initial_guess(self, batch_size: int, *, init: str, generator: torch.Generator) -> torch.Tensor:
        """A starting point for the search, shape [B, *input_shape], float64 on the CPU."""

    @abstractmethod
    def project(self, inputs: torch.Tensor) -> torch.Tensor:
        """Map a candidate back into the feasible input set (e.g. the pixel box)."""

    @abstractmethod
    def classifier_parameter_names(self) -> tuple[str, str | None]:
        """Names of the output layer's (weight, bias) parameters; bias is None if absent."""

    # --- shared behaviour -------------------------------------------------------------------
    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters whose gradients are shared, in model order."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def matched_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters whose gradients the engine matches (default: all shared ones)."""
        return self.parameters()

    def span_probe(self) -> tuple[list[str], Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        """What input-space objectives (`subspace`) read: the weight names of the first layers that
        take the candidate in, and a differentiable map from a candidate to those layers' input.

        Returns:
            (weight names, probe); probe(inputs [B, *input_shape]) -> (layer input [B, n, d],
            mask [B, n] of the positions that count).
        Raises:
            ConfigError: the task has no such layers (the default).
        """
        from leakkit.errors import ConfigError

        raise ConfigError(f"the {self.name} task has no span probe: the subspace objective needs a text task")

    def label_rows(self, batch_size: int) -> int:
        """Rows of the label tensor for a batch (one per example; one per position for token tasks)."""
        return batch_size

    def prepare(self, observation: object) -> "Task":
        """The task as the attacker uses it for this observation (text tasks read the batch layout
        off the gradient here). Must not use anything but the observation."""
        return self

    def gradients(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        reduction: str = "mean",
        create_graph: bool = False,
        matched: bool = False,
    ) -> list[torch.Tensor]:
        """Gradient of `loss` with respect to every shared parameter (or only the matched ones), in model order."""
        params = [p for _, p in (self.matched_parameters() if matched else self.parameters())]
        loss = self.loss(inputs, labels, reduction=reduction)
        return list(torch.autograd.grad(loss, params, create_graph=create_graph))

    def local_update(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        steps: int,
        lr: float,
        local_batch: int = 0,
        reduction: str = "mean",
        create_graph: bool = False,
        matched: bool = False,
    ) -> list[torch.Tensor]:
        """The weight difference θ0 - θK after K plain SGD steps (FedAvg's shared update).

        Step k uses examples [k*b, (k+1)*b) of the batch, cycling (b = local_batch, 0 = all).
        The steps run on parameter values passed to the model for the call only
        (`torch.func.functional_call`), so the model itself is never changed; with
        create_graph the whole unrolled trajectory is differentiable in the inputs.

        Returns:
            One tensor per shared (or matched) parameter, in model order.
        """
        names = [n for n, _ in self.parameters()]
        current = {n: p for n, p in self.parameters()}
        B = inputs.shape[0]
        b = local_batch if 0 < local_batch < B else B
        caller = _LossCall(self)
        for k in range(steps):
            idx = [(k * b + i) % B for i in range(b)]
            loss = torch.func.functional_call(caller, {f"model.{n}": t for n, t in current.items()}, (inputs[idx], labels[idx], reduction))
            grads = torch.autograd.grad(loss, [current[n] for n in names], create_graph=create_graph)
            current = {n: current[n] - lr * g for n, g in zip(names, grads)}
        keep = {n for n, _ in (self.matched_parameters() if matched else self.parameters())}
        params = dict(self.parameters())
        return [params[n] - current[n] for n in names if n in keep]

    def gradients_and_features(
        self, inputs: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean", create_graph: bool = False, matched: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`gradients`, plus the input of the output layer ([B, D]) from the same forward pass.

        The features are captured with a forward pre-hook that is removed before returning; call
        this on an attacker's copy (`copy_to`), never to modify a user's model.
        """
        weight_name, _ = self.classifier_parameter_names()
        layer = self.model.get_submodule(weight_name.rpartition(".")[0])
        captured: list[torch.Tensor] = []
        handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            grads = self.gradients(inputs, labels, reduction=reduction, create_graph=create_graph, matched=matched)
        finally:
            handle.remove()
        return grads, captured[-1].flatten(1)

    def copy_to(self, *, dtype: torch.dtype, device: str | torch.device) -> "Task":
        """A copy of this task whose model is a deep copy on `device` in `dtype`.

        The user's model is never modified: the attacker works on its own copy.
        """
        clone = copy.copy(self)
        # tensors converted straight into the copy (deepcopy's memo): a copy first and a
        # conversion after would hold the model twice, the dominant cost on bert-base-sized models
        memo: dict[int, object] = {}
        for t in (*self.model.parameters(), *self.model.buffers()):
            if id(t) not in memo:
                new = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
                memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        clone.model = copy.deepcopy(self.model, memo)
        clone.model.eval()
        return clone

    def _prepare_labels(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if labels.dtype in (torch.int64, torch.int32):
            return nn.functional.one_hot(labels.long(), self.num_classes).to(like)
        return labels.to(like)


class _LossCall(nn.Module):
    """Holds a task's model as a submodule so `functional_call` can substitute its parameters."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.model = task.model
        self._task = [task]  # a list, so the task is not registered as a submodule

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        return self._task[0].loss(inputs, labels, reduction=reduction)


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy against a distribution (equals the usual loss for one-hot targets)."""
    per_example = -(probs * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
    return per_example.mean() if reduction == "mean" else per_example.sum()


def non_smooth_modules(model: nn.Module, kinds: Sequence[type[nn.Module]]) -> list[str]:
    """Names of submodules of the given types (used to warn about zero second derivatives)."""
    return [n for n, m in model.named_modules() if isinstance(m, tuple(kinds))]
