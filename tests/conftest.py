"""Shared fixtures: small real images on disk and a helper that runs the real CLI."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per worker (and per CLI it starts): two workers on two cores, not four threads
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# Tiny, fast recipe settings for end-to-end checks: a 16x16 LeNet attacked for a few steps.
FAST = ["task.image_size=16", "task.num_classes=10", "attack.steps=3", "attack.restarts=1", "attack.inner_steps=2"]


@pytest.fixture
def photo_png(tmp_path: Path) -> Path:
    """A real photograph (scikit-image's astronaut, downscaled) written as PNG."""
    from PIL import Image
    from skimage import data

    path = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((64, 64)).save(path)
    return path


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    from PIL import Image
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.chelsea()).resize((48, 32)).save(folder / "cat.jpg")
    Image.fromarray(data.camera()).resize((40, 40)).save(folder / "camera.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m leakkit ARGS` in a fresh process, as a user would."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="120")
    return subprocess.run(
        [sys.executable, "-m", "leakkit", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user mistake: non-zero exit, exactly one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert lines[0].startswith("leakkit: error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def real_image(size: int = 16, index: int = 0) -> np.ndarray:
    """A real photo from the embedded source, resized: C x H x W float32 in [0, 1]."""
    from leakkit.vision.data import resize

    return resize(_embedded()[index].image, size, 3)


@functools.lru_cache(maxsize=1)
def _embedded() -> list:
    from leakkit.vision.data import SOURCES

    return SOURCES.get("embedded")("")
