"""The table of every command's options (``docs/options.md``), generated from the CLI itself.

:func:`options_markdown` walks a click command group (the CLI passes its app's) and writes one
table per command: the option and its aliases, what it takes (the choices, when it has them),
its default and its help. ``p2v options-table`` prints it; a test keeps the committed file equal
to what this makes now.
"""

from __future__ import annotations

from typing import Any

HEADER = """# Options of every `p2v` command

Generated from the CLI by `p2v options-table > docs/options.md`; `tests/test_cli_options.py`
fails when this file differs from what the CLI would generate. Aliases are older spellings that
keep working. `p2v COMMAND --help` shows the same.
"""


def _cell(text: str) -> str:
    """Text in a markdown table cell: pipes escaped, on one line."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _takes(param: Any, ctx: Any) -> str:
    if getattr(param, "is_flag", False):
        return f"flag ({', '.join(param.secondary_opts)} to unset)" if param.secondary_opts else "flag"
    if param.metavar:
        text = param.metavar.strip("[]<>")
    else:
        text = param.display_type(ctx).strip("<>")
    if getattr(param, "multiple", False):
        text += ", repeatable"
    return text


def _default(param: Any) -> str:
    if getattr(param, "is_flag", False):
        return "on" if param.default else "off"
    if param.required:
        return ""
    default = param.default
    if default is None or default == () or default == []:
        return ""
    return str(default)


def command_rows(command: Any, ctx: Any) -> list[tuple[str, str, str, str, str]]:
    """(names, aliases, takes, default, help) per visible parameter of ``command``."""
    rows = []
    for p in command.params:
        if p.hidden or p.name == "help":
            continue
        if p.param_type_name == "argument":
            name = p.name.upper()
            rows.append((name, "", _takes(p, ctx) if p.metavar else "argument", "" if p.required else "optional",
                         p.help or ""))
            continue
        longs = [o for o in p.opts if o.startswith("--")] or list(p.opts)
        main, aliases = longs[0], [o for o in p.opts if o != longs[0]]
        rows.append((main, ", ".join(aliases), _takes(p, ctx), _default(p), p.help or ""))
    return rows


def options_markdown(group: Any) -> str:
    """The markdown of ``docs/options.md`` for the click group ``group`` (commands in the
    group's order, hidden ones left out)."""
    out = [HEADER]
    root = group.context_class(group, info_name="p2v")
    for name, command in group.commands.items():
        if command.hidden:
            continue
        ctx = command.context_class(command, info_name=name, parent=root)
        summary = " ".join((command.help or "").split())
        out.append(f"## `p2v {name}`\n\n{summary}\n")
        out.append("| option | aliases | takes | default | help |\n|---|---|---|---|---|")
        for row in command_rows(command, ctx):
            cells = [f"`{row[0]}`", ", ".join(f"`{a}`" for a in row[1].split(", ") if a), _cell(row[2]),
                     f"`{_cell(row[3])}`" if row[3] else "", _cell(row[4])]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
