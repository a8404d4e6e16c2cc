"""The README and docs/ stay true cheaply: links and named files exist, the README opens with the
two commands (the test one exactly what .ci/run runs), stays short, and shows the API's example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
#: A repository path named in the text (repo-root relative), e.g. `p2v_fast/nets/specs.py`, `tests/...*`.
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:p2v_fast|tests|export|benchmarks|engines|docs|\.ci)/[\w./*<>-]*)")
STALE = re.compile(r"\bfive networks\b|\bissue \d+|\bwave \d|\bwave-\d", re.IGNORECASE)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def _ids(pages: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in pages]


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page: Path) -> None:
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, bad


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_repository_path_named_exists(page: Path) -> None:
    missing = []
    for name in REPO_PATH.findall(page.read_text()):
        name = name.rstrip(".,;:")
        if "<" in name:  # a pattern such as tests/test_<module>.py
            continue
        if not (list(ROOT.glob(name)) if "*" in name else (ROOT / name).exists()):
            missing.append(name)
    assert not missing, missing


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_no_stale_words(page: Path) -> None:
    """The networks are unet, vae_encoder, vae_decoder and depth; a reader knows no issues or waves."""
    assert not STALE.findall(page.read_text())


def test_the_readme_opens_with_the_two_commands_and_stays_short() -> None:
    lines = README.read_text().splitlines()
    head = "\n".join(lines[:10])
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    start = next(i for i, ln in enumerate(ci) if ln.startswith("python3 -m venv"))  # after installing chromium
    steps = [ln for ln in ci[start:] if ln and not ln.startswith("#")]
    test_command = " && ".join(steps)
    assert test_command in head, f"the README's first lines do not hold .ci/run's command:\n{test_command}"
    demo = re.search(r"^python3 -m venv \.venv && .*&& p2v demo$", head, flags=re.MULTILINE)
    assert demo, "the README's first lines do not hold the set-up-and-demo command"
    assert len(lines) <= 250, f"README.md is {len(lines)} lines; the detail belongs in docs/"


def test_the_readme_api_example_is_the_package_docstring_example() -> None:
    import p2v_fast

    block = re.search(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert block, "no Python example in the README"
    after = (p2v_fast.__doc__ or "").split("::\n", 1)[1].splitlines()
    end = next(i for i, ln in enumerate(after) if ln.strip() and not ln.startswith("    "))
    example = "\n".join(ln[4:] for ln in after[:end]).strip()  # the indented block after "::"
    assert example and block.group(1).strip() == example


def _cli_options() -> dict[str, set[str]]:
    """Command -> its long options, from the Typer app itself."""
    import typer

    from cli import app

    group = typer.main.get_command(app)
    return {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} | {"--help"}
            for name, cmd in group.commands.items()}  # type: ignore[attr-defined]


def _code_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks, a line ending in a backslash joined to the next."""
    lines, inside, held = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            inside, held = not inside, ""
        elif inside:
            held += line
            if held.rstrip().endswith("\\"):
                held = held.rstrip()[:-1] + " "
            else:
                lines.append(held)
                held = ""
    return lines


OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_option_named_is_a_p2v_option_and_each_command_line_uses_its_own(page: Path) -> None:
    options = _cli_options()
    known = set().union(*options.values()) | {"--version", "--durations"}  # --durations: pytest's, in the test command
    text = page.read_text()
    not_ray = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("ray start"))
    # the project's own scripts (python -m training.mini ..., python -m benchmarks.X ...) have their own options
    not_ray = re.sub(r"python -m (?:training|benchmarks)\.[\w.]+[^`\n]*", "", not_ray)
    assert not sorted(set(OPTION.findall(not_ray)) - known)
    wrong = []
    for line in _code_lines(text):
        command = re.match(r"\s*p2v (\w+)", line)
        if command and command.group(1) in options:
            used = set(OPTION.findall(line.split(" #")[0]))
            wrong += [f"p2v {command.group(1)} {o}" for o in sorted(used - options[command.group(1)])]
    assert not wrong, wrong
