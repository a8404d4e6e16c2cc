"""`p2v batch`: many edits from one jobs file, each model set loaded once per worker.

A jobs file (YAML or JSON) holds ``defaults`` and a list of ``jobs``; every `p2v edit` option
is a key, under its long name with underscores. The accepted keys are derived from the one
place the edit's options are defined (:class:`~p2v_fast.config.EditConfig` and the keyword
options of :func:`~p2v_fast.pipeline.edit_video`), so an option added there is accepted here.

The file is validated whole before any work (:func:`load_jobs`): every problem is one line and
nothing runs. Then the jobs run on one in-process worker (:func:`run_batch`) or on Ray actors
(:mod:`p2v_fast.apps.batch_ray`), both through :class:`BatchWorker`: a job that fails is reported
and the others go on. Jobs on one clip with the same inversion settings share one inversion
(the on-disk cache, with a lock so two workers never invert one clip at once).

Resuming: beside each finished output a hidden ``.NAME.p2v-job.json`` records the job that made
it; a job whose output exists with that record is skipped. An output that exists without it,
or from other settings, stops validation unless the job says ``overwrite: true``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import os
import re
import socket
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2v_fast.config import EditConfig, paper_options
from p2v_fast.errors import InputError, P2VError, Terminated, one_line
from p2v_fast.media import reader
from p2v_fast.text import slug

if typing.TYPE_CHECKING:
    from p2v_fast.media.paths import EditPaths

# edit_video's keyword options that are the library's plumbing, not options of an edit
_NOT_JOB_OPTIONS = ("progress", "runtime")
SIDECAR_VERSION = 1


class BatchFileError(InputError):
    """The jobs file has problems; ``lines`` holds one line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


# --------------------------------------------------------------------------- job keys


def edit_option_types() -> dict[str, Any]:
    """edit_video's keyword options (``overwrite``, ``preview``, ...) and their types."""
    from p2v_fast.pipeline import edit_video

    hints = typing.get_type_hints(edit_video)
    params = inspect.signature(edit_video).parameters.values()
    return {p.name: hints.get(p.name, Any) for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _NOT_JOB_OPTIONS}


def job_key_types() -> dict[str, Any]:
    """Every key a job (or ``defaults``) may hold, with its type: ``input``, ``output``,
    ``paper`` (`p2v edit --paper`), the fields of EditConfig and edit_video's keyword options."""
    keys: dict[str, Any] = {"input": Path, "output": Path | None, "paper": bool}
    keys.update(typing.get_type_hints(EditConfig))
    keys.update(edit_option_types())
    return keys


