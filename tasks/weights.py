"""Model weights from files: safetensors state_dicts only (never unpickled), keys from wrappers normalised.

A state_dict saved from a wrapped model carries the wrapper's prefix: `_module.` from Opacus'
GradSampleModule, `module.` from DataParallel / DistributedDataParallel. They are stripped, so a
checkpoint saved in the middle of a user's training loads into the bare model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from leakkit.errors import InputError, few

WRAPPER_PREFIXES = ("_module.", "module.")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (repeatedly: an Opacus module inside DDP has both) from every key.

    Args:
        state: name -> tensor, as saved.
    Returns:
        The same tensors under the bare model's names.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        while True:
            stripped = next((name[len(p):] for p in WRAPPER_PREFIXES if name.startswith(p)), None)
            if stripped is None:
                break
            name = stripped
        if name in out:
            raise InputError(f"two tensors map to {name!r} once wrapper prefixes are removed")
        out[name] = value
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from a .safetensors file, keys normalised (`normalise_keys`).

    Raises:
        InputError: a missing or unreadable file, or a pickle-based format (.pt, .pth, ...), which
            is refused because loading it can run arbitrary code.
    """
    return normalise_keys(_read_raw(path))


def _read_raw(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(
            f"{path}: {path.suffix} files are pickles and are never loaded here (they can run code); save the weights with "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
        )
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"not a readable safetensors file: {path} ({e})") from None
    return state


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Copy a safetensors state_dict into `model` in place (the model was built for this run).

    Every parameter and buffer of the model must be in the file with its shape; keys the model does
    not have are an error too, so a checkpoint of another architecture never half-loads.

    Returns:
        The wrapper prefixes that were stripped (for the run's notes).
    Raises:
        InputError: unreadable file, missing or unexpected keys, or wrong shapes (one line naming them).
    """
    raw = _read_raw(path)
    state = normalise_keys(raw)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if unexpected:
        problems.append(f"unexpected {few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {few(wrong)}")
    if problems:
        raise InputError(f"{path} does not fit the model {type(model).__name__}: {'; '.join(problems)}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(target.dtype))
    return sorted({p for k in raw for p in WRAPPER_PREFIXES if k.startswith(p)})

