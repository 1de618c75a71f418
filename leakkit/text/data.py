"""Text sources, by name: private sentences (with an optional class label) for text recipes.

The embedded default is twenty sentences written for leakkit (leakkit/text/sentences.txt), so a text
recipe runs with nothing downloaded; users bring their own text as a .txt (one sentence per
line), a .tsv or a .csv (a sentence column and an optional integer label column: named by a header row
`sentence`/`text` and `label`, or without a header in either order).
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


TEXT_COLUMNS = ("sentence", "text")  # header names read as the sentence column
LABEL_COLUMNS = ("label",)


def _table(path: str, delimiter: str) -> list[TextSample]:
    """Rows of a delimited file: by its header when the first row names a sentence/text column,
    else a sentence cell and an optional integer label cell in either order."""
    import csv

    p = Path(path)
    # a TSV cell may hold quote marks as text (SST-2 does); only CSV uses quoting
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    rows = [r for r in csv.reader(_read_lines(p), delimiter=delimiter, quoting=quoting)]
    head = [c.strip().lower() for c in rows[0]]
    text_col = next((head.index(n) for n in TEXT_COLUMNS if n in head), None)
    if text_col is None and len(head) > 1 and not any(c.lstrip("-").isdigit() for c in head) and any(n in head for n in LABEL_COLUMNS):
        raise InputError(f"{p}: header {', '.join(rows[0])} has no sentence column; name it {' or '.join(TEXT_COLUMNS)}")
    out = []
    if text_col is not None:
        label_col = next((head.index(n) for n in LABEL_COLUMNS if n in head), None)
        for k, row in enumerate(rows[1:], 2):
            if text_col >= len(row) or not row[text_col].strip():
                raise InputError(f"{p}:{k}: no sentence in column {rows[0][text_col]!r}")
            label = None
            if label_col is not None and label_col < len(row) and row[label_col].strip():
                if not row[label_col].strip().lstrip("-").isdigit():
                    raise InputError(f"{p}:{k}: label {row[label_col]!r} is not an integer")
                label = int(row[label_col])
            out.append(TextSample(row[text_col].strip(), label, f"{p.name}:{k}"))
        if not out:
            raise InputError(f"{p} has a header and no sentences")
        return out
    for k, cells in enumerate(rows, 1):
        label = next((int(c) for c in cells if c.strip().lstrip("-").isdigit()), None)
        text = next((c for c in cells if not c.strip().lstrip("-").isdigit() and c.strip()), "")
        if not text:
            raise InputError(f"{p}:{k}: no sentence column")
        out.append(TextSample(text.strip(), label, f"{p.name}:{k}"))
    return out


@TEXT_SOURCES.register("tsv", description="tab-separated sentence and integer label columns: by a header (sentence/text, label), else in either order")
def tsv(path: str) -> list[TextSample]:
    return _table(path, "\t")


@TEXT_SOURCES.register("csv", description="comma-separated, as tsv (quoted commas inside sentences are kept)")
def csv_file(path: str) -> list[TextSample]:
    return _table(path, ",")


@TEXT_SOURCES.register("embedded-text", description="20 sentences shipped with leakkit (no download)")
def embedded(_path: str = "") -> list[TextSample]:
    text = resources.files("leakkit.text").joinpath("sentences.txt").read_text(encoding="utf-8")
    return [TextSample(t, None, f"embedded:{k}") for k, t in enumerate(text.splitlines(), 1) if t.strip()]


SUFFIX_SOURCES = {".tsv": "tsv", ".csv": "csv"}  # any other suffix: one sentence per line


def read_input(path: str) -> list[TextSample]:
    """Sentences from a user's --input: .tsv and .csv by columns (header or not), anything else one per line."""
    return TEXT_SOURCES.get(SUFFIX_SOURCES.get(Path(path).suffix.lower(), "lines"))(path)


def draw_text(source: str, path: str, n: int) -> list[TextSample]:
    """The first `n` sentences of a source, in file order (cycled when it holds fewer)."""
    if source not in TEXT_SOURCES.names():
        raise ConfigError(f"unknown text source {source!r}; valid: {', '.join(TEXT_SOURCES.names())}")
    pool = TEXT_SOURCES.get(source)(path)
    return [pool[i % len(pool)] for i in range(n)]