def _type_name(t: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(
        t, getattr(t, "__name__", str(t)))


def _coerce(key: str, value: Any, hint: Any, base: Path) -> Any:
    """``value`` checked against ``hint`` (bool, int, float, str, Path, or X | None); paths are
    resolved against ``base`` (the jobs file's folder). Other types pass through unchecked
    (EditConfig checks their values)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    core = [a for a in args if a is not type(None)]
    if value is None:
        if optional:
            return None
        raise InputError(f"{key} must not be empty")
    if Path in core:  # e.g. json_path: str | Path | None -- a path, relative to the jobs file
        core = [Path]
    if len(core) != 1 or core[0] not in (bool, int, float, str, Path):
        return value
    t = core[0]
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool),
          str: isinstance(value, str), Path: isinstance(value, str) and value.strip() != ""}[t]
    if not ok:
        raise InputError(f"{key} must be {_type_name(t)}; got {value!r}")
    if t is float:
        return float(value)
    if t is Path:
        return (base / Path(value).expanduser()).resolve()
    return value


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One validated edit: absolute paths, its config and edit_video's keyword options."""

    index: int  # 1-based position in the jobs file
    input: Path
    output: Path
    cfg: EditConfig
    options: dict[str, Any]  # edit_video keyword options (overwrite, preview, side_by_side, ...)
    n_frames: int  # frames the edit writes
    done: bool = False  # a complete output of this very job exists (found at validation)
    # some of its files were there before this run and may be replaced (overwrite: true, or left
    # by an earlier batch run of this output)
    output_existed: bool = False

    @property
    def clip(self) -> str:
        """Jobs on one clip share its inversion when their inversion settings agree."""
        return str(self.input)

    @property
    def label(self) -> str:
        return f"{self.input.name}: {self.cfg.prompt}"

    @property
    def paths(self) -> EditPaths:
        """Every file the job writes, named as ``p2v edit`` names them."""
        from p2v_fast.media.paths import EditPaths

        opts = self.options
        return EditPaths.of(self.input, self.output, preview=bool(opts.get("preview")),
                            side_by_side=bool(opts.get("side_by_side")), json_path=opts.get("json_path"))

    def spec(self) -> dict[str, Any]:
        """What the output depends on (recorded beside it, compared on a rerun)."""
        cfg = {f.name: _plain(getattr(self.cfg, f.name)) for f in dataclasses.fields(self.cfg)}
        opts = {k: _plain(v) for k, v in sorted(self.options.items()) if k != "overwrite"}
        return {"input": str(self.input), **cfg, **opts}


def _plain(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else v


def sidecar_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.p2v-job.json")


def _read_sidecar(output: Path) -> dict[str, Any] | None:
    """The job record beside ``output``, or None when it is missing or malformed (a record
    whose values are not what :func:`write_sidecar` writes is no record)."""
    try:
        data = json.loads(sidecar_path(output).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not (isinstance(data, dict) and isinstance(data.get("spec"), dict)):
        return None
    frames, sha, out = data.get("frames"), data.get("frames_sha256"), data.get("output")
    if not (isinstance(frames, int) and not isinstance(frames, bool) and frames >= 0):
        return None
    if sha is not None and not isinstance(sha, str):
        return None
    if out is not None and not (isinstance(out, dict) and isinstance(out.get("bytes"), int)
                                and isinstance(out.get("sha256"), str)):
        return None
    return data


def _file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of ``path``, read in chunks (an output may be gigabytes)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _output_problem(job: Job, record: dict[str, Any]) -> str | None:
    """Whether the output is still the one the record describes (a truncated or changed output
    is not complete, whatever its record says). Records written before sizes were kept: None."""
    want = record.get("output")
    if want is None:
        return None
    try:
        got = _file_digest(job.output)
    except OSError as e:
        return f"cannot be read ({one_line(e)})"
    if got["bytes"] != want["bytes"]:
        return f"is {got['bytes']} bytes, but its job record says {want['bytes']} (truncated or changed since)"
    if got["sha256"] != want["sha256"]:
        return "differs from what its job record describes (changed since)"
    return None


def write_sidecar(job: Job, result: JobResult) -> None:
    """Record, beside the output, which job made it, with the output's size and sha256 (atomically)."""
    from p2v_fast.files import write_json_atomic

    write_json_atomic(sidecar_path(job.output), {
        "version": SIDECAR_VERSION, "spec": job.spec(), "frames": result.frames,
        "frames_sha256": result.frames_sha256, "output": _file_digest(job.output),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


@dataclass
class _Draft:
    index: int
    input: Path
    output: Path | None
    cfg: EditConfig
    options: dict[str, Any]
    n_frames: int


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's booleans (true/false only): YAML 1.1 reads on, off,
    yes and no as booleans, so ``latent_update: off`` would not be the option's value "off"."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    return yaml.load(text, Loader=Loader)  # a SafeLoader subclass: safe


#: Bounds on a jobs file: its bytes, its values once YAML's aliases are expanded (a 491-byte
#: "billion laughs" expands to 9**9 and ran past 5 GB) and its nesting.
MAX_JOBS_FILE_BYTES = 16 * 2**20
MAX_JOBS_VALUES = 1_000_000
MAX_JOBS_DEPTH = 32


def _parse_file(path: Path) -> Any:
    try:
        if path.is_file() and path.stat().st_size > MAX_JOBS_FILE_BYTES:
            raise InputError(f"jobs file '{path}' is over {MAX_JOBS_FILE_BYTES // 2**20} MiB; split it")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"jobs file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read jobs file '{path}': {one_line(e)}") from None
    deep = f"{path.name}: nested deeper than {MAX_JOBS_DEPTH} levels; a jobs file is a mapping of lists of mappings"
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path.name}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
        except RecursionError:
            raise InputError(deep) from None
        _check_shape(data, path.name)
        return data
    import yaml

    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or one_line(e)
        raise InputError(f"{path.name}: not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise InputError(deep) from None
    _check_shape(data, path.name)
    return data


def _check_shape(data: Any, name: str) -> None:
    """Refuse parsed data that refers to itself (a YAML alias inside its own anchor), nests
    deeper than :data:`MAX_JOBS_DEPTH` or, with its aliases expanded, holds more than
    :data:`MAX_JOBS_VALUES` values. Iterative, and linear in the distinct containers: an alias
    is counted at its expanded size without being expanded."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (values with aliases expanded, nesting depth)
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]

    def children(node: dict | list) -> list[Any]:
        return [*node.keys(), *node.values()] if isinstance(node, dict) else node

    while stack:
        node, finished = stack.pop()
        if not isinstance(node, dict | list):
            continue
        key = id(node)
        if finished:
            on_path.discard(key)
            kids = [sizes.get(id(c), (1, 0)) for c in children(node)]
            size, depth = 1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0)
            if size > MAX_JOBS_VALUES:
                raise InputError(f"{name}: its aliases expand to more than {MAX_JOBS_VALUES:,} values; write the "
                                 "jobs out, or use fewer nested aliases")
            if depth > MAX_JOBS_DEPTH:
                raise InputError(f"{name}: nested deeper than {MAX_JOBS_DEPTH} levels; a jobs file is a mapping "
                                 "of lists of mappings")
            sizes[key] = (size, depth)
            continue
        if key in on_path:
            raise InputError(f"{name}: an alias refers to the value that holds it (a recursive structure)")
        if key in sizes:
            continue
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node))


def load_jobs(path: str | Path, local: bool = True) -> list[Job]:
    """Read and validate a jobs file whole. Raises :class:`BatchFileError` with one line per
    problem (unknown key, bad value, missing input, two jobs writing one file, ...). ``local``:
    the jobs run on this machine, so its device is checked too (not for Ray workers)."""
    path = Path(path)
    data = _parse_file(path)
    base = path.resolve().parent
    name = path.name
    if isinstance(data, list):
        data = {"jobs": data}
    if not isinstance(data, dict):
        raise BatchFileError([f"{name}: expected a mapping with 'jobs' (and optional 'defaults')"])
    errors: list[str] = [f"{name}: unknown top-level key {k!r}; expected 'defaults' and 'jobs'"
                         for k in data if k not in ("defaults", "jobs")]
    defaults = data.get("defaults") or {}
    raw_jobs = data.get("jobs")
    if not isinstance(defaults, dict):
        errors.append(f"{name}: 'defaults' must be a mapping of options")
        defaults = {}
    if not isinstance(raw_jobs, list) or not raw_jobs:
        errors.append(f"{name}: 'jobs' must be a non-empty list")
        raise BatchFileError(errors)
    keys = job_key_types()
    opt_names = set(edit_option_types())
    for k in defaults:
        if k not in keys:
            errors.append(f"{name}: defaults: {_unknown(k, keys)}")
    probes: dict[tuple[Path, float | None], reader.VideoInfo | str] = {}
    drafts: list[_Draft] = []
    for i, raw in enumerate(raw_jobs, start=1):
        where = f"{name}: job {i}"
        if not isinstance(raw, dict):
            errors.append(f"{where}: expected a mapping of options, got {raw!r}")
            continue
        bad = [f"{where}: {_unknown(k, keys)}" for k in raw if k not in keys]
        if bad:
            errors.extend(bad)
            continue
        try:
            merged = {**{k: v for k, v in defaults.items() if k in keys}, **raw}
            drafts.append(_draft(i, merged, keys, opt_names, base, probes, local))
        except InputError as e:
            errors.append(f"{where}: {e}")
    jobs = _place_outputs(drafts, name, errors, path.resolve())
    if errors:  # in file order: the file's own problems, then job by job
        job_no = lambda line: int(m.group(1)) if (m := re.match(rf"{re.escape(name)}: job (\d+):", line)) else 0  # noqa: E731
        raise BatchFileError(sorted(errors, key=job_no))
    return jobs


def check_summary_path(path: str | Path, jobs_file: str | Path, jobs: list[Job]) -> Path:
    """``p2v batch --json PATH``: a file that is not the jobs file, an input, inside an input
    image folder, or a file a job writes (InputError, one line)."""
    from p2v_fast.media.paths import check_output_file

    out = check_output_file(path).resolve()
    if out == Path(jobs_file).resolve():
        raise InputError(f"--json '{path}' is the jobs file; choose another file for the summary")
    for j in jobs:
        if out in (j.input, j.input.resolve()) or (j.input.is_dir() and out.parent == j.input.resolve()):
            raise InputError(f"--json '{path}' is (in) job {j.index}'s input; choose another file for the summary")
        if out in j.paths.all:
            raise InputError(f"--json '{path}' is written by job {j.index}; choose another file for the summary")
    return out


def _unknown(key: Any, keys: dict[str, Any]) -> str:
    close = difflib.get_close_matches(str(key), list(keys), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}"


def _max_memory(value: Any) -> Any:
    """``max_memory`` as the CLI takes it ("12GB", "512MiB") or a number of bytes."""
    if not isinstance(value, str):
        return value
    from p2v_fast.text import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as e:
        raise InputError(f"max_memory: {e}") from None


def _draft(index: int, merged: dict[str, Any], keys: dict[str, Any], opt_names: set[str], base: Path,
           probes: dict[tuple[Path, float | None], reader.VideoInfo | str], local: bool = True) -> _Draft:
    """One job checked as ``p2v edit`` checks it before loading a model: values, prompt, the
    input's probe (``--fps`` included) and the frame selection (size, framing, stride)."""
    from p2v_fast.media.clip_selection import select_clip
    from p2v_fast.media.paths import EditPaths
    from p2v_fast.nets.runtime import invert_precision, resolve_device
    from p2v_fast.pipeline import probe_input
    from p2v_fast.weights.prompts import check_prompt

    for required in ("input", "prompt"):
        if merged.get(required) is None:
            raise InputError(f"'{required}' is missing")
    values = {k: _coerce(k, _max_memory(v) if k == "max_memory" else v, keys[k], base) for k, v in merged.items()}
    # the input as given, its links not followed: a symlinked clip's default output goes beside the
    # link, as p2v edit puts it
    values["input"] = Path(os.path.abspath(base / Path(merged["input"]).expanduser()))
    check_prompt(values["prompt"])
    model = values.get("model")
    if isinstance(model, str) and model != "tiny":  # a local folder is relative to the jobs file
        from p2v_fast.weights.hub import looks_like_path

        folder = (base / Path(model).expanduser()).resolve()
        if folder.is_dir():
            values["model"] = str(folder)
        elif looks_like_path(model):
            raise InputError(f"model folder '{model}' does not exist (relative to the jobs file)")
    input_path: Path = values.pop("input")
    output: Path | None = values.pop("output", None)
    options = {k: values.pop(k) for k in list(values) if k in opt_names}
    if values.pop("paper", False):  # the paper's configuration; the job's (and defaults') own keys win
        values.update(paper_options(values))
    cfg = EditConfig(**values)
    if cfg.cache_dir is not None and cfg.cache_dir.exists() and not cfg.cache_dir.is_dir():
        raise InputError(f"cache_dir '{cfg.cache_dir}' is a file, not a folder")
    if local:  # the device and TF32 are this machine's question (p2v edit's checks); Ray workers' their own
        invert_precision(cfg.invert_dtype, resolve_device(cfg.device))
    EditPaths.of(input_path, output, preview=bool(options.get("preview")),  # options that exclude each other
                 side_by_side=bool(options.get("side_by_side")), json_path=options.get("json_path"))
    info = probes.get((input_path, cfg.fps))
    if info is None:
        try:
            info = probe_input(input_path, cfg)
        except InputError as e:
            info = str(e)
        probes[(input_path, cfg.fps)] = info
    if isinstance(info, str):
        raise InputError(info)
    selection = select_clip(input_path, cfg.replace(max_frames=1) if options.get("preview") else cfg, info)
    return _Draft(index, input_path, output, cfg, options, selection.n_frames)


def _place_outputs(drafts: list[_Draft], name: str, errors: list[str], jobs_file: Path | None = None) -> list[Job]:
    """Default outputs (unique per prompt when a clip has several jobs), then the checks that
    need every job: no two jobs write one file, no job writes an input or the jobs file, existing
    outputs."""
    from p2v_fast.media.paths import default_output

    by_clip: dict[tuple[Path, bool], list[_Draft]] = {}
    for d in drafts:
        if d.output is None:
            by_clip.setdefault((d.input, bool(d.options.get("preview"))), []).append(d)
    for (clip, preview), group in by_clip.items():
        suffix = ".p2v-preview.png" if preview else ".p2v.mp4"
        if len(group) == 1:
            group[0].output = default_output(clip, suffix)
            continue
        slugs = [slug(d.cfg.prompt) for d in group]
        for d, name in zip(group, slugs, strict=True):
            if slugs.count(name) > 1:  # one prompt, other settings: a short hash of the settings
                spec = json.dumps(Job(0, d.input, clip, d.cfg, d.options, 0).spec(), sort_keys=True)
                name += "-" + hashlib.sha256(spec.encode()).hexdigest()[:6]
            d.output = default_output(clip, f".p2v.{name}{suffix.removeprefix('.p2v')}")

    inputs = {d.input for d in drafts} | {d.input.resolve() for d in drafts}  # a link and what it names
    writers: dict[Path, int] = {}
    jobs: list[Job] = []
    for d in drafts:
        assert d.output is not None
        where = f"{name}: job {d.index}"
        job = Job(d.index, d.input, d.output, d.cfg, d.options, d.n_frames)
        problem = None
        for target in job.paths.all:
            if problem is None and writers.get(target) == d.index:  # json_path is one of its own files
                problem = f"json_path '{target}' is a file the job writes itself; choose another json_path"
            elif problem is None and target in writers:
                problem = f"writes '{target}', as job {writers[target]} does; give each job its own output"
            elif problem is None and target in inputs:
                problem = f"output '{target}' is an input of this batch"
            elif problem is None and jobs_file is not None and target.resolve() == jobs_file:
                problem = f"output '{target}' is the jobs file itself"
            writers.setdefault(target, d.index)
        if problem is None:
            try:  # as p2v edit checks it; existing files are _existing's question
                job.paths.check(job.input, overwrite=True, create_folders=True)
            except InputError as e:
                problem = str(e)
        if problem is None:
            job, problem = _existing(job)
        if problem is not None:
            errors.append(f"{where}: {problem}")
            continue
        jobs.append(job)
    return jobs


def _existing(job: Job) -> tuple[Job, str | None]:
    """A job some of whose files exist: done (its output made by this very job), to be redone
    (overwrite: true, or files left by an earlier batch run of this output whose output is gone),
    or a problem."""
    present = [p for p in job.paths.all if p.exists()]  # its json_path too: an output like the others
    if not present:
        return job, None
    record = _read_sidecar(job.output)
    spec = job.spec()
    if job.output.exists() and record is not None and record["spec"] == spec:
        damaged = _output_problem(job, record)
        if damaged is None:
            return dataclasses.replace(job, done=True, output_existed=True), None
        if not job.options.get("overwrite"):
            return job, f"output '{job.output}' {damaged}; delete it or set overwrite: true"
    if job.options.get("overwrite") or (record is not None and not job.output.exists()):
        return dataclasses.replace(job, output_existed=True), None
    if not job.output.exists():
        return job, f"'{present[0]}' exists and was not made by p2v batch; delete it or set overwrite: true"
    if record is None:
        why = "was not made by p2v batch"
    else:
        diff = [k for k in sorted(set(spec) | set(record["spec"])) if spec.get(k) != record["spec"].get(k)]
        changes = [f"{k}: {record['spec'].get(k)!r}, now {spec.get(k)!r}" for k in diff[:3]]
        why = "was made with other settings (" + ", ".join(changes) + (", ..." if diff[3:] else "") + ")"
    return job, f"output '{job.output}' exists and {why}; delete it or set overwrite: true"


# --------------------------------------------------------------------------- results, progress


@dataclass
class JobResult:
    """One row of the summary (and of ``--json``)."""

    job: int
    input: str
    prompt: str
    status: str  # done | skipped | failed | interrupted | not run
    frames: int
    seconds: float
    output: str
    detail: str = ""
    inversion: str | None = None  # "inverted" | "cache hit" (done jobs)
    seconds_inversion: float | None = None
    frames_sha256: str | None = None  # the edited frames before encoding
    worker: str | None = None
    attempts: int = 0

    @classmethod
    def of(cls, job: Job, status: str, detail: str = "", **kw: Any) -> JobResult:
        return cls(job.index, str(job.input), job.cfg.prompt, status, kw.pop("frames", 0), kw.pop("seconds", 0.0),
                   str(job.output), detail, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class BatchReporter(Protocol):
    """What a batch reports as it goes (the CLI renders it; a test may act on it)."""

    def start(self, jobs: list[Job]) -> None: ...
    def job_started(self, job: Job, worker: str) -> None: ...
    def job_progress(self, job: Job, stage: str, frames: float) -> None:
        """``frames`` of ``job.n_frames`` are through ``stage`` (fractional while in flight)."""
        ...
    def job_finished(self, job: Job, result: JobResult) -> None: ...
    def log(self, message: str) -> None: ...


class NullReporter:
    def start(self, jobs: list[Job]) -> None:
        pass

    def job_started(self, job: Job, worker: str) -> None:
        pass

    def job_progress(self, job: Job, stage: str, frames: float) -> None:
        pass

    def job_finished(self, job: Job, result: JobResult) -> None:
        pass

    def log(self, message: str) -> None:
        pass


class JobProgress:
    """p2v_fast.progress.Progress for one job: each stage's units as frames of the job."""

    def __init__(self, n_frames: int, on_progress: Callable[[str, float], None],
                 on_log: Callable[[str], None]) -> None:
        self.n_frames = max(n_frames, 1)
        self.on_progress = on_progress
        self.on_log = on_log

    def stage(self, description: str, total: int | None) -> Callable[[int], None]:
        per_frame = (total or self.n_frames) / self.n_frames  # e.g. steps, for inversion and edit
        done = 0
        self.on_progress(description, 0.0)

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            self.on_progress(description, min(done / per_frame, self.n_frames))

        return advance

    def log(self, message: str) -> None:
        self.on_log(message)


@dataclass
class BatchResult:
    results: list[JobResult]
    seconds: float
    workers: list[str] = field(default_factory=list)
    interrupted: bool = False
    terminated: bool = False  # the interruption was SIGTERM (exit 143, as p2v edit)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 143 if self.terminated else 130
        return 1 if any(r.status != "done" and r.status != "skipped" for r in self.results) else 0

    def to_dict(self) -> dict[str, Any]:
        statuses = ("done", "skipped", "failed", "interrupted", "not run")
        return {"seconds": round(self.seconds, 3), "workers": self.workers,
                "counts": {s: self.count(s) for s in statuses if self.count(s)},
                "jobs": [r.to_dict() for r in self.results]}


# --------------------------------------------------------------------------- the worker

# EditConfig fields that only shape one edit, never which models load or how: a worker keeps
# one runtime for every combination of them. Any other field (new ones included) keys it.
_EDIT_ONLY = ("prompt", "source_prompt", "negative_prompt", "size", "start", "max_frames", "stride", "steps",
              "timestep_grid", "guidance_scale", "seed", "depth_norm", "schedule", "batch_frames", "invert_batch",
              "refs", "latent_update", "update_steps", "update_weight", "cache_dir", "invert_dtype", "resize",
              "output_size", "fps", "threads", "captioner")


def runtime_config(cfg: EditConfig) -> EditConfig:
    """The config a worker loads models for: edit-only fields at their defaults, and the
    autograd update on, so one runtime serves every latent-update mode."""
    defaults = EditConfig()
    reset = {k: getattr(defaults, k) for k in _EDIT_ONLY}
    return cfg.replace(**{**reset, "latent_update": "autograd"})


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class BatchWorker:
    """Runs jobs one at a time, loading each distinct model set once and keeping it."""

    def __init__(self) -> None:
        self._runtimes: dict[EditConfig, Any] = {}
        self.name = worker_name()

    def runtime(self, cfg: EditConfig) -> Any:
        from p2v_fast.nets.runtime import load_runtime

        key = runtime_config(cfg)
        if key not in self._runtimes:
            self._runtimes[key] = load_runtime(key)
        return self._runtimes[key]

    def run(self, job: Job, on_progress: Callable[[str, float], None] | None = None,
            on_log: Callable[[str], None] | None = None, attempt: int = 1) -> JobResult:
        """Edit ``job``; a failure is returned as a ``failed`` result, never raised (except
        KeyboardInterrupt)."""
        from p2v_fast.pipeline import edit_video

        t0 = time.perf_counter()
        progress = JobProgress(job.n_frames, on_progress or (lambda s, f: None), on_log or (lambda m: None))
        try:
            for path in job.paths.all:
                path.parent.mkdir(parents=True, exist_ok=True)
            options = {**job.options, "overwrite": bool(job.options.get("overwrite")) or job.output_existed}
            res = edit_video(job.cfg, job.input, job.output, **options, progress=progress,
                             runtime=self.runtime(job.cfg))
        except Exception as exc:  # reported in the summary; the other jobs go on
            return JobResult.of(job, "failed", failure_message(exc), seconds=time.perf_counter() - t0,
                                worker=self.name, attempts=attempt)
        result = JobResult.of(
            job, "done", "inversion: cache hit" if res.inversion_cache_hit else "", frames=res.n_frames,
            seconds=time.perf_counter() - t0, inversion="cache hit" if res.inversion_cache_hit else "inverted",
            seconds_inversion=res.seconds_inversion, frames_sha256=res.frames_sha256, worker=self.name,
            attempts=attempt)
        try:
            write_sidecar(job, result)
        except (OSError, P2VError) as exc:  # the output is done; a rerun will ask before redoing it
            result.detail = f"job record not written ({failure_message(exc)})"
        return result


def failure_message(exc: BaseException) -> str:
    """One line for a failed job: a P2VError's message, out of memory, or the exception."""
    from p2v_fast.nets.memory import is_out_of_memory

    if isinstance(exc, P2VError):
        text = str(exc)
    elif isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and is_out_of_memory(exc)):
        text = "out of memory; try a smaller size, dtype fp16 or latent_update detached"
    else:
        return one_line(exc, kind=True)
    return one_line(text)


def skipped(job: Job) -> JobResult:
    record = _read_sidecar(job.output) or {}
    return JobResult.of(job, "skipped", "output complete (done earlier)", frames=record.get("frames") or 0,
                        frames_sha256=record.get("frames_sha256"))


def run_batch(jobs: list[Job], reporter: BatchReporter | None = None) -> BatchResult:
    """Run ``jobs`` one after another in this process (one worker: models loaded once)."""
    reporter = reporter or NullReporter()
    t0 = time.perf_counter()
    results = {j.index: skipped(j) for j in jobs if j.done}
    reporter.start(jobs)
    worker: BatchWorker | None = None
    interrupted = terminated = False
    for job in (j for j in jobs if not j.done):
        if interrupted:
            results[job.index] = JobResult.of(job, "not run", "interrupted before it started")
            continue
        worker = worker or BatchWorker()
        reporter.job_started(job, worker.name)
        def on_progress(stage: str, frames: float, job: Job = job) -> None:
            reporter.job_progress(job, stage, frames)

        def on_log(message: str, job: Job = job) -> None:
            reporter.log(f"job {job.index}: {message}")

        try:
            res = worker.run(job, on_progress, on_log)
        except KeyboardInterrupt as exc:
            interrupted, terminated = True, isinstance(exc, Terminated)
            res = JobResult.of(job, "interrupted", "interrupted; finished inversion frames are kept in the cache")
        results[job.index] = res
        reporter.job_finished(job, res)
    return BatchResult([results[j.index] for j in jobs], time.perf_counter() - t0,
                       [worker.name] if worker else [], interrupted, terminated)

