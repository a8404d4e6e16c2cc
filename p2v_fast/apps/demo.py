"""`p2v demo`: the whole pipeline offline, on a sample clip and the tiny random-weight model."""

from __future__ import annotations

from pathlib import Path

from p2v_fast.config import EditConfig
from p2v_fast.errors import InputError
from p2v_fast.pipeline import EditResult, edit_video
from p2v_fast.progress import NullProgress, Progress
from p2v_fast.text import plural

PROMPT = "a crochet swan on the lake"
SOURCE_PROMPT = "a sample clip"
CLIP_SIZE = (256, 192)  # (W, H) of the sample clip
CLIP_FPS = 12.0
#: Most frames the sample clip may have (83 s at 12 fps; the tiny model edits it in minutes, not days).
MAX_DEMO_FRAMES = 1_000


def demo_config(size: int = 128, steps: int = 50, threads: int | None = None) -> EditConfig:
    """The demo's edit: the tiny model (random weights, no downloads), a fixed source prompt."""
    return EditConfig(prompt=PROMPT, model="tiny", size=size, steps=steps, source_prompt=SOURCE_PROMPT,
                      threads=threads)


def run_demo(out: Path, cfg: EditConfig, frames: int = 16, progress: Progress | None = None,
             json_path: str | Path | None = None) -> EditResult:
    """Write ``out/sample.mp4`` (``frames`` frames with audio; kept when it exists) and edit it into
    ``out/sample.p2v.mp4`` with its side-by-side and strip (replaced on every run); ``json_path``
    as :func:`edit_video`'s."""
    progress = progress or NullProgress()
    if frames < 1:
        raise InputError(f"--frames must be >= 1; got {frames}")
    if frames > MAX_DEMO_FRAMES:
        raise InputError(f"--frames must be at most {MAX_DEMO_FRAMES} for the demo's sample clip; got {frames}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    clip = out / "sample.mp4"
    if not clip.exists():
        from p2v_fast.media import samples
        progress.log(f"writing the sample clip {clip} ({plural(frames, 'frame')}, with audio)")
        samples.make_sample_clip(clip, n_frames=frames, size=CLIP_SIZE, fps=CLIP_FPS, with_audio=True)
    progress.log(f"sample clip: {clip} ({plural(frames, 'frame')}, with audio)")
    return edit_video(cfg, clip, out / "sample.p2v.mp4", overwrite=True, side_by_side=True, progress=progress,
                      json_path=json_path)
