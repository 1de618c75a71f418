"""What the attacker holds: the shared update, as named tensors plus metadata.

File format: one safetensors file. Tensors are the parameter gradients keyed by the model's
parameter names; the safetensors header's `__metadata__` carries one key, `leakkit`, whose
value is a JSON object (format_version, batch_size, reduction, model, fingerprint,
parameter_order -- safetensors stores tensors sorted by name -- and `extra`, free-form). Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leakkit.errors import InputError, ObservationMismatch, few
from leakkit.files import apply_mode

FORMAT_VERSION = 1


def fingerprint(model: nn.Module) -> str:
    """A short hash of the model's trainable parameter names and shapes (not its values)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


@dataclass
class Observation:
    """A shared gradient (FedSGD) as the attacker receives it.

    Args:
        gradients: parameter name -> gradient tensor, in the model's parameter order.
        batch_size: number of examples the client averaged over.
        reduction: "mean" or "sum", how the client's loss combined the batch.
        model: a human-readable model identity (e.g. "lenet").
        fingerprint: `fingerprint(model)` of the model the gradient came from.
        extra: any further JSON-serialisable metadata.
    """

    gradients: dict[str, torch.Tensor]
    batch_size: int
    reduction: str = "mean"
    model: str = ""
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "batch_size": self.batch_size,
            "reduction": self.reduction,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "parameter_order": list(self.gradients),
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write the observation as a safetensors file with JSON metadata in its header."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.gradients.items()}
        save_file(tensors, str(path), metadata={"leakkit": json.dumps(self.metadata())})
        return apply_mode(path)

    @classmethod
    def load(cls, path: str | Path) -> "Observation":
        """Read a file written by `save`. Raises InputError for a missing or malformed file."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"gradient file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"not a readable safetensors file: {path} ({e})") from None
        if "leakkit" not in header:
            raise InputError(f"{path} has no leakkit metadata (batch size, reduction)")
        try:
            meta = json.loads(header["leakkit"])
            listed = [str(n) for n in meta.get("parameter_order", [])]
        except (ValueError, TypeError, AttributeError) as e:
            raise InputError(f"malformed leakkit metadata in {path}: {e}") from None
        _check_tensors(path, tensors, listed)
        try:
            order = [n for n in listed if n in tensors]
            ordered = {n: tensors[n] for n in order} | {n: t for n, t in tensors.items() if n not in order}
            return cls(
                gradients=ordered,
                batch_size=int(meta["batch_size"]),
                reduction=str(meta.get("reduction", "mean")),
                model=str(meta.get("model", "")),
                fingerprint=str(meta.get("fingerprint", "")),
                extra=dict(meta.get("extra", {})),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"malformed leakkit metadata in {path}: {e}") from None

    @property
    def local_steps(self) -> int:
        """Client SGD steps behind the update: 1 for a gradient (FedSGD), K for a FedAvg weight difference."""
        fedavg = self.extra.get("fedavg")
        return int(fedavg.get("local_steps", 1)) if isinstance(fedavg, dict) else 1

    def upcast(self) -> "Observation":
        """This observation with half-precision tensors (an fp16/bf16 defense) widened to float32."""
        if all(t.dtype not in (torch.float16, torch.bfloat16) for t in self.gradients.values()):
            return self
        grads = {n: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for n, t in self.gradients.items()}
        return Observation(grads, self.batch_size, self.reduction, self.model, self.fingerprint, dict(self.extra))

    def check_against(self, model: nn.Module) -> None:
        """Raise ObservationMismatch unless names and shapes fit the model's trainable parameters.

        A client may withhold some gradients (frozen layers); what it shares must fit exactly.
        """
        expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        got = {n: tuple(t.shape) for n, t in self.gradients.items()}
        missing = [n for n in expected if n not in got] if not (set(got) & set(expected)) else []
        unexpected = [n for n in got if n not in expected]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {few(missing)}")
            if unexpected:
                parts.append(f"unexpected {few(unexpected)}")
            raise ObservationMismatch(
                f"gradient names do not match the model: {'; '.join(parts)}"
            )
        wrong = [f"{n} {got[n]} != {s}" for n, s in expected.items() if n in got and got[n] != s]
        if wrong:
            raise ObservationMismatch(f"gradient shapes do not match the model: {few(wrong)}")
        if self.batch_size < 1:
            raise ObservationMismatch(f"batch size must be positive, got {self.batch_size}")
        if self.reduction not in ("mean", "sum"):
            raise ObservationMismatch(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        fedavg = self.extra.get("fedavg")
        if fedavg and not (isinstance(fedavg.get("local_lr"), (int, float)) and fedavg["local_lr"] > 0):
            raise ObservationMismatch(
                "the update does not record the client's learning rate, so its weight difference cannot be simulated; "
                "capture it with the clients' lr (CaptureStrategy(local_lr=...)) or write it into the file's metadata"
            )


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], listed: list[str]) -> None:
    """One InputError naming every tensor that differs from the file's own metadata, is not a float
    tensor, or holds NaN/inf: such a file cannot be the update its header describes."""
    problems = []
    if listed:
        missing = [n for n in listed if n not in tensors]
        extra = [n for n in tensors if n not in set(listed)]
        if missing:
            problems.append(f"missing {few(missing)} (listed in its metadata)")
        if extra:
            problems.append(f"extra {few(extra)} (not in its metadata)")
    not_float = [f"{n} ({str(t.dtype).replace('torch.', '')})" for n, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        problems.append(f"not floating point: {few(not_float)}")
    non_finite = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if non_finite:
        problems.append(f"NaN or inf in {few(non_finite)}")
    if problems:
        raise InputError(f"{path}: {'; '.join(problems)}")

