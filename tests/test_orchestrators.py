"""Issue 24 item 3: the long orchestrators read as their numbered stages (as diffusers'
depth2img ``__call__`` does), each stage a call or a few lines, so none is over ~50 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 50  # lines, from ``def`` to the last line, docstring included

# (file, function): the orchestrators, and the stage helpers that hold their logic
ORCHESTRATORS = [
    ("export/engines.py", "export_engines"),
]


def function_lines(path: Path) -> dict[str, int]:
    """Every function of ``path`` (methods as ``Class.name``) -> its length in lines."""
    out: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                assert child.end_lineno is not None
                out[prefix + child.name] = child.end_lineno - child.lineno + 1
                walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")

    walk(ast.parse(path.read_text(encoding="utf-8")), "")
    return out


@pytest.mark.parametrize(("file", "name"), ORCHESTRATORS, ids=[n for _, n in ORCHESTRATORS])
def test_an_orchestrator_is_its_stages_and_short(file: str, name: str) -> None:
    path = ROOT / file
    assert path.is_file(), f"{file} is missing"
    lines = function_lines(path)
    assert name in lines, f"{name} is not defined in {file}"
    assert lines[name] <= LIMIT, f"{file}: {name} is {lines[name]} lines (limit {LIMIT})"
    body = path.read_text(encoding="utf-8").splitlines()
    tree = next(n for n in ast.walk(ast.parse("\n".join(body))) if isinstance(n, ast.FunctionDef) and n.name == name)
    assert tree.end_lineno is not None
    numbered = [s for s in body[tree.lineno - 1:tree.end_lineno] if s.strip().startswith("# 1.")]
    assert numbered, f"{file}: {name} does not read as numbered stages ('# 1. ...')"


def test_the_export_stages_live_beside_the_package_not_in_it() -> None:
    """``export_engines`` is defined in export/engines.py; ``from export import export_engines``
    (cli.py, benchmarks, tests) still finds it."""
    import export
    import export.engines

    assert export.export_engines is export.engines.export_engines
    assert export.ExportReport is export.engines.ExportReport
    assert export.StageResult is export.engines.StageResult
    assert "def export_engines" not in (ROOT / "export" / "__init__.py").read_text(encoding="utf-8")
    lines = function_lines(ROOT / "export" / "engines.py")
    assert max(lines.values()) <= LIMIT, {k: v for k, v in lines.items() if v > LIMIT}
