"""Text sources, by name: private sentences (with an optional class label) for text recipes.

The embedded default is twenty sentences written for leakkit (leakkit/text/sentences.txt), so a text
recipe runs with nothing downloaded; users bring their own text as a .txt (one sentence per
line) or a .tsv (a sentence column and an optional integer label column, in either order).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from leakkit.errors import ConfigError, InputError
from leakkit.registry import Registry


@dataclass
class TextSample:
    """One private sentence; `label` is None when the source has no class column."""

    text: str
    label: int | None
    name: str


TextSource = Callable[[str], list[TextSample]]
TEXT_SOURCES: Registry[TextSource] = Registry("text source")


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"text file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise InputError(f"{path} holds no sentences")
    for k, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"{path}:{k}: empty line (one sentence per line)")
    return lines


@TEXT_SOURCES.register("lines", description="a UTF-8 text file, one sentence per line")
def lines(path: str) -> list[TextSample]:
    p = Path(path)
    return [TextSample(t.strip(), None, f"{p.name}:{k}") for k, t in enumerate(_read_lines(p), 1)]


@TEXT_SOURCES.register("tsv", description="tab-separated sentence and integer label columns (either order), no header")
def tsv(path: str) -> list[TextSample]:
    p = Path(path)
    out = []
    for k, row in enumerate(_read_lines(p), 1):
        cells = row.split("\t")
        label = next((int(c) for c in cells if c.strip().lstrip("-").isdigit()), None)
        text = next((c for c in cells if not c.strip().lstrip("-").isdigit() and c.strip()), "")
        if not text:
            raise InputError(f"{p}:{k}: no sentence column")
        out.append(TextSample(text.strip(), label, f"{p.name}:{k}"))
    return out


@TEXT_SOURCES.register("embedded-text", description="20 sentences shipped with leakkit (no download)")
def embedded(_path: str = "") -> list[TextSample]:
    text = resources.files("leakkit.text").joinpath("sentences.txt").read_text(encoding="utf-8")
    return [TextSample(t, None, f"embedded:{k}") for k, t in enumerate(text.splitlines(), 1) if t.strip()]


def read_input(path: str) -> list[TextSample]:
    """Sentences from a user's --input: .tsv by columns, anything else one per line."""
    return (tsv if path.endswith(".tsv") else lines)(path)


def draw_text(source: str, path: str, n: int) -> list[TextSample]:
    """The first `n` sentences of a source, in file order (cycled when it holds fewer)."""
    if source not in TEXT_SOURCES.names():
        raise ConfigError(f"unknown text source {source!r}; valid: {', '.join(TEXT_SOURCES.names())}")
    pool = TEXT_SOURCES.get(source)(path)
    return [pool[i % len(pool)] for i in range(n)]
