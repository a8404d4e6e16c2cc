"""Issue 28 item 5: --help that renders. Rich markup ate '[ui]' of pip install 'p2v-fast[ui]',
Typer's rich help gave every flag a '<bool>' type, and `p2v edit --help` was 37 options in one
list: it now groups them in panels, after an example."""

from __future__ import annotations

import re

import pytest

from tests.helpers import p2v

PANELS = ("Input and framing", "The method", "Precision and speed", "Output")


def help_text(*command: str) -> str:
    r = p2v(*command, "--help", env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return r.stdout


def commands() -> list[str]:
    import typer

    from cli import app

    group = typer.main.get_command(app)
    return [name for name, command in group.commands.items() if not command.hidden]  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", [(), ("ui",)], ids=["p2v", "ui"])
def test_the_ui_extra_is_named_whole(command) -> None:
    text = help_text(*command)
    assert "pip install 'p2v-fast[ui]'" in text, text


def test_flags_are_shown_as_flags() -> None:
    """No option, in any command's help or the app's, reads as taking a '<bool>'; the flags are there."""
    for command in [(), *((name,) for name in commands())]:
        text = help_text(*command)
        assert "<bool>" not in text, (command, text)
        assert "--help" in text
    edit = help_text("edit")
    first_words = {"--overwrite": "Replace", "--preview": "Edit", "--side-by-side": "Also",
                   "--compile": "torch.compile", "--channels-last": "Channels-last", "--cuda-graph": "tensorrt:"}
    for flag, word in first_words.items():  # the flag, (its alias,) then straight its help
        found = re.search(rf"│ {re.escape(flag)}(?:,--[\w-]+)?\s+(\S+)", edit)
        assert found and found.group(1) == word, (flag, found and found.group(0))


def test_edit_help_opens_with_an_example_and_groups_its_options() -> None:
    text = help_text("edit")
    lines = text.splitlines()
    example = next(i for i, ln in enumerate(lines) if ln.strip().startswith("Example: p2v edit "))
    titles = [next(i for i, ln in enumerate(lines) if f"─ {title} ─" in ln) for title in PANELS]
    assert example < min(titles) and titles == sorted(titles), text
    assert 'p2v edit clip.mp4 "a crochet swan on the lake" -o swan.mp4' in lines[example]
    # each panel holds its options: e.g. --size under framing, --steps under the method, --dtype under speed
    def panel_of(option: str) -> str:
        at = next(i for i, ln in enumerate(lines) if f"│ {option} " in ln)
        return next(t for t, i in sorted(zip(PANELS, titles, strict=True), key=lambda x: -x[1]) if i < at)

    assert panel_of("--size") == "Input and framing" and panel_of("--stride") == "Input and framing"
    assert panel_of("--steps") == "The method" and panel_of("--latent-update") == "The method"
    assert panel_of("--dtype") == "Precision and speed" and panel_of("--compile") == "Precision and speed"
    assert panel_of("--output") == "Output" and panel_of("--json") == "Output"


def test_a_short_command_keeps_one_list() -> None:
    """p2v demo's nine options read best together: no panels below PANELS_FROM options."""
    text = help_text("demo")
    assert not any(f"─ {title} ─" in text for title in PANELS), text
