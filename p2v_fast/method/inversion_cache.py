"""The inversion cache: one entry per (frames, size, framing, model, runtime, steps, source
prompt, depth normalisation), under ``<cache>/inversions/<key>/``.

An entry holds one safetensors file per frame (``x_T``, ``depth``, ``x_0``; written atomically,
so an interrupted run resumes where it stopped) and ``meta.json``, written last, which records
each frame file's size and sha256. An entry is checked before it is used (frame count, sizes,
checksums; a resumed frame's shapes and finite values); a damaged one is recomputed with a
one-line notice, reusing its intact frames. One run at a time fills an entry (a lock file in
it): a second run of the same clip waits, then uses the result. Non-finite values are never
cached.

A preview (``p2v edit --preview``, the UI's Preview) inverts frame 1 alone: an entry of one frame,
whose key differs from the full clip's (the key holds the frames' digest). The full edit that
follows takes frame 1 from it (:func:`reuse_preview_frame`) and inverts only the others: with
``--depth-norm frame`` (the default) a frame's inversion depends on that frame alone. With
``--depth-norm clip`` frame 1's depth is scaled by the whole clip's range, so the preview's frame
is not the full edit's and is not reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save

from p2v_fast.config import EditConfig
from p2v_fast.errors import OutputError, P2VError, one_line
from p2v_fast.files import FileLock, write_bytes_atomic
from p2v_fast.media.clip_selection import ClipSelection, frames_digest
from p2v_fast.progress import Progress
from p2v_fast.text import plural
from p2v_fast.weights.models import model_identity

CACHE_VERSION = 2  # 2: keyed on the runtime (backend, dtype, device, graphs) and the framing


@dataclass
class InvertedClip:
    """Handle on a cached inversion; frames are loaded one at a time. ``runtime``: the
    :meth:`Backend.identity` it ran on; ``reconstruction``: :func:`reconstruction_error` of it
    (None for an inversion run without the check, e.g. the benchmark's timed runs)."""

    root: Path
    n_frames: int
    latent_hw: tuple[int, int]
    source_prompt: str
    cache_hit: bool
    runtime: dict[str, str] = field(default_factory=dict)
    reconstruction: dict[str, float | None] | None = None

    def load(self, i: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Frame i: ``x_T`` [1,4,h,w], ``depth`` [1,1,h,w] in [-1,1], ``x_0`` [1,4,h,w] (fp32)."""
        path = frame_file(self.root, i)
        try:
            return load_file(path, device=str(device))
        except Exception as exc:  # deleted or damaged after the entry was checked
            raise P2VError(f"inversion cache file '{path}' became unreadable during the edit ({one_line(exc)}); "
                           "run again to recompute it") from None


def frame_file(root: Path, i: int) -> Path:
    """Frame ``i``'s finished file in entry ``root``: ``x_T``, ``depth``, ``x_0``."""
    return root / f"frame_{i:06d}.safetensors"


def encoded_file(root: Path, i: int) -> Path:
    """Frame ``i``'s pass-1 file (VAE latent and raw depth), removed once the entry is recorded."""
    return root / f"encoded_{i:06d}.safetensors"


def recorded_reconstruction(root: Path) -> dict[str, float | None] | None:
    """The reconstruction error a complete entry's ``meta.json`` records (None: not measured)."""
    return json.loads((root / "meta.json").read_text()).get("reconstruction")


def record_entry(clip: InvertedClip, cfg: EditConfig, models, selection: ClipSelection) -> None:
    """Finish entry ``clip.root``: ``meta.json``, written last (what the entry holds, and each
    frame file's size and sha256, which :func:`entry_problems` checks), then the pass-1 files
    removed."""
    root, n = clip.root, clip.n_frames
    meta = {"n_frames": n, "latent_hw": list(clip.latent_hw), "source_prompt": clip.source_prompt,
            "steps": cfg.steps, "model": model_identity(models), "size": list(selection.size),
            "resize": selection.resize, "box": None if selection.box is None else list(selection.box),
            "depth_norm": cfg.depth_norm, "timestep_grid": cfg.timestep_grid,
            "runtime": clip.runtime, "reconstruction": clip.reconstruction}
    meta["files"] = {frame_file(root, i).name: file_record(frame_file(root, i)) for i in range(n)}
    write_bytes_atomic(root / "meta.json", json.dumps(meta, indent=2).encode(), "the inversion cache")
    for i in range(n):
        encoded_file(root, i).unlink(missing_ok=True)


def save_frame_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one cache file atomically; refuse non-finite values (they would poison every later edit)."""
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise P2VError(f"the inversion produced non-finite values (NaN or inf) in {', '.join(bad)} for "
                       f"'{path.name}'; nothing was cached for it (in fp16, try --dtype fp32)")
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    write_bytes_atomic(path, data, "the inversion cache")


#: Tensors of a finished frame file and of a pass-1 ``encoded_*`` file: name -> shape, with
#: "h" and "w" the latent size.
FRAME_TENSORS = {"x_T": (1, 4, "h", "w"), "depth": (1, 1, "h", "w"), "x_0": (1, 4, "h", "w")}


ENCODED_TENSORS = {"x_0": (1, 4, "h", "w"), "depth_raw": (1, "h", "w")}


def file_problem(path: Path, latent_hw: tuple[int, int], spec: dict[str, tuple] | None = None,
                 data: bytes | None = None) -> str | None:
    """What is wrong with one cache file (None: it loads, has ``spec``'s tensors and shapes, all
    finite); ``data``: its bytes, when already read."""
    spec = FRAME_TENSORS if spec is None else spec
    if data is None and not path.is_file():
        return "missing"
    try:
        tensors = load_file(path) if data is None else load(data)
    except Exception as exc:
        return f"unreadable ({one_line(exc)})"
    h, w = latent_hw
    for name, shape in spec.items():
        want = tuple(h if d == "h" else w if d == "w" else d for d in shape)
        t = tensors.get(name)
        if t is None:
            return f"no {name}"
        if tuple(t.shape) != want:
            return f"{name} has shape {list(t.shape)}, expected {list(want)}"
        if not bool(torch.isfinite(t).all()):
            return f"non-finite values in {name}"
    return None


def file_record(path: Path) -> dict[str, int | str]:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _meta_problem(meta: object, n: int, latent_hw: tuple[int, int]) -> str | None:
    """What is wrong with a parsed ``meta.json`` (its shape, then whether it describes ``n``
    frames at ``latent_hw``); None: usable. Every malformed value is a damaged entry, never an
    exception (``[]``, ``"files": "x"``, ``"n_frames": 1e400``, ...)."""
    if not isinstance(meta, dict):
        return f"malformed meta.json (a {type(meta).__name__}, not an object)"
    frames, hw, files = meta.get("n_frames"), meta.get("latent_hw"), meta.get("files")
    if not isinstance(frames, int) or isinstance(frames, bool):
        return f"malformed meta.json (n_frames is {frames!r:.40})"
    if not (isinstance(hw, list) and len(hw) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in hw)):
        return f"malformed meta.json (latent_hw is {hw!r:.40})"
    if files is not None and not isinstance(files, dict):
        return f"malformed meta.json (files is {files!r:.40})"
    if frames != n or hw != list(latent_hw):
        return f"it describes {plural(frames, 'frame')} at latent size {hw}, not {n} at {list(latent_hw)}"
    return None


def _record_problem(path: Path, record: object, latent_hw: tuple[int, int]) -> str | None:
    """A recorded frame file against its record (size, sha256), then its contents: a record
    rewritten to match a damaged file (NaN in it) does not make the file usable."""
    if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
            and isinstance(record.get("sha256"), str)):
        return f"malformed record in meta.json ({record!r:.40})"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable ({one_line(exc)})"
    got = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if got != record:
        want = record.get("bytes") if isinstance(record, dict) else None
        return f"{got['bytes']} bytes, expected {want}" if got["bytes"] != want else "checksum mismatch"
    return file_problem(path, latent_hw, data=data)


def entry_problems(root: Path, n: int, latent_hw: tuple[int, int]) -> tuple[str | None, list[Path]]:
    """Check a cache entry: ``(None, [])`` if complete and intact, else a one-line description of
    the first problem ("missing" when there is no entry) and the frame files that are damaged.

    Checked: ``meta.json`` reads and describes ``n`` frames at ``latent_hw``; every frame file has
    the size and sha256 recorded there (entries without records: loads, shapes, finite values).
    """
    meta_path = root / "meta.json"
    if root.exists() and not root.is_dir():
        return "not a folder", []
    if not meta_path.exists():
        return "missing", []
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:  # a folder, unreadable, not JSON
        return f"unreadable meta.json ({one_line(exc)})", []
    problem = _meta_problem(meta, n, latent_hw)
    if problem is not None:
        return problem, []
    records = meta.get("files") or {}
    damaged: list[tuple[Path, str]] = []
    for i in range(n):
        path = frame_file(root, i)
        record = records.get(path.name)
        if record is None:
            why = file_problem(path, latent_hw)
        elif not path.is_file():
            why = "missing" if not path.exists() else "not a file"
        else:
            why = _record_problem(path, record, latent_hw)
        if why is not None:
            damaged.append((path, f"frame {i}: {why}"))
    if damaged:
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        return damaged[0][1] + more, [p for p, _ in damaged]
    return None, []


def claim_entry(root: Path, n: int, latent_hw: tuple[int, int], progress: Progress) -> FileLock | None:
    """None if ``root`` holds a complete, intact inversion (a cache hit). Otherwise the entry's
    lock, held (waiting while another run fills the entry, whose result may then be a hit), with
    a damaged entry's ``meta.json`` and damaged frame files removed (intact frames are reused)."""
    problem, _ = entry_problems(root, n, latent_hw)
    if problem is None:
        return None
    if problem == "not a folder":  # in the cache's own namespace: debris, replaced
        progress.log(f"inversion: cache entry {root.name} is not a folder; recomputing it")
        _remove(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only cache, a cache folder that is a file, ...
        raise OutputError(f"cannot write the inversion cache under '{root.parent.parent}': {one_line(exc)}; set "
                          "P2V_CACHE (or cache_dir) to a writable folder") from None
    lock = FileLock(root / ".lock")
    lock.acquire(on_wait=lambda: progress.log("inversion: waiting for another p2v run that is inverting this clip"))
    problem, damaged = entry_problems(root, n, latent_hw)
    if problem is None:
        lock.release()
        return None
    if problem != "missing":
        progress.log(f"inversion: cache entry {root.name} is damaged ({problem}); recomputing it")
        for path in (root / "meta.json", *damaged):
            _remove(path)
    return lock


def _remove(path: Path) -> None:
    """Remove a damaged cache file, or a folder where a file belongs (and vice versa); a link is
    removed, never followed."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot replace the damaged inversion cache file '{path}': {one_line(exc)}") from None


def cache_key(cfg: EditConfig, models, digest: str, source_prompt: str, runtime: dict[str, str],
              selection: ClipSelection | None = None) -> str:
    """Key of an inversion: everything that changes the inverted latents."""
    fields = {
        "version": CACHE_VERSION,
        "frames": digest,  # content of the selected working frames, their size and framing
        "framing": None if selection is None else [list(selection.size), selection.resize, selection.box],
        "model": model_identity(models),
        "runtime": runtime,  # backend, dtype computed in, device (+ graphs / provider)
        "steps": cfg.steps,
        "source_prompt": source_prompt,
        "depth_norm": cfg.depth_norm,
    }
    if cfg.timestep_grid != "model":  # keys of the default grid stay as they were
        fields["timestep_grid"] = cfg.timestep_grid
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def reuse_preview_frame(cfg: EditConfig, models, selection: ClipSelection, clip: InvertedClip,
                        progress: Progress) -> None:
    """Entry ``clip.root`` (locked, being filled for ``selection``) takes frame 1 from the entry of
    frame 1 alone, as a preview of the same clip, size, framing, model, runtime, steps and source
    prompt wrote it, when that entry is whole and the depth is normalised per frame; ``clip``
    takes the preview's recorded reconstruction error with it (measured on frame 1: the same x_T)."""
    first, n = frame_file(clip.root, 0), selection.n_frames
    if n < 2 or cfg.depth_norm != "frame" or file_problem(first, selection.latent_hw) is None:
        return
    alone = replace(selection, max_frames=1, n_frames=1)
    preview = clip.root.parent / cache_key(cfg, models, frames_digest(alone), clip.source_prompt, clip.runtime, alone)
    if entry_problems(preview, 1, selection.latent_hw)[0] is not None:
        return
    write_bytes_atomic(first, frame_file(preview, 0).read_bytes(), "the inversion cache")
    clip.reconstruction = recorded_reconstruction(preview)
    progress.log(f"inversion: frame 1 from the preview's cache entry {preview.name}; inverting the other "
                 f"{plural(n - 1, 'frame')}")
