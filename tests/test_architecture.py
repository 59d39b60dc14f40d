"""The package's house rules (ARCHITECTURE.md): no function over 80 lines, no import cycle, no repeated block."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "helpers"
MAX_LINES = 80
REPEAT = 6


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def long_functions(max_lines: int = MAX_LINES) -> list[str]:
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > max_lines:
                    found.append(f"{name}.{node.name}: {length} lines")
    return found


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``module`` imports anywhere (inside functions and TYPE_CHECKING included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        targets.update(n for n in names if n in known and n != module)
    return targets


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan), ignoring a package's own ``__init__`` re-exports
    of its submodules (a package importing its children is not a cycle)."""
    modules = _modules()
    known = set(modules)
    graph = {m: {t for t in _imported(m, p, known) if not t.startswith(m + ".")} for m, p in modules.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                group.append(item)
                if item == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return groups


def repeated_blocks(size: int = REPEAT) -> list[str]:
    """Runs of ``size`` identical non-blank, non-trivial lines that stand in two places of the package."""
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for name, path in _modules().items():
        lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
        lines = [(n, text) for n, text in lines if text and not text.startswith("#") and len(text) > 3]
        for start in range(len(lines) - size + 1):
            block = tuple(text for _, text in lines[start : start + size])
            if sum(len(t) for t in block) < 120 or all(t.startswith(("import ", "from ")) for t in block):
                continue
            seen[block].append(f"{name}:{lines[start][0]}")
    return [" and ".join(places[:2]) for places in seen.values() if len(places) > 1]


def test_reference_finders_can_fail(tmp_path):
    tree = ast.parse("def f():\n" + "    x = 1\n" * 90)
    assert max(n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)) > MAX_LINES


def test_no_function_over_80_lines():
    assert long_functions() == []


def test_no_import_cycle_between_modules():
    assert import_cycles() == []


@pytest.mark.parametrize("size", [REPEAT])
def test_no_block_of_six_lines_stands_twice(size):
    assert repeated_blocks(size) == []
