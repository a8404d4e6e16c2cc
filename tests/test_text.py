"""One of each text helper: plural, clock, slug (p2v_fast/text.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from p2v_fast.text import clock, plural, slug

ROOT = Path(__file__).resolve().parents[1]


def test_plural() -> None:
    assert [plural(n, "frame") for n in (0, 1, 2)] == ["0 frames", "1 frame", "2 frames"]


def test_clock_is_hours_minutes_seconds_and_never_negative() -> None:
    assert [clock(s) for s in (0, 9.6, 59.4, 3725.4, 36000)] == ["0:00:00", "0:00:10", "0:00:59", "1:02:05",
                                                                "10:00:00"]
    assert clock(-3) == "0:00:00"


def test_slug_is_a_safe_bounded_name_part() -> None:
    assert slug("A Swan, on the lake!") == "a-swan-on-the-lake"
    assert slug("  ") == slug("日本語") == "edit"
    assert slug("a crochet swan on a lake at dawn, highly detailed", 32) == "a-crochet-swan-on-a-lake-at-dawn"
    assert slug("abc def", 4) == "abc"  # never ends in '-'
    assert slug("../../etc/passwd") == "etc-passwd"


def test_no_module_defines_its_own() -> None:
    offenders = []
    for pkg in ("p2v_fast", "export", "benchmarks"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "p2v_fast" / "text.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef) and node.name.strip("_") in ("plural", "clock", "slug"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not offenders, offenders
