"""The packages' import graph: no circles, and no arrow back up the layers.

Every import counts, wherever it stands (module level, inside a function, under `if TYPE_CHECKING:`):
a lazy or type-only import is still a dependency a reader has to follow, and a circle through one
breaks as soon as it is moved to the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dllm_engine", "training", "benchmarks", "cli", "agent", "audio", "serving", "deploy")
# What each package may import besides itself (third-party and standard-library modules aside).
ALLOWED = {
    "dllm_engine": set(),
    "audio": set(),
    "serving": {"dllm_engine"},
    "agent": {"audio", "dllm_engine", "serving"},
    "training": {"dllm_engine"},
    "benchmarks": {"dllm_engine", "training", "agent", "audio"},
    "cli": {"dllm_engine", "training", "agent", "audio", "benchmarks", "serving"},
    "deploy": {"dllm_engine", "agent", "audio", "serving"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `path` (module `name`) imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a module also runs a and a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, one per set of modules that reach each other: [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def component(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                component(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = set(stack[stack.index(node):])
            del stack[stack.index(node):]
            if len(members) > 1:
                found.append(path_around(min(members), members, edges))

    for node in sorted(edges):
        if node not in index:
            component(node)
    return found


def path_around(start: str, members: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest way from `start` back to itself inside one set of mutually reachable modules."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop(0)
        for nxt in sorted(edges[node] & members):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                todo.append(nxt)
    raise AssertionError(f"{start} is not on a circle")


def test_the_graph_sees_every_package_and_kind_of_import():
    edges = graph()
    assert set(PACKAGES) <= set(edges)
    assert "dllm_engine.engine" in edges["dllm_engine.options"]  # a relative import
    assert "dllm_engine.engine" in edges["cli.dllm"]  # an absolute one
    assert "training.distill" in edges["cli.dllm"]  # `from training import distill`: the module


def test_no_import_circles():
    found = circles(graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_package_imports_one_above_it():
    wrong = sorted(
        f"{mod} imports {dep}"
        for mod, deps in graph().items()
        for dep in deps
        if (src := mod.partition(".")[0]) != (dst := dep.partition(".")[0]) and dst not in ALLOWED[src]
    )
    assert not wrong, "\n".join(wrong)
