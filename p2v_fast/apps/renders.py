"""The renders behind `p2v ui`: one at a time on the device, with live progress, cancel and an
output folder kept as `p2v batch` keeps its outputs.

Nothing here imports Gradio: the page (:mod:`p2v_fast.apps.ui`) turns its form into calls of
:class:`Renderer` and shows :class:`RenderJob`'s state. Every edit goes through the library's
entry point (:func:`~p2v_fast.pipeline.edit_video`) with a runtime loaded once per process and
kept (:class:`~p2v_fast.apps.batch.BatchWorker`'s cache, keyed as a batch worker keys it).

The output folder holds ``inputs/`` (the clips of finished renders, copied in under a name made
from their content), ``previews/`` (anchor-frame PNGs) and every render: ``NAME.mp4``,
``NAME.side-by-side.mp4``, ``NAME.strip.png``, ``NAME.json`` (the run's numbers) and the job record
``.NAME.mp4.p2v-job.json`` that `p2v batch` writes beside its outputs; the marker ``.p2v-ui`` says
the app made the folder, which holds nothing else (:meth:`Renderer.__init__` refuses a folder with
other files). No text from the page becomes a path: outputs are named by the app, uploads by their
hash, engines folders picked from those the app lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import queue
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2v_fast.config import DEFAULT_MODEL, EditConfig
from p2v_fast.errors import InputError, P2VError
from p2v_fast.text import clock, plural, slug

log = logging.getLogger(__name__)

#: Largest upload the page takes, in MB (``p2v ui --max-upload-mb``).
DEFAULT_MAX_UPLOAD_MB = 200
#: Cancelled renders and failed ones report this after "error:"/"cancelled" as the CLI does.
CANCELLED = "cancelled; no partial output was kept, finished inversion frames are kept in the cache"
#: The file that marks an output folder as the app's own (see :meth:`Renderer.__init__`).
MARKER = ".p2v-ui"
#: Longest log line the status box shows (a prompt's dropped part can be a million characters).
MAX_LOG_CHARS = 300
# what an output folder made by an earlier `p2v ui` (before the marker) holds
_OWN_DIRS = ("inputs", "previews", ".uploads")
_OWN_FILE = re.compile(r"\.?[^/]+\.(mp4|png|json)")
# the page's whole-number fields (EditConfig name -> the CLI's option)
_INTEGERS = {"steps": "--steps", "size": "--size"}
_NUMBERS = {"guidance_scale": "--guidance-scale", "update_weight": "--update-weight"}


class Cancelled(Exception):
    """Raised from the progress callback when the page's Cancel is pressed: the edit stops and
    its writers delete their partial files, as on Ctrl-C."""


def _shorten(text: str, limit: int = MAX_LOG_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit - 40]}... ({len(text):,} characters)"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: Any, option: str) -> int:
    """``value`` (from the page or its API) as an int; InputError unless it is a whole number."""
    if not _is_number(value) or not math.isfinite(value) or value != int(value):
        raise InputError(f"{option} must be a whole number; got {_shorten(repr(value), 60)}")
    return int(value)


def foreign_entries(folder: Path) -> list[str]:
    """The names in ``folder`` that `p2v ui` did not make: none if the folder is new or empty or
    holds the marker, else (a folder an earlier `p2v ui` made: its subfolders and files named as
    renders) anything else."""
    if not folder.is_dir() or (folder / MARKER).is_file():
        return []
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return []
    if not all((folder / d).is_dir() for d in _OWN_DIRS[:2]):
        return names
    return [n for n in names if not ((folder / n).is_dir() and n in _OWN_DIRS)
            and not ((folder / n).is_file() and _OWN_FILE.fullmatch(n))]


def _clip_name(path: Path) -> str:
    """The clip's part of an output's name: its file's stem, less the hash of a copy in ``inputs/``."""
    m = re.fullmatch(r"[0-9a-f]{16}-(.+)", path.stem)
    return slug(m.group(1) if m else path.stem, 24)


def release_memory() -> None:
    """Hand the memory a finished job freed back to the system: the edits run in their own threads,
    so glibc keeps what each freed in that thread's arena: without this a serving process grew from
    509 to 1037 MiB over 8 renders (tiny model, 8 frames at 128x128); with it, 570-580 MiB over 10."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        ctypes.CDLL(name).malloc_trim(0)


def _utc(t: float) -> str:
    """``t`` (seconds since the epoch) as UTC to the millisecond: 2026-01-31T12:00:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@dataclass
class _Stage:
    name: str
    total: int | None
    started: float
    done: int = 0


