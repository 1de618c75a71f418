"""Where a model's linear layers take their inputs: found by tracing one forward pass, so any
architecture works without naming its modules (BERT's query/key/value, GPT-2's fused c_attn)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

# Fused query/key/value projections: one layer reads the attention input (GPT-2, GPT-NeoX, Phi, MPT)
FUSED_QKV = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")


class Stop(Exception):
    """Raised from a forward hook once the wanted activation has been captured."""


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer that stores its weight as [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass
class LinearCall:
    name: str
    input_id: int


def linear_groups(model: nn.Module, example_ids: torch.Tensor) -> list[list[str]]:
    """Names of linear modules that read the same tensor, in call order (e.g. Q, K, V of each
    attention layer), and fused QKV projections on their own (FUSED_QKV). Found with temporary
    forward pre-hooks on one forward pass."""
    calls: list[LinearCall] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: calls.append(LinearCall(name, id(a[0])))))
    try:
        with torch.no_grad():
            model(input_ids=example_ids)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[tuple[str, int]]] = []
    for call in calls:
        if groups and call.input_id == groups[-1][0][1]:
            groups[-1].append((call.name, call.input_id))
        else:
            groups.append([(call.name, call.input_id)])
    return [[n for n, _ in g] for g in groups if len(g) >= 2 or g[0][0].rpartition(".")[2] in FUSED_QKV]


def input_of(model: nn.Module, module_name: str, run: Callable[[], Any]) -> torch.Tensor:
    """The tensor `module_name` receives while `run()` calls the model (stopped right there; the
    autograd graph is kept when `run` records one)."""
    box: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        box.append(args[0])
        raise Stop

    handle = model.get_submodule(module_name).register_forward_pre_hook(hook)
    try:
        run()
    except Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"{module_name} was not reached in the forward pass")
    return box[0]
