"""`p2v demo`: the whole pipeline offline, a real edit: a rendered scene clip (with audio) whose
object changes colour, edited by ``mini``, the small pipeline this project trained itself.

``mini`` (p2v_fast/weights/mini, docs/mini.md) has SD2-depth's architectures at a small width and
was trained only on procedurally rendered scenes (p2v_fast.media.scenes): it edits such scenes,
not real footage. The demo's scene is held out (its seed is below every training seed), and the
edit changes one colour word of the scene's true caption, so the result can be judged against
the scene's ground truth (``p2v eval`` reads the sidecar written beside the clip).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from p2v_fast.config import EditConfig
from p2v_fast.errors import InputError
from p2v_fast.media import scenes
from p2v_fast.media.paths import EditPaths, check_report_path
from p2v_fast.progress import NullProgress, Progress
from p2v_fast.text import plural

if TYPE_CHECKING:
    from p2v_fast.pipeline import EditResult

MODEL = "mini"
#: The held-out scene (training renders seeds from 1,000,000 up): the first seed from 900,000 whose
#: scene has one object, at least 0.5 in size, on a checkered floor (a rule on the scene, chosen
#: before any edit was seen; tests/test_demo.py checks it).
SCENE_SEED = 900_027
SCENE_DESIGN_FRAMES = 16  # the scene's motion is laid out over this many frames
CLIP_SIZE = (64, 64)  # (W, H): mini's training size
CLIP_FPS = 12.0
#: Most frames the sample clip may have (83 s at 12 fps; the demo edits it in minutes, not days).
MAX_DEMO_FRAMES = 1_000


@dataclass(frozen=True)
class DemoScene:
    scene: scenes.Scene
    source_prompt: str  # the scene's true caption
    prompt: str  # the caption with the object's colour word changed
    source_colour: str
    target_colour: str


def opposite_colour(colour: str) -> str:
    """The palette colour whose hue is farthest from ``colour``'s (red -> cyan, blue -> yellow)."""
    from p2v_fast.quality.scene_truth import PALETTE_HUES

    def gap(name: str) -> float:
        return abs((PALETTE_HUES[name] - PALETTE_HUES[colour] + 180) % 360 - 180)

    return max((c for c in scenes.COLOURS if c != colour), key=gap)


def demo_scene(seed: int = SCENE_SEED) -> DemoScene:
    """The demo's scene and its edit: the object's colour to the palette's opposite hue."""
    scene = scenes.random_scene(np.random.default_rng(seed), SCENE_DESIGN_FRAMES)
    source = scene.objects[0].colour
    target = opposite_colour(source)
    return DemoScene(scene, scenes.caption_of(scene), scenes.caption_of(scenes.with_colour(scene, 0, target)),
                     source, target)


def demo_config(size: int = CLIP_SIZE[0], steps: int = 50, threads: int | None = None,
                model: str = MODEL, output_size: str = "input") -> EditConfig:
    """The demo's edit: ``mini`` (trained, shipped, no downloads), the scene's true caption as
    the source prompt, one colour word changed in the target; written at the clip's size
    (``output_size``: as ``p2v edit --output-size``)."""
    ds = demo_scene()
    return EditConfig(prompt=ds.prompt, model=model, size=size, steps=steps, source_prompt=ds.source_prompt,
                      threads=threads, output_size=output_size)


def check_frames(frames: int) -> None:
    if frames < 1:
        raise InputError(f"--frames must be >= 1; got {frames}")
    if frames > MAX_DEMO_FRAMES:
        raise InputError(f"--frames must be at most {MAX_DEMO_FRAMES} for the demo's sample clip; got {frames}")


def run_demo(out: Path, cfg: EditConfig, frames: int = 16, progress: Progress | None = None,
             json_path: str | Path | None = None, overwrite: bool = False) -> EditResult:
    """Write ``out/scene.mp4`` (``frames`` frames with audio, its ground truth beside it as
    ``scene.npz``/``scene.json``; kept when it exists) and edit it into ``out/scene.p2v.mp4`` with
    its side-by-side and strip, and ``json_path`` as :func:`edit_video`'s: as ``p2v edit``, an
    existing edit or report is replaced only with ``overwrite`` (refused before any work)."""
    progress = progress or NullProgress()
    check_frames(frames)
    n = plural(frames, "frame")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file, not a folder")
    clip, edit = out / "scene.mp4", out / "scene.p2v.mp4"
    check_report_path(json_path, clip, overwrite=overwrite)
    EditPaths.of(clip, edit, side_by_side=True, json_path=json_path).check(clip, overwrite, create_folders=True)
    out.mkdir(parents=True, exist_ok=True)
    ds = demo_scene()
    if not clip.exists():
        progress.log(f"rendering the scene clip {clip} ({n}, with audio)")
        scenes.write_clip(scenes.render_scene_clip(ds.scene, frames, CLIP_SIZE), clip, fps=CLIP_FPS,
                          with_audio=True)
    progress.log(f"scene clip: {clip} ({n}, with audio; a held-out scene)")
    progress.log(f"edit on '{cfg.model}': '{ds.source_prompt}' -> '{ds.prompt}'")
    from p2v_fast.pipeline import edit_video  # torch: after the checks (`p2v demo --size 100` refuses at once)

    return edit_video(cfg, clip, edit, overwrite=overwrite, side_by_side=True, progress=progress,
                      json_path=json_path)
