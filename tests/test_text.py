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


#: Nouns counted in messages: "{n} frames" with n = 1 reads "1 frames" (issue 28 item 6d).
COUNTED = ("frames", "steps", "clips", "jobs", "calls", "workers", "attempts", "GPUs", "CPUs", "samples", "scenes",
           "runs", "files", "entries", "prompts", "layers", "networks", "repeats", "caps", "ticks", "videos")


def counts_without_plural(path: Path) -> list[str]:
    """Each f-string part ``{count} <noun>s`` in ``path`` (``{count}`` a bare name, attribute,
    subscript or call; not ``{name} runs`` where the word is a verb: names that hold no count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.JoinedStr):
            continue
        for value, text in zip(node.values, node.values[1:], strict=False):
            if not (isinstance(value, ast.FormattedValue) and isinstance(text, ast.Constant)):
                continue
            words = str(text.value).split()
            expr = ast.unparse(value.value)
            if str(text.value).startswith(" ") and words and words[0].rstrip(",.;:)") in COUNTED \
                    and expr not in ("name", "c.inject", "inject"):  # "{name} runs on ...": a verb
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {{{expr}}} {words[0]}")
    return out


def test_counts_in_messages_use_plural() -> None:
    """Before: `p2v` printed "1 steps", "1 frames", "1 workers"; every count of things goes
    through text.plural."""
    offenders = [hit for pkg in ("p2v_fast", "export", "benchmarks") for path in sorted((ROOT / pkg).rglob("*.py"))
                 for hit in counts_without_plural(path)] + counts_without_plural(ROOT / "cli.py")
    assert not offenders, offenders
