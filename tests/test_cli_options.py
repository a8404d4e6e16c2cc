"""One vocabulary across the commands: the same option names, aliases for the older spellings,
choices that --help shows and a bad one refused in one line, defaults written once (in EditConfig
and ExportOptions), --json wherever numbers are computed, messages that name only the command's
own options, and docs/options.md generated from the app."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import typer

import cli
from cli import app
from p2v_fast.config import EditConfig
from p2v_fast.nets.export_options import ExportOptions
from tests.helpers import one_line_error, p2v, sample_clip

ROOT = Path(__file__).resolve().parents[1]
# a source prompt of its own: these edits and inversions never fill the shared cache for another test
FAST = ["--model", "tiny", "--size", "64", "--steps", "2", "--source-prompt", "a clip of the options tests"]


def _commands() -> dict:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def test_docs_options_md_is_what_the_app_generates() -> None:
    """docs/options.md cannot go stale: regenerate it with `p2v options-table > docs/options.md`."""
    r = p2v("options-table")
    assert r.exit_code == 0, r.output
    assert r.stdout == (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    for command in ("edit", "invert", "eval", "ablate", "bench", "export", "info", "batch", "demo"):
        assert f"## `p2v {command}`" in r.stdout
    assert "| `--engines` | `--out` |" in r.stdout and "| `--dtype` | `--precision` |" in r.stdout


@pytest.mark.parametrize("args, option", [
    (["edit", "x.mp4", "a swan", "--refs", "bogus"], "--refs"),
    (["invert", "x.mp4", "--resize", "zoom"], "--resize"),
    (["eval", "x.mp4", "a swan", "--flow", "farneback"], "--flow"),
    (["ablate", "x.mp4", "a swan", "--depth-norm", "scene"], "--depth-norm"),
    (["bench", "--plan", "--schedule", "diagonal"], "--schedule"),
    (["export", "--exporter", "onnxscript"], "--exporter"),
    (["export", "--precision", "int8"], "--dtype"),
    (["ui", "--dtype", "fp8"], "--dtype"),
])
def test_a_choice_not_offered_is_one_line_and_exit_2(args, option) -> None:
    r = p2v(*args)
    assert r.exit_code == 2
    assert one_line_error(r).startswith(f"error: {option} must be one of ")


def test_help_shows_the_choices() -> None:
    r = p2v("edit", "--help", env={"COLUMNS": "250"})
    for choices in ("[autograd|detached|off]", "[anchor+prev|anchor|prev|none]", "[crop|stretch|pad]",
                    "[auto|fp32|fp16|bf16]", "[torch|onnxruntime|tensorrt|auto]", "[sequential|wavefront]"):
        assert choices in r.stdout, choices
    assert "--overwrite,--force" in r.stdout.replace(", ", ",")


def test_option_defaults_are_the_configs() -> None:
    """An option named after an EditConfig (export: ExportOptions) field defaults to that field's
    default, unless it is None (the command then chooses, as its help says) or listed here."""
    own = {("demo", "size"), ("demo", "model"), ("ui", "engines")}  # the demo: mini at 64; ui: a folder of engines
    renamed = {"engines": "out", "dtype": "precision", "overwrite": "force"}
    checked = 0
    for name, command in _commands().items():
        fields = ExportOptions.__dataclass_fields__ if name == "export" else EditConfig.__dataclass_fields__
        for p in command.params:
            field = renamed.get(p.name, p.name) if name == "export" else p.name
            if field not in fields or p.default is None or (name, p.name) in own:
                continue
            assert p.default == fields[field].default, (name, p.name, p.default)
            checked += 1
    assert checked > 40


def test_export_takes_the_common_names_and_its_old_spellings(tmp_path, monkeypatch) -> None:
    """--engines/--dtype/--overwrite, and --out/--precision/--force (what manifests' rebuild
    commands print) meaning the same; --json writes the summary."""
    import export
    from export import ExportReport

    seen: list[ExportOptions] = []

    def fake_export(options, progress):
        seen.append(options)
        return ExportReport(options.out, options.out / "manifest.json", [], 1.5)

    monkeypatch.setattr(export, "export_engines", fake_export)
    base = ["export", "--model", "tiny", "--size", "64", "--format", "onnx"]
    r = p2v(*base, "--out", tmp_path / "e", "--precision", "fp32", "--force", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = p2v(*base, "--engines", tmp_path / "e", "--dtype", "fp32", "--overwrite", "--json", tmp_path / "s.json",
             "--threads", "1", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seen[0] == seen[1] and seen[0].precision == "fp32" and seen[0].force and seen[0].out == tmp_path / "e"
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["folder"] == str(tmp_path / "e") and summary["rows"] == [] and summary["seconds"] == 1.5
    assert f"wrote {tmp_path / 's.json'}" in r.stdout


def test_edit_takes_force_for_overwrite(tmp_path) -> None:
    clip = sample_clip(tmp_path, n_frames=2, size=(64, 64), audio=False)
    out = tmp_path / "o.mp4"
    out.write_bytes(b"old")
    assert "pass --overwrite" in one_line_error(p2v("edit", clip, "a swan", "-o", out, *FAST))
    r = p2v("edit", clip, "a swan", "-o", out, *FAST, "--force", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert out.read_bytes() != b"old"


def test_eval_takes_its_inputs_as_edit_does(tmp_path) -> None:
    """`p2v eval INPUT PROMPT` scores what `p2v edit INPUT PROMPT` wrote (INPUT.p2v.mp4), `-o`
    names another edit, and the older `EDITED --source INPUT --prompt PROMPT` scores the same."""
    clip = sample_clip(tmp_path, n_frames=3, size=(64, 64), audio=False)
    edited = tmp_path / "clip.p2v.mp4"
    shutil.copy(clip, edited)  # stands in for an edit: same frames, so Pixel-MSE is small
    other = tmp_path / "other.mp4"
    shutil.copy(clip, other)
    tiny = ["--clip-model", "tiny"]
    forms = {"new": ["eval", clip, "a red ball", *tiny],
             "new -o": ["eval", clip, "a red ball", "-o", other, *tiny],
             "old": ["eval", edited, "--source", clip, "--prompt", "a red ball", *tiny]}
    scores = {}
    for name, args in forms.items():
        r = p2v(*args, "--json", tmp_path / f"{name}.json", catch_exceptions=False)
        assert r.exit_code == 0, (name, r.output)
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["new"]["edited"] == str(edited) and scores["new -o"]["edited"] == str(other)
    for key in ("clip_text", "clip_image", "pixel_mse", "n_frames"):
        assert scores["new"][key] == scores["old"][key] == scores["new -o"][key], key
    assert "missing PROMPT" in one_line_error(p2v("eval", clip, *tiny))
    assert "once" in one_line_error(p2v("eval", clip, "a", "--prompt", "b", *tiny))
    assert "input does not exist" in one_line_error(p2v("eval", tmp_path / "none.mp4", "a", *tiny))


def test_invert_and_info_write_json(tmp_path) -> None:
    clip = sample_clip(tmp_path, n_frames=2, size=(64, 64), audio=False)
    assert "is the input" in one_line_error(p2v("invert", clip, *FAST, "--json", clip))
    r = p2v("invert", clip, *FAST, "--json", tmp_path / "inv.json", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    inv = json.loads((tmp_path / "inv.json").read_text())
    assert inv["n_frames"] == 2 and inv["size"] == [64, 64] and Path(inv["cache"]).is_dir()
    assert inv["source_prompt"] == "a clip of the options tests" and inv["reconstruction"]["latent_rel_rms"] > 0
    r = p2v("info", "--engines", tmp_path / "none", "--json", tmp_path / "info.json", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "info.json").read_text())
    assert {"component", "status"} == set(rows[0]) and any(row["component"] == "torch" for row in rows)


@pytest.mark.parametrize("command, raised, present, absent", [
    ("edit", "oom", ["--latent-update detached", "--dtype fp16", "--size"], []),
    ("invert", "oom", ["--dtype fp16", "--size"], ["--latent-update"]),
    ("eval", "memory", ["--size", "--max-frames"], ["--latent-update", "--dtype"]),
    ("eval", "interrupt", ["interrupted; no partial output was kept"], ["inversion"]),
    ("invert", "interrupt", ["finished inversion frames are kept in the cache"], []),
])
def test_messages_name_only_the_commands_own_options(command, raised, present, absent, tmp_path,
                                                     monkeypatch) -> None:
    import torch

    import p2v_fast.pipeline
    import p2v_fast.quality.evaluate

    exc = {"oom": torch.OutOfMemoryError("CUDA out of memory"), "memory": MemoryError(),
           "interrupt": KeyboardInterrupt()}[raised]

    def fail(*args, **kwargs):
        raise exc

    for module, name in ((p2v_fast.pipeline, "edit_video"), (p2v_fast.pipeline, "invert_video"),
                         (p2v_fast.quality.evaluate, "evaluate_video")):
        monkeypatch.setattr(module, name, fail)
    clip = sample_clip(tmp_path, n_frames=2, size=(64, 64), audio=False)
    args = {"edit": ["edit", clip, "a swan", *FAST], "invert": ["invert", clip, *FAST],
            "eval": ["eval", clip, "a swan", "-o", clip, "--clip-model", "tiny"]}[command]
    line = one_line_error(p2v(*args))
    for text in present:
        assert text in line, line
    for text in absent:
        assert text not in line, line


OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
FOREIGN = {"--index-url"}  # other tools' options that messages name: pip's (the torchvision hint)
COMMAND = re.compile(r"p2v ([a-z][a-z-]*)((?: +[^\s`'\"()]+)*)")  # `p2v CMD ARGS...`: up to a quote or bracket


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """Every string of ``path`` that a user may read (f-strings with each field as X), less
    docstrings and bare option names (the CLI's declarations: ``"--overwrite", "--force"``)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            out.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs | parts:
            if not re.fullmatch(r"--[a-z0-9-]+", node.value):
                out.append((node.lineno, node.value))
    return out


def test_every_option_a_message_names_is_the_commands_own_name() -> None:
    """Before: export's messages said --precision, the old spelling that --dtype took over (and
    issue 27 found --out and --force in the rebuild hints). Every --option in the code's messages
    is an option's own name (the one --help and docs/options.md show first, not an alias kept for
    old scripts), and within a `p2v CMD ...` command line, one of CMD's."""
    own: dict[str, set[str]] = {}
    for name, command in _commands().items():
        longs = ([o for o in (*p.opts, *p.secondary_opts) if o.startswith("--")] for p in command.params)
        own[name] = {names[0] for names in longs if names} | {"--help"}  # the first: the option's own name
    names = set().union(*own.values(), FOREIGN)
    files = [ROOT / "cli.py", *sorted((ROOT / "p2v_fast").rglob("*.py")), *sorted((ROOT / "export").glob("*.py")),
             *(f for f in sorted((ROOT / "benchmarks").glob("*.py")) if "argparse" not in f.read_text())]
    wrong = []
    for path in files:
        for line, text in _message_strings(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            wrong += [f"{where} {o}" for o in OPTION.findall(text) if o not in names]
            for m in COMMAND.finditer(text):
                if m.group(1) in own:
                    wrong += [f"{where} p2v {m.group(1)} {o}" for o in OPTION.findall(m.group(2))
                              if o not in own[m.group(1)]]
    assert not wrong, wrong


def test_cli_module_keeps_its_progress_names() -> None:
    """The progress classes moved to p2v_fast.display; the CLI still offers them by name."""
    from p2v_fast import display

    assert cli.LogProgress is display.LogProgress and cli.RichProgress is display.RichProgress


def test_a_commands_parameters_become_its_config_in_one_move() -> None:
    """EditConfig.from_options keeps the parameters that name a field, drops the command's own
    (input, output, --json, ...), and applies the command's conversions last."""
    cfg = EditConfig.from_options({"input": Path("x.mp4"), "prompt": "a swan", "size": 128, "json_path": None,
                                   "max_memory": "1GB", "latent_update": "autograd"},
                                  max_memory=2**30, latent_update="off")
    assert cfg == EditConfig(prompt="a swan", size=128, max_memory=2**30, latent_update="off")


@pytest.mark.parametrize("command", ["edit", "invert", "ablate"])
def test_every_config_option_of_a_command_reaches_its_config(command: str, monkeypatch) -> None:
    """Each field a command offers as an option arrives in the EditConfig it builds, unconverted
    options as given (no hand mapping to forget one)."""
    seen: list[EditConfig] = []

    def capture(options, **overrides):
        seen.append(original(options, **overrides))
        raise SystemExit(0)

    original = EditConfig.from_options
    monkeypatch.setattr(EditConfig, "from_options", capture)
    params = {p.name for p in _commands()[command].params}
    given = {"model": "tiny", "size": 192, "start": 2, "stride": 3, "steps": 7, "seed": 5, "device": "cpu",
             "dtype": "fp32", "resize": "pad", "depth_norm": "clip", "source_prompt": "a src", "fps": 12.5,
             "invert_dtype": "same", "guidance_scale": 3.5, "update_weight": 42.0, "negative_prompt": "blur",
             "refs": "anchor", "update_steps": 4, "threads": 1, "batch_frames": 3, "invert_batch": 2,
             "max_frames": 9, "schedule": "sequential"}
    args = [command, "in.mp4", *(["a swan"] if command != "invert" else [])]
    for name, value in given.items():
        if name in params:
            args += [f"--{name.replace('_', '-')}", str(value)]
    r = p2v(*args)
    assert seen, r.output
    cfg = seen[0]
    fields = {f for f in EditConfig.__dataclass_fields__ if f in params}
    assert fields >= {"model", "size", "steps", "device", "source_prompt"}
    for name in fields & set(given):
        assert getattr(cfg, name) == given[name], name


def test_the_bench_options_are_written_once() -> None:
    """`p2v bench`'s parameters are BenchRequest's fields, with its defaults; the timed stages' and
    the protocol's options take their defaults from it; and the command hands them over in one move."""
    import dataclasses
    import inspect

    from benchmarks.bench import BenchOptions
    from benchmarks.options import BenchRequest
    from benchmarks.protocol import ProtocolOptions

    fields = {f.name: f.default for f in dataclasses.fields(BenchRequest)}
    params = {p.name: p.default for p in _commands()["bench"].params}
    assert set(params) == set(fields)
    assert params == {k: (None if v == () else v) for k, v in fields.items()}  # a repeatable option shows None
    for other in (BenchOptions, ProtocolOptions):  # None in a request: the mode's own default
        shared = {f.name: f.default for f in dataclasses.fields(other) if fields.get(f.name) not in (None, (), False)}
        assert shared == {k: fields[k] for k in shared} and {"dtype", "device"} <= set(shared), other
    assert "BenchRequest.from_options(locals()" in inspect.getsource(cli.bench)
    request = BenchRequest.from_options({"backend": ["torch", "onnxruntime"], "speedups": None, "size": 64,
                                         "progress": object()}, max_memory=2**20)
    assert request == BenchRequest(backend=("torch", "onnxruntime"), size=64, max_memory=2**20)
