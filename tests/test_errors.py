"""The one-line error helpers: one formatter for every exception quoted in a message."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest

from p2v_fast.errors import ONE_LINE_LIMIT, one_line

ROOT = Path(__file__).resolve().parents[1]


def test_one_line_quotes_the_first_non_empty_line_collapsed() -> None:
    assert one_line(RuntimeError("\n  \n  first   line\tthere \nsecond line")) == "first line there"
    assert one_line("  parser:  bad node \n more") == "parser: bad node"


def test_one_line_gives_an_os_errors_reason_without_errno_or_path() -> None:
    exc = FileNotFoundError(errno.ENOENT, "No such file or directory", "/tmp/x.mp4")
    assert one_line(exc) == "No such file or directory"
    assert one_line(OSError("a message of its own")) == "a message of its own"


def test_one_line_names_the_type_of_an_empty_error_or_when_asked() -> None:
    assert one_line(KeyError()) == "KeyError"
    assert one_line(ValueError("  \n ")) == "ValueError"
    assert one_line(ImportError("no module named x"), kind=True) == "ImportError: no module named x"
    assert one_line("") == ""


@pytest.mark.parametrize("limit", [ONE_LINE_LIMIT, 20])
def test_one_line_is_shortened_to_its_limit(limit: int) -> None:
    text = one_line(RuntimeError("x" * 1000), limit)
    assert len(text) == limit and text.endswith("...")
    assert one_line(RuntimeError("y" * limit), limit) == "y" * limit


def test_no_module_formats_exceptions_by_hand() -> None:
    """One formatter: no other module reads an OSError's ``strerror`` or defines its own
    one-line helper (there were eight, with limits of 120 to 300 characters or none)."""
    offenders = []
    for pkg in ("p2v_fast", "export", "benchmarks"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "p2v_fast" / "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr == "strerror":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} reads .strerror")
                if isinstance(node, ast.Constant) and node.value == "strerror":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} reads 'strerror'")
                if isinstance(node, ast.FunctionDef) and node.name in ("one_line", "_one_line", "_first_line", "_why"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} defines {node.name}")
    assert not offenders, offenders


def test_one_line_whole_joins_a_description_spread_over_lines() -> None:
    assert one_line("In node 12 (Where): bad\ncondition type", whole=True) == "In node 12 (Where): bad condition type"
    assert one_line(RuntimeError("first\n  second"), whole=True) == "first second"
