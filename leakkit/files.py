"""One permission policy for every file leakkit writes: the user's umask, as `open()` applies it.

Some writers (temporary files for atomic JSON, safetensors) create files 0600; leakkit widens them
to what the umask allows, so a run directory's JSON, pictures and tensors share one mode.
"""

from __future__ import annotations

import os
from pathlib import Path


def file_mode(*, directory: bool = False) -> int:
    """0o666 (0o777 for a directory) under the current umask: 0o644 (0o755) with the common umask 022."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_mode(path: str | Path) -> Path:
    """Give `path` (a file or a directory) the policy's mode; returns it."""
    os.chmod(path, file_mode(directory=Path(path).is_dir()))
    return Path(path)
