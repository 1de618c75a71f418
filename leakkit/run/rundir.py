"""One directory per run: resolved config, metrics stamped with provenance, trace, pictures."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from leakkit.errors import ConfigError, InputError
from leakkit.files import apply_mode


def provenance(*, seed: int, device: str) -> dict[str, Any]:
    """Package version, git commit of the leakkit source (if a checkout), torch version, device, seed."""
    import torch

    from leakkit import __version__

    return {
        "leakkit_version": __version__,
        "git_commit": _git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
    }


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def claim_output(
    path: str | Path, *, resume: bool = False, overwrite: bool = False, marker: str = "config.json", what: str = "run",
    checks_itself: bool = False,
) -> Path:
    """Check that `path` may receive a run (or an audit) and return it.

    Absent or empty: a new one. Holding one (`marker` present): `resume` continues it, `overwrite`
    replaces it; without either it is refused, so a finished run is never overwritten by accident.
    Anything else there (a file, a non-empty folder of something else) is refused. With
    `checks_itself`, an existing one is left to the caller (an audit compares its spec first).

    Raises:
        InputError: one line saying what is at `path` and which flag (if any) would proceed.
    """
    p = Path(path)
    if resume and overwrite:
        raise ConfigError("--resume continues and --overwrite replaces: give one of them")
    if p.exists() and not p.is_dir():
        raise InputError(f"--out {p} is a file; give a directory for the {what}")
    empty = not p.exists() or not any(p.iterdir())
    holds = (p / marker).is_file()
    if resume:
        if not holds:
            raise InputError(f"--resume: {p} holds no {what} to continue")
        return p
    if empty:
        return p
    if not holds:
        raise InputError(f"--out {p} is not empty and holds no {what}; choose another directory")
    if not overwrite:
        if checks_itself:
            return p
        raise InputError(f"--out {p} already holds a {what}; pass --resume to continue it or --overwrite to replace it")
    shutil.rmtree(p)
    return p


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader (or a crash) never sees a half-written file.

    JSON has no NaN or infinity: such values (an SSIM undefined for tiny images, a median time
    to a threshold never reached) are written as null.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    apply_mode(tmp)  # mkstemp makes 0600: JSON gets the same bits as the pictures beside it
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_finite(obj), f, indent=2, allow_nan=False, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _finite(o: Any) -> Any:
    if isinstance(o, (float, np.floating)) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunDir:
    """The files of one run.

    config.json (resolved recipe and CLI options), metrics.json (summary, samples, provenance;
    rewritten after every batch), trace.jsonl (per-step gradient distance), grid.png, and
    recovered.safetensors (the recovered inputs).
    """

    def __init__(self, path: str | Path, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._trace = self.path / "trace.jsonl"
        if not (resume and self._trace.exists()):
            self._trace.write_text("", encoding="utf-8")

    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON file of this run; InputError if it is missing or unreadable."""
        f = self.path / name
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read {f}: {e}") from None

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.path / "config.json", config)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.path / "metrics.json", metrics)

    def append_trace(self, rows: Iterable[dict[str, Any]]) -> None:
        with self._trace.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=_json_default) + "\n")

    def write_text(self, name: str, text: str) -> Path:
        """Write a UTF-8 text file in the run directory atomically (readers never see half a file)."""
        path = self.path / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return path

    def save_image(self, name: str, image: np.ndarray) -> Path:
        from PIL import Image

        path = self.path / name
        Image.fromarray(image).save(path)
        return path

    def save_tensors(self, name: str, tensors: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        path = self.path / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return apply_mode(path)
