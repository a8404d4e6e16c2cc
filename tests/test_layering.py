"""The project's structure, kept: the wings of the package stand in layers and every import
points down (lazy imports included), no import cycle between modules, the library never imports
the tools built on it, the public API imports without loading torch's models, and no test module
imports another test module or conftest."""

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


#: The wings, lowest first. A module may import its own wing and any wing on a lower level; wings
#: on one level know nothing of each other. A module belongs to the longest name here that
#: prefixes it ("p2v_fast" alone is the package's ``__init__``: the public API).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("p2v_fast.errors", "p2v_fast.text"),  # one-line errors; plurals, clocks, slugs
    ("p2v_fast.config", "p2v_fast.files", "p2v_fast.progress"),
    ("p2v_fast.media", "p2v_fast.weights"),  # video in and out; the models and their loading
    ("p2v_fast.nets",),  # networks at run time: attention, backends, specs, manifests, memory
    ("p2v_fast.method", "p2v_fast.quality"),  # Pix2Video itself; measuring an edit
    ("p2v_fast.pipeline",),  # edit_video / invert_video: the method over a clip, start to end
    ("p2v_fast",),  # the public API
    ("p2v_fast.apps",),  # batch, Ray, the web page, the demo, the ablation
    ("p2v_fast.report", "p2v_fast.display", "p2v_fast.cli_docs"),  # what the CLI prints
    ("export",),
    ("benchmarks",),
    ("cli",),
)


def wing_of(module: str) -> str:
    names = [w for level in LAYERS for w in level if module == w or module.startswith(w + ".")]
    if not names:
        raise AssertionError(f"{module} is in no wing of LAYERS: add it to the table")
    return max(names, key=len)


def level_of(wing: str) -> int:
    return next(i for i, level in enumerate(LAYERS) if wing in level)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a wing that is not below its own (nor the wing itself)."""
    out = []
    for module, deps in sorted(graph.items()):
        wing = wing_of(module)
        for dep in sorted(deps):
            dep_wing = wing_of(dep)
            if dep_wing != wing and level_of(dep_wing) >= level_of(wing):
                out.append(f"{module} ({wing}) imports {dep} ({dep_wing})")
    return out


def test_every_import_points_down_the_wings() -> None:
    graph = import_graph()
    assert {wing_of(m) for m in graph} >= {"p2v_fast.media", "p2v_fast.apps", "p2v_fast.nets"}
    assert upward_imports(graph) == []


def test_an_upward_import_is_caught() -> None:
    """The rule can fail: the model builder importing the video module (one level, two wings),
    and the method importing the web page, lazily or not, are both reported."""
    graph = import_graph()
    graph["p2v_fast.weights.tiny"] = graph["p2v_fast.weights.tiny"] | {"p2v_fast.media.paths"}
    graph["p2v_fast.method.edit"] = graph["p2v_fast.method.edit"] | {"p2v_fast.apps.ui"}
    found = upward_imports(graph)
    assert any("p2v_fast.weights.tiny" in f and "p2v_fast.media.paths" in f for f in found), found
    assert any("p2v_fast.method.edit" in f and "p2v_fast.apps.ui" in f for f in found), found
    assert len(found) == 2


def test_a_lazy_upward_import_is_read(tmp_path: Path) -> None:
    """imports_of reads imports inside functions, so a lazy upward import cannot hide."""
    src = tmp_path / "edit.py"
    src.write_text("def f():\n    from p2v_fast.apps import ui\n    return ui\n")
    known = {"p2v_fast.apps.ui", "p2v_fast.apps", "p2v_fast.method.edit"}
    assert imports_of("p2v_fast.method.edit", src, known) == {"p2v_fast.apps.ui"}


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


def imported_test_modules(path: Path) -> list[str]:
    """The test modules (``test_*``) and conftests that the file at ``path`` imports, anywhere in it."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.ImportFrom):  # from . import test_x
            names += [a.name for a in node.names]
    return sorted({n for n in names if any(p.startswith("test_") or p == "conftest" for p in n.split("."))})


def test_no_test_module_imports_another_or_conftest() -> None:
    """Shared test code lives in tests/helpers.py (plain functions) and tests/conftest.py
    (fixtures, which pytest hands over by name): a test module imports neither conftest nor
    another test module, so each one runs alone and moving a test never breaks another file."""
    offenders = {p.name: found for p in sorted((ROOT / "tests").rglob("*.py")) if (found := imported_test_modules(p))}
    assert not offenders, offenders


def test_an_import_of_a_test_module_or_conftest_is_caught(tmp_path: Path) -> None:
    cases = {
        "from tests.test_export import SIZE": ["tests.test_export", "tests.test_export.SIZE"],
        "import tests.test_ui": ["tests.test_ui"],
        "from conftest import chromium": ["conftest", "conftest.chromium"],
        "from tests import conftest": ["tests.conftest"],
        "def f():\n    from . import test_batch": ["test_batch"],  # lazy and relative
        "from tests.helpers import p2v\nfrom tests.trt_standin import StandInTrt": [],  # helper modules
    }
    for source, found in cases.items():
        (tmp_path / "t.py").write_text(source + "\n")
        assert imported_test_modules(tmp_path / "t.py") == found, source
