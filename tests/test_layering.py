"""The project's structure, kept: no import cycle between its modules, the library never
imports the tools built on it, and the public API imports without loading torch's models."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("p2v_fast", "export", "benchmarks")


def module_files() -> dict[str, Path]:
    """Module name -> file, for the project's own modules (packages and cli.py)."""
    files = {"cli": ROOT / "cli.py"}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if path.stem == "__init__" else parts)] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file, at module level or inside a
    function (a lazy import is still a dependency: it only defers a cycle to run time)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else base)
    return (out & known) - {name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a path that returns to its first module), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return [*path[path.index(w):], w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40 and graph["p2v_fast.pipeline"]  # the graph is really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a graph with a cycle through a lazy import is caught."""
    graph = import_graph()
    # as make_backend once was:
    graph["p2v_fast.nets.backends"] = graph["p2v_fast.nets.backends"] | {"p2v_fast.nets.runtime"}
    cycle = find_cycle(graph)
    assert cycle is not None and "p2v_fast.nets.backends" in cycle and "p2v_fast.nets.runtime" in cycle


def test_the_runtime_imports_nothing_from_export() -> None:
    """Layering: the library (runtime, specs, manifest) never imports export/; export/ builds on it."""
    root = Path(__file__).resolve().parents[1] / "p2v_fast"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "export" or n.startswith("export.")]
    assert not offenders, offenders


def test_the_library_imports_neither_the_cli_nor_the_benchmarks() -> None:
    graph = import_graph()
    offenders = {m: sorted(d) for m, d in graph.items() if m.startswith("p2v_fast")
                 for d in [{x for x in d if x == "cli" or x.startswith("benchmarks")}] if d}
    assert not offenders, offenders