class RenderProgress:
    """:class:`~p2v_fast.progress.Progress` for one render, read from another thread: the stage,
    frames through it, elapsed time and time left, the log, and whether the inversion was a
    cache hit. ``advance`` raises :class:`Cancelled` once ``cancel`` is set."""

    def __init__(self, n_frames: int, cancel: threading.Event, clock: Callable[[], float] = time.monotonic) -> None:
        self.n_frames = max(n_frames, 1)
        self.cancel = cancel
        self.clock = clock
        self.started = clock()
        self.logs: list[str] = []
        self.cache_hit = False
        self._stage: _Stage | None = None
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled(CANCELLED)

    def stage(self, description: str, total: int | None) -> Callable[[int], None]:
        self._check()
        st = _Stage(description, total, self.clock())
        with self._lock:
            self._stage = st

        def advance(n: int = 1) -> None:
            self._check()
            with self._lock:
                st.done += n

        return advance

    def log(self, message: str) -> None:
        with self._lock:
            self.logs.append(_shorten(message))
            if message.startswith("inversion: cache hit"):
                self.cache_hit = True

    def line(self) -> str:
        """One line: e.g. ``edit: 2.5/4 frames (62%), 0:03 elapsed, about 0:02 left``."""
        with self._lock:
            st = self._stage
            done = 0 if st is None else st.done
        if st is None:
            return f"loading the models and the clip, {clock(self.clock() - self.started)} elapsed"
        elapsed = self.clock() - st.started
        if not st.total:
            return f"{st.name}: {done} done, {clock(elapsed)} elapsed"
        frames = min(done * self.n_frames / st.total, self.n_frames)
        text = (f"{st.name}: {frames:g}/{plural(self.n_frames, 'frame')} ({100 * done // st.total}%), "
                f"{clock(elapsed)} elapsed")
        if 0 < done < st.total:
            text += f", about {clock(elapsed * (st.total - done) / done)} left"
        return text

    def report(self, last: int = 6) -> str:
        """The progress line, the inversion's state, and the last log lines."""
        with self._lock:
            logs = self.logs[-last:]
        head = [self.line()] + (["inversion: cache hit (no inversion work)"] if self.cache_hit else [])
        return "\n".join(head + logs)


@dataclass
class RenderJob:
    """A render (or preview, or caption) running on the device thread."""

    kind: str
    progress: RenderProgress
    cancel: threading.Event
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def message(self) -> str:
        """The one line the page shows for a failed job (as the CLI prints it), or ''."""
        if self.error is None:
            return ""
        if isinstance(self.error, Cancelled):
            return CANCELLED
        from p2v_fast.apps.batch import failure_message

        return "error: " + failure_message(self.error)


@dataclass(frozen=True)
class UISettings:
    """What `p2v ui` fixes when it starts (the page never sets these)."""

    out_dir: Path = Path("p2v-ui")
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    engines_root: Path = Path("engines")
    threads: int | None = None
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    output_size: str = "input"  # the size renders are written at (p2v ui --output-size, as p2v edit's)
    # the devices renders run on, one render at a time on each; None: every GPU for --device auto
    # or cuda on a machine with several, else --device itself (see devices_for)
    devices: tuple[str, ...] | None = None


def devices_for(device: str) -> tuple[str, ...]:
    """The devices a page serving ``--device`` renders on: each GPU for ``auto`` or ``cuda`` when
    the machine has more than one, else ``device`` alone."""
    if device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    return (device,)


@dataclass
class RenderOutput:
    """A finished render's files and numbers."""

    video: Path
    side_by_side: Path | None
    strip: Path | None
    report: Path
    record: Path
    numbers: dict[str, Any]

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.video, self.side_by_side, self.strip, self.report) if p is not None]


NO_ENGINES = "(none)"


