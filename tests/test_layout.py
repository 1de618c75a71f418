"""The house rules: imports point down the floors (lazy imports inside functions included), and no
folder imports a sibling folder on its own floor."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import its own folder, or any folder on a lower floor.
FLOORS: list[list[str]] = [
    ["leakkit.errors"],
    ["leakkit.registry", "leakkit.metrics", "leakkit.files"],
    ["leakkit.tasks"],
    ["leakkit.client"],
    ["leakkit.engine"],
    ["leakkit.vision", "leakkit.text"],
    ["leakkit.run"],
    ["leakkit.integrations"],
    ["leakkit.audit"],
    ["leakkit.cli"],
    ["leakkit.__main__"],
]


def _modules() -> dict[str, Path]:
    mods = {}
    for base, package in (("leakkit", "leakkit"), ("tasks", "leakkit.tasks")):
        for f in (ROOT / base).rglob("*.py"):
            rel = f.relative_to(ROOT / base).with_suffix("").parts
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            mods[".".join((package, *parts))] = f
    return mods


def _room(module: str) -> str | None:
    """The floor entry a module belongs to (the longest matching prefix)."""
    best = None
    for floor in FLOORS:
        for room in floor:
            if (module == room or module.startswith(room + ".")) and (best is None or len(room) > len(best)):
                best = room
    return best


def _floor(room: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if room in floor)


def _imports(module: str, path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                head = ".".join(base + ([node.module] if node.module else []))
            else:
                head = node.module or ""
            out += [head] + [f"{head}.{a.name}" for a in node.names]
    return [m for m in out if m == "leakkit" or m.startswith("leakkit.")]


def test_every_module_has_a_floor() -> None:
    homeless = [m for m in _modules() if m != "leakkit" and _room(m) is None]
    assert not homeless, f"add these to FLOORS: {homeless}"


def test_imports_point_down() -> None:
    mods = _modules()
    climbs = []
    for module, path in mods.items():
        src = _room(module)
        if src is None:
            continue
        for target in _imports(module, path):
            dst = _room(target)
            if dst is None or dst == src:
                continue
            if _floor(dst) >= _floor(src):
                climbs.append(f"{module} -> {target}")
    assert not climbs, "imports that climb or cross a floor:\n" + "\n".join(sorted(set(climbs)))


def test_no_import_circle_between_modules() -> None:
    mods = _modules()
    graph = {m: set() for m in mods}
    for module, path in mods.items():
        for target in _imports(module, path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (circle := visit(m)):
            raise AssertionError("import circle: " + " -> ".join(circle))


def test_the_checker_sees_a_climb(tmp_path: Path) -> None:
    # the rule itself must be able to fail: an engine module importing the runner is a climb
    src, dst = _room("leakkit.engine.matching"), _room("leakkit.run.runner")
    assert src and dst and _floor(dst) > _floor(src)
    assert _imports("leakkit.engine.x", _write(tmp_path, "def f():\n    from leakkit.run import runner\n")) == ["leakkit.run", "leakkit.run.runner"]


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "x.py"
    f.write_text(text)
    return f
