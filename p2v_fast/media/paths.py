"""Paths: every check an output path goes through before any work starts (the edit's outputs as
:class:`EditPaths`, any report file, ``--json``). Writing them atomically is :mod:`p2v_fast.files`'
job; where caches live is :func:`p2v_fast.files.cache_root`."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from p2v_fast.errors import InputError, one_line
from p2v_fast.media import writer


def name_max(folder: Path) -> int:
    """Longest file name (bytes) the file system of ``folder`` takes (255 where it cannot say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def check_name_length(path: str | Path, extra_names: tuple[str, ...] = ()) -> Path:
    """InputError if ``path``'s name, its temporary ``.NAME.partial`` name or an ``extra_names``
    side file name is longer than the file system allows (checked before anything touches it)."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    longest = max(len(n.encode()) for n in (f".{out.name}.partial", *extra_names))
    limit = name_max(parent) if parent.is_dir() else 255
    if longest > limit:
        raise InputError(f"output name '{out.name}' is too long for the file system ({limit} bytes at most, "
                         "with the temporary and side files' suffixes); choose a shorter -o")
    return out


def check_output_file(path: str | Path, *, extra_names: tuple[str, ...] = (), create_folder: bool = False) -> Path:
    """InputError unless ``path`` can be written as a file (checked before long work starts).

    Refused: a folder, a device, FIFO or socket (only a regular file is ever replaced), a missing
    or unwritable folder, and a name longer than the file system allows, counting the temporary
    ``.NAME.partial`` name it is written under and ``extra_names`` (side files) beside it.
    ``create_folder``: a missing folder is fine if its nearest existing ancestor is a writable
    folder (the caller creates it).
    """
    out = check_name_length(path, extra_names)
    if out.is_dir():
        raise InputError(f"output '{out}' is a folder; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if create_folder:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        above = parent
        while not above.exists() and above != above.parent:
            above = above.parent
        if above.exists() and not above.is_dir():  # out.mp4 under notes.txt: not "does not exist"
            raise InputError(f"cannot write '{out}': '{above}' is a file, not a folder")
        raise InputError(f"output folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder '{parent}' is not writable")
    try:
        mode = out.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise InputError(f"cannot use output '{out}': {one_line(e)}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"output '{out}' exists and is not a regular file (a device, FIFO or socket); "
                         "give a file name")
    return out


def default_output(input_path: Path, suffix: str = ".p2v.mp4") -> Path:
    base = input_path.with_suffix("") if input_path.is_file() else input_path
    return base.parent / f"{base.name}{suffix}"


def check_output(input_path: Path, output: Path, overwrite: bool, kind: str | None = None,
                 side_files: tuple[str, ...] = (), create_folder: bool = False, option: str = "-o") -> Path:
    """Validate the output path: not the input, not inside an input image folder, not an existing
    file (unless overwrite), writable, a name the file system takes (``side_files``: names that
    will be written beside it). ``kind``: "video" (an extension :data:`writer.OUTPUT_FORMATS`
    knows) or "png". ``create_folder``: its folder may not exist yet (the caller creates it).
    ``option``: the option that names it, for the message."""
    output = check_name_length(output, side_files)
    if output.resolve() == Path(input_path).resolve():
        raise InputError(f"output '{output}' is the input; choose another {option} path")
    if Path(input_path).is_dir() and output.resolve().parent == Path(input_path).resolve():
        raise InputError(f"output '{output}' is inside the input image folder '{input_path}' (the next run would "
                         "read it as a frame); write it elsewhere")
    if kind == "png" and output.suffix.lower() != ".png":
        raise InputError(f"--preview writes a PNG image; give -o a .png name, not '{output.name}'")
    if kind == "video":
        writer.output_format(output)
    if output.exists() and not output.is_dir() and not overwrite:
        raise InputError(f"{'output' if option == '-o' else option} '{output}' exists; pass --overwrite to replace it")
    return check_output_file(output, extra_names=side_files, create_folder=create_folder)


def side_paths(out: Path) -> tuple[Path, Path]:
    """The side-by-side video and the contact strip written beside the edit ``out``."""
    return out.with_name(f"{out.stem}.side-by-side{out.suffix}"), out.with_name(f"{out.stem}.strip.png")


@dataclass(frozen=True)
class EditPaths:
    """Every file an edit writes: the output, the side-by-side video (``--side-by-side``), the
    contact strip (not with ``--preview``) and the ``--json`` report."""

    output: Path
    side_by_side: Path | None
    strip: Path | None
    json: Path | None
    preview: bool = False

    @classmethod
    def of(cls, input_path: Path, output: str | Path | None, *, preview: bool = False, side_by_side: bool = False,
           json_path: str | Path | None = None) -> EditPaths:
        """The paths ``p2v edit`` writes for these options (``output`` None: beside the input)."""
        if preview and side_by_side:
            raise InputError("--preview writes one PNG of the anchor frame; --side-by-side is for a video edit")
        out = Path(output) if output else default_output(Path(input_path),
                                                         ".p2v-preview.png" if preview else ".p2v.mp4")
        sbs, strip = side_paths(out)
        return cls(out, sbs if side_by_side and not preview else None, None if preview else strip,
                   None if json_path is None else Path(json_path), preview)

    @property
    def sides(self) -> tuple[Path, ...]:
        """The side files written beside the output."""
        return tuple(p for p in (self.strip, self.side_by_side) if p is not None)

    @property
    def all(self) -> tuple[Path, ...]:
        return (self.output, *self.sides, *(() if self.json is None else (self.json,)))

    def check(self, input_path: Path, overwrite: bool, create_folders: bool = False) -> None:
        """InputError (one line) unless every file can be written: not the input, not in an
        input image folder, a container the extension names, a name the file system takes, and
        not an existing file unless ``overwrite`` (the JSON report too)."""
        names = tuple(p.name for p in self.sides)
        check_output(input_path, self.output, overwrite, "png" if self.preview else "video", names, create_folders)
        for side in self.sides:
            check_output(input_path, side, overwrite, create_folder=create_folders)
        if self.json is not None:  # a report: replaced if it exists, but never one of the edit's own files
            if self.json.resolve() in {p.resolve() for p in (self.output, *self.sides)}:
                raise InputError(f"--json '{self.json}' is a file the edit writes; choose another --json path")
            check_output(input_path, self.json, overwrite, create_folder=create_folders, option="--json")


def check_json_path(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"--json '{path}' is a folder; give a file name such as bench.json")
    if not path.parent.is_dir():
        raise InputError(f"--json folder '{path.parent}' does not exist")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"--json folder '{path.parent}' is not writable")


def check_not_in_folder(path: str | Path, folder: str | Path | None, what: str = "the engine folder") -> None:
    """InputError if the report ``path`` would land in ``folder`` (an engine folder a command reads:
    its manifest and graphs are never replaced by a report)."""
    if folder is not None and Path(path).resolve().parent == Path(folder).resolve():
        raise InputError(f"--json '{path}' is in {what} '{folder}'; choose another --json path")


def check_report_path(path: str | Path | None, *reads: Path, what: str = "input", overwrite: bool = False,
                      engines: str | Path | None = None) -> Path | None:
    """``--json PATH`` of a command, checked before its work: a file that can be written, none of
    the files the command reads (``reads``; a report never replaces what it describes), not in the
    engine folder ``engines`` it reads, and not an existing file unless ``overwrite`` (the rule
    for every output)."""
    if path is None:
        return None
    out = check_output_file(path)
    for read in reads:
        if out.resolve() == Path(read).resolve():
            raise InputError(f"--json '{path}' is the {what} '{read}'; choose another --json path")
    check_not_in_folder(out, engines)
    if out.exists() and not overwrite:
        raise InputError(f"--json '{path}' exists; pass --overwrite to replace it")
    return out