class Renderer:
    """One per process: the output folder, the loaded runtimes, and the devices, on each of
    which one job runs at a time (a job waits for a free one)."""

    def __init__(self, settings: UISettings) -> None:
        """InputError (one line, nothing made) if the output folder holds files the app did not
        make: the page's files are its only business there."""
        from p2v_fast.apps.batch import BatchWorker

        self.settings = settings
        self.out_dir = settings.out_dir.resolve()
        foreign = foreign_entries(self.out_dir)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise InputError(f"--out '{settings.out_dir}' holds files p2v ui did not make ('{foreign[0]}'{more}); "
                             f"give a new or empty folder")
        # what this process made, so a refused start can take it away again (discard)
        self._made = [p for p in (*reversed(self.out_dir.parents), self.out_dir, self.out_dir / "inputs",
                                  self.out_dir / "previews") if not p.exists()]
        for p in self._made:
            p.mkdir()
        if not (self.out_dir / MARKER).exists():
            (self.out_dir / MARKER).write_text("made by p2v ui: uploads, previews and renders\n")
            self._made.append(self.out_dir / MARKER)
        self._inputs_lock = threading.RLock()  # take_input takes it too, inside _kept_input
        self._inputs_used: Counter[Path] = Counter()  # inputs/ copies -> running renders that use them
        self._inputs_new: set[Path] = set()  # copies made here that no finished render names yet
        self.devices = settings.devices or devices_for(settings.device)
        # per device: its runtimes, one per model set, loaded on first use and kept
        self._workers = [BatchWorker() for _ in self.devices]
        self._loading = threading.Lock()
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(len(self.devices)):
            self._free.put(slot)
        self._names = threading.Lock()
        self._active: dict[str, RenderJob] = {}
        self._jobs = 0

    def discard(self) -> None:
        """Take away what :meth:`__init__` made (the folder skeleton, if still empty): for a start
        that was refused after it (a model that does not load, a port in use)."""
        for p in reversed(self._made):
            if p == self.out_dir:
                with contextlib.suppress(OSError):
                    (p / ".uploads").rmdir()  # Gradio's upload cache, if it made it already
            with contextlib.suppress(OSError):
                p.unlink() if p.name == MARKER else p.rmdir()

    # ---------------------------------------------------------------- inputs and options

    def sample_clip(self) -> Path:
        """The sample clip (``p2v demo``'s held-out scene, 16 frames with audio), made once in ``inputs/``."""
        from p2v_fast.apps.demo import CLIP_FPS, CLIP_SIZE, demo_scene
        from p2v_fast.media import scenes

        path = self.out_dir / "inputs" / "sample.mp4"
        if not path.is_file():
            clip = scenes.render_scene_clip(demo_scene().scene, 16, CLIP_SIZE)
            scenes.write_clip(clip, path, fps=CLIP_FPS, with_audio=True)
        return path

    def check_input(self, upload: str | Path | None) -> Path:
        """The clip a request names (the upload where Gradio keeps it, or the sample clip), checked;
        nothing is copied until a render starts (:meth:`take_input`)."""
        if upload is None or str(upload) == "":
            raise InputError("no clip: upload a video or press 'Use the sample clip'")
        src = Path(upload)
        if not src.is_file():
            raise InputError(f"the uploaded clip '{src.name}' is gone; upload it again")
        limit = self.settings.max_upload_mb * 1024 * 1024
        if src.stat().st_size > limit:
            raise InputError(f"the clip is {src.stat().st_size / 2**20:.0f} MB; this app takes at most "
                             f"{self.settings.max_upload_mb} MB (p2v ui --max-upload-mb)")
        return src

    def take_input(self, upload: str | Path | None) -> Path:
        """The clip to edit: an upload copied into ``inputs/`` under its content's hash (the
        upload's own name only as a slug), so a job record names a file the app keeps."""
        src = self.check_input(upload)
        inputs = self.out_dir / "inputs"
        if src.resolve().parent == inputs:
            return src.resolve()
        digest = hashlib.sha256()
        with open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        suffix = src.suffix.lower() if re.fullmatch(r"\.[a-z0-9]{1,5}", src.suffix.lower()) else ""
        dest = inputs / f"{digest.hexdigest()[:16]}-{slug(src.stem, 40)}{suffix}"
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
            try:
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            with self._inputs_lock:
                self._inputs_new.add(dest)
        return dest

    @contextlib.contextmanager
    def _kept_input(self, upload: Path) -> Iterator[Path]:
        """:meth:`take_input` for one render: the copy stays if a finished render names it (its job
        record does), and is removed when the last render using a copy made here fails."""
        with self._inputs_lock:
            kept = self.take_input(upload)
            self._inputs_used[kept] += 1
        done = False
        try:
            yield kept
            done = True
        finally:
            with self._inputs_lock:
                self._inputs_used[kept] -= 1
                if done:
                    self._inputs_new.discard(kept)
                elif self._inputs_used[kept] <= 0 and kept in self._inputs_new:
                    self._inputs_new.discard(kept)
                    kept.unlink(missing_ok=True)

    def engines_choices(self) -> list[str]:
        """The engines folders the page may pick: the engines root's subfolders (and the root
        itself if it holds files), by name."""
        root = self.settings.engines_root
        names = [NO_ENGINES]
        if root.is_dir():
            if any(p.is_file() for p in root.iterdir()):
                names.append(".")
            names += sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        return names

    def engines_path(self, name: str | None) -> Path | None:
        """The folder ``name`` (one of :meth:`engines_choices`) names; anything else is refused."""
        if not name or name == NO_ENGINES:
            return None
        if name not in self.engines_choices():
            raise InputError(f"engines folder {name!r} is not one of the folders in "
                             f"'{self.settings.engines_root}' (p2v ui --engines)")
        return self.settings.engines_root if name == "." else self.settings.engines_root / name

    def config(self, **form: Any) -> EditConfig:
        """The EditConfig of the page's form (checked by EditConfig, one-line errors); the
        model, device, dtype, threads and output size are the app's."""
        s = self.settings
        engines = self.engines_path(form.pop("engines", None))
        for key in ("prompt", "source_prompt"):
            if not isinstance(form.get(key) or "", str):
                raise InputError(f"the {key.replace('_', ' ')} must be text; got {_shorten(repr(form[key]), 60)}")
        source = (form.pop("source_prompt", None) or "").strip() or None
        # the whole numbers a widget sends; the API can send anything: refused as the CLI's parser does
        # (an empty Frames field is every frame, an empty Seed field the default seed)
        frames, seed = form.pop("max_frames", None), form.pop("seed", None)
        ints: dict[str, int] = {k: _whole(form[k], option) for k, option in _INTEGERS.items() if k in form}
        if seed is not None:
            ints["seed"] = _whole(seed, "--seed")
        for k, option in _NUMBERS.items():
            if k in form and not _is_number(form[k]):
                raise InputError(f"{option} must be a number; got {_shorten(repr(form[k]), 60)}")
        return EditConfig(**{**form, **ints}, source_prompt=source, engines=engines,
                          max_frames=_whole(frames, "--max-frames") or None if frames is not None else None,
                          model=s.model, device=s.device, dtype=s.dtype, threads=s.threads,
                          output_size=s.output_size)

    def frames_of(self, cfg: EditConfig, input_path: Path) -> int:
        """How many frames ``cfg`` edits of ``input_path``; a bad clip or selection is one line here,
        before any job starts."""
        from p2v_fast.media.clip_selection import select_clip
        from p2v_fast.pipeline import probe_input

        return select_clip(input_path, cfg, probe_input(input_path, cfg)).n_frames

    def on_device(self, cfg: EditConfig, slot: int) -> EditConfig:
        """``cfg`` on the device of ``slot``."""
        return cfg.replace(device=self.devices[slot])

    def runtime(self, cfg: EditConfig, slot: int = 0) -> Any:
        """The loaded models and backends for ``cfg`` on the device of ``slot``, loaded once per
        model set and device."""
        with self._loading:  # loading is not thread-safe (diffusers patches torch.nn globally while it builds a model)
            return self._workers[slot].runtime(self.on_device(cfg, slot))

    # ---------------------------------------------------------------- jobs

    def start(self, kind: str, session: str, n_frames: int, work: Callable[[RenderProgress, int], Any]) -> RenderJob:
        """Run ``work(progress, slot)`` in a thread once a device is free (``slot``: its index in
        :attr:`devices`) and return at once. A job of the same ``session`` still running is
        cancelled first."""
        cancel = threading.Event()
        job = RenderJob(kind, RenderProgress(n_frames, cancel), cancel)
        old = self._active.get(session)
        if old is not None and not old.done.is_set():
            old.cancel.set()
        self._active[session] = job

        def run() -> None:
            slot = None
            try:
                try:
                    slot = self._free.get_nowait()
                except queue.Empty:
                    job.progress.log("waiting for a free device (another render is running)")
                    while slot is None:
                        if cancel.is_set():
                            raise Cancelled(CANCELLED) from None
                        with contextlib.suppress(queue.Empty):
                            slot = self._free.get(timeout=0.2)
                try:
                    job.result = work(job.progress, slot)
                finally:
                    release_memory()
                    self._free.put(slot)
            except BaseException as exc:  # reported on the page as one line
                job.error = exc
                if not isinstance(exc, P2VError | Cancelled):
                    log.exception("%s failed", kind)
            finally:
                job.done.set()
                if self._active.get(session) is job:
                    del self._active[session]

        threading.Thread(target=run, name=f"p2v-ui-{kind}", daemon=True).start()
        return job

    def cancel(self, session: str) -> bool:
        """Cancel ``session``'s running job; False if it has none."""
        job = self._active.get(session)
        if job is None or job.done.is_set():
            return False
        job.cancel.set()
        return True

    def _names_for(self, input_path: Path, prompt: str) -> Path:
        """A fresh output path in the folder: ``<clip>.<prompt slug>.<time>[-N].mp4``, none of
        whose files (side files, report, job record) exist."""
        from p2v_fast.apps.batch import sidecar_path

        stem = f"{_clip_name(input_path)}.{slug(prompt, 32)}.{time.strftime('%Y%m%d-%H%M%S')}"
        with self._names:
            for n in range(1, 10_000):
                out = self.out_dir / f"{stem}{'' if n == 1 else f'-{n}'}.mp4"
                files = (out, out.with_name(f"{out.stem}.side-by-side.mp4"), out.with_name(f"{out.stem}.strip.png"),
                         out.with_suffix(".json"), sidecar_path(out), out.with_name(f".{out.name}.p2v-claim"))
                if not any(p.exists() for p in files):
                    out.with_suffix(".json").touch()  # reserved: a second render this second takes the next name
                    return out
        raise InputError(f"no free output name for '{stem}' in '{self.out_dir}'")

    def render(self, cfg: EditConfig, input_path: Path, progress: RenderProgress, slot: int = 0) -> RenderOutput:
        """Edit ``input_path`` on the device of ``slot`` into a new output in the folder, with the
        side-by-side video, the contact strip, the numbers and the job record."""
        from p2v_fast import edit_video
        from p2v_fast.apps.batch import Job, JobResult, sidecar_path, write_sidecar

        cfg = self.on_device(cfg, slot)
        rt = self.runtime(cfg, slot)
        started = time.time()
        with self._kept_input(input_path) as input_path:  # the copy in inputs/ that the job record names
            out = self._names_for(input_path, cfg.prompt)
            report = out.with_suffix(".json")
            try:
                res = edit_video(cfg, input_path, out, side_by_side=True, progress=progress, runtime=rt,
                                 json_path=report, overwrite=True)  # fresh names: only the report's reservation
            except BaseException:
                report.unlink(missing_ok=True)  # the reservation
                raise
            self._jobs += 1
            job = Job(self._jobs, input_path, out, cfg, {"side_by_side": True, "json_path": report}, res.n_frames)
            write_sidecar(job, JobResult.of(job, "done", frames=res.n_frames, seconds=res.seconds_total,
                                            frames_sha256=res.frames_sha256))
        numbers = {
            "seconds_per_frame": round(res.seconds_per_frame, 3), "unet_calls": res.stats.unet_calls,
            "unet_backward": res.stats.unet_backward, "inversion_cache_hit": res.inversion_cache_hit,
            "seconds_inversion": round(res.seconds_inversion, 3), "seconds_edit": round(res.seconds_edit, 3),
            "seconds_total": round(res.seconds_total, 3), "frames": res.n_frames, "size": list(res.size),
            "working_size": list(res.working_size),
            "source_prompt": res.source_prompt, "output": str(out),
            "device": str(rt.backend.device),
            "started": _utc(started), "finished": _utc(time.time()),
        }
        return RenderOutput(out, res.side_by_side, res.strip, report, sidecar_path(out), numbers)

    def preview(self, cfg: EditConfig, input_path: Path, progress: RenderProgress, slot: int = 0
                ) -> tuple[Path, float]:
        """The anchor frame alone, edited into ``previews/``; its path and seconds."""
        from p2v_fast import edit_video

        t0 = time.perf_counter()
        name = f"{_clip_name(input_path)}.{slug(cfg.prompt, 32)}.{time.strftime('%Y%m%d-%H%M%S')}"
        with self._names:
            out = next(p for n in range(1, 10_000)
                       if not (p := self.out_dir / "previews" / f"{name}{'' if n == 1 else f'-{n}'}.png").exists())
            out.touch()  # reserved
        try:
            edit_video(self.on_device(cfg, slot), input_path, out, preview=True, overwrite=True, progress=progress,
                       runtime=self.runtime(cfg, slot))
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        return out, time.perf_counter() - t0

    def caption(self, cfg: EditConfig, input_path: Path, progress: RenderProgress, slot: int = 0) -> str:
        """BLIP's caption of the first selected frame (what an empty source prompt becomes)."""
        from p2v_fast.media.clip_selection import select_clip
        from p2v_fast.weights.caption import caption_frame

        selection = select_clip(input_path, cfg)
        rt = self.runtime(cfg, slot)
        return caption_frame(rt.models, next(iter(selection.frames())))
