"""Reading a capture: the updates a federated server recorded (`leakkit.integrations.flower`), and, for a
simulation leakkit ran itself, how to rebuild each client's batch so a recovery can be scored.

A capture directory holds capture.json (its index), round-R/global.safetensors (the model each round
started from) and round-R/client-K.safetensors (the updates). A simulation adds to capture.json the
setting it ran (recipe overrides, input, seed, client and round counts) and a digest of each
client's private data, which is kept in truth/, apart from what the server saw.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leakkit.client.observation import Observation
from leakkit.errors import InputError


def digest(files: dict[str, bytes]) -> str:
    """A short hash of a batch's truth files (`ModalityRun.truth`)."""
    h = hashlib.sha256()
    for suffix in sorted(files):
        h.update(suffix.encode() + b"\0" + files[suffix])
    return h.hexdigest()[:16]


@dataclass
class Capture:
    """A capture directory and its index."""

    path: Path
    index: dict[str, Any]

    @classmethod
    def read(cls, path: str | Path) -> "Capture":
        """Raises InputError unless `path` holds a readable capture.json."""
        root = Path(path)
        f = root / "capture.json"
        if not f.is_file():
            raise InputError(f"{root} is not a capture directory (no capture.json); see `leakkit flower simulate`")
        try:
            index = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{f} is not readable JSON: {e}") from None
        return cls(root, index)

    @property
    def simulation(self) -> dict[str, Any]:
        """The setting of the simulation that made this capture; InputError for a capture of a real federation."""
        sim = self.index.get("simulation")
        if not sim:
            raise InputError(
                f"{self.path} was captured from a federation whose clients' data leakkit never saw, so nothing can be scored; "
                "attack its updates one by one with `leakkit attack RECIPE --gradients FILE`"
            )
        return sim

    def batches(self) -> int:
        """Client batches the simulation ran: clients x rounds, in round-major order."""
        sim = self.simulation
        return int(sim["clients"]) * int(sim["rounds"])

    def where(self, batch: int) -> tuple[int, int]:
        """(round, client) of a simulation batch index."""
        clients = int(self.simulation["clients"])
        return batch // clients + 1, batch % clients

    def update(self, batch: int) -> tuple[Observation, Path]:
        """The captured update of a simulation batch and the weights it was computed on.

        Raises:
            InputError: the server did not capture that client (it failed or was not sampled).
        """
        rnd, client = self.where(batch)
        f = self.path / f"round-{rnd}" / f"client-{client}.safetensors"
        if not f.is_file():
            raise InputError(f"round {rnd}: client {client}'s update was not captured ({f} is missing)")
        return Observation.load(f), f.parent / "global.safetensors"

    def check_truth(self, batch: int, files: dict[str, bytes]) -> None:
        """InputError unless `files` are the data this client trained on (the input or recipe changed)."""
        rnd, client = self.where(batch)
        expected = self.simulation.get("truth", {}).get(f"round-{rnd}/client-{client}")
        if expected is not None and expected != digest(files):
            raise InputError(
                f"round {rnd}, client {client}: the data rebuilt from the capture's setting is not what the client trained on "
                f"(was --input {self.simulation.get('input')} changed?)"
            )
