"""The paper's ablations on one clip: one table like Table 2, the videos and a contact sheet.

Settings (paper sec. 4 "Ablations" and Table 2):

=============  ===================  ===========  ==============
key            label                refs         latent update
=============  ===================  ===========  ==============
ours           ours                 anchor+prev  autograd (eq. 1)
no-update      w/o latent update    anchor+prev  off
anchor         anchor only          anchor       autograd
prev           previous only        prev         autograd
per-frame      per-frame            none         off
detached       ours (detached)      anchor+prev  detached (authors' code; not run by default)
all-layers     ours, all layers     anchor+prev  autograd, references in every self-attention
                                                 layer, not only the decoder's (Table 3; not
                                                 run by default)
=============  ===================  ===========  ==============

All settings share one loaded runtime and the inversion cache: the clip is inverted once (by the
first setting, or found in the cache) and each setting only pays for its edit; ``s/frame`` is the
edit time per frame, inversion excluded, as the paper reports it. Each edited video is then scored
with :func:`p2v_fast.quality.evaluate.evaluate_video` against the frames it was made from, exactly as
``p2v eval`` scores it.

Outputs in the folder: ``<key>.mp4`` per setting (and the edit's ``<key>.strip.png``),
``table.json``, ``table.md`` and ``contact_sheet.png`` (rows: source, then each setting;
columns: evenly spaced frames).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2v_fast.config import EditConfig
from p2v_fast.errors import InputError, one_line
from p2v_fast.files import write_json_atomic, write_text_atomic
from p2v_fast.media import reader, writer
from p2v_fast.progress import NullProgress, Progress
from p2v_fast.quality.evaluate import VideoEval, evaluate_video
from p2v_fast.quality.metrics import (
    DEFAULT_CLIP_MODEL,
    FLOW_METHODS,
    PAPER_TABLE2,
    ClipScorer,
    make_flow,
    paper_scores,
)
from p2v_fast.text import plural


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    refs: str
    latent_update: str
    inject: str = "decoder"  # config.INJECTIONS


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("ours", "ours", "anchor+prev", "autograd"),
        Setting("no-update", "w/o latent update", "anchor+prev", "off"),
        Setting("anchor", "anchor only", "anchor", "autograd"),
        Setting("prev", "previous only", "prev", "autograd"),
        Setting("per-frame", "per-frame", "none", "off"),
        Setting("detached", "ours (detached update)", "anchor+prev", "detached"),
        Setting("all-layers", "ours, all layers", "anchor+prev", "autograd", "all"),
    )
}
DEFAULT_SETTINGS: tuple[str, ...] = ("ours", "no-update", "anchor", "prev", "per-frame")

# Contact sheet geometry: each row is a label band of LABEL_H pixels above its frames; frames
# and rows are separated by GAP pixels.
LABEL_H = 16
GAP = 2
SHEET_FRAMES = 4
# Metric columns: key, header, whether higher is better.
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("clip_text", "CLIP-Text ↑", True),
    ("clip_image", "CLIP-Image ↑", True),
    ("pixel_mse", "Pixel-MSE ↓", False),
    ("seconds_per_frame", "s/frame ↓", False),
)


@dataclass(frozen=True)
class AblationRow:
    key: str
    label: str
    refs: str
    latent_update: str
    video: str
    clip_text: float
    clip_image: float
    pixel_mse: float
    masked_fraction: float
    seconds_per_frame: float
    unet_calls: int
    inversion_cache_hit: bool


@dataclass
class AblationResult:
    input: Path
    prompt: str
    source_prompt: str
    model: str
    size: tuple[int, int]
    n_frames: int
    steps: int
    clip_model: str
    flow: str
    out_dir: Path
    rows: list[AblationRow] = field(default_factory=list)
    table_json: Path | None = None
    table_md: Path | None = None
    contact_sheet: Path | None = None

    def best(self) -> dict[str, str]:
        """For each metric column, the key of the best row (ties: the first)."""
        out = {}
        for name, _, higher in METRICS:
            vals = [(getattr(r, name), r.key) for r in self.rows if math.isfinite(getattr(r, name))]
            if vals:
                out[name] = (max if higher else min)(vals, key=lambda v: v[0])[1]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": str(self.input),
            "prompt": self.prompt,
            "source_prompt": self.source_prompt,
            "model": self.model,
            "size": list(self.size),
            "n_frames": self.n_frames,
            "steps": self.steps,
            "clip_model": self.clip_model,
            "flow": self.flow,
            "rows": [asdict(r) for r in self.rows],
            "best": self.best(),
            "paper_table2_davis_512": PAPER_TABLE2,
        }


def parse_settings(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"ours,no-update"`` (or a list) -> validated keys in the given order; None: the paper's five."""
    if spec is None:
        return DEFAULT_SETTINGS
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    keys = tuple(k.strip() for k in items if k.strip())
    if not keys:
        raise InputError(f"--settings is empty; choose from {', '.join(SETTINGS)}")
    for k in keys:
        if k not in SETTINGS:
            raise InputError(f"unknown ablation setting {k!r}; choose from {', '.join(SETTINGS)}")
    if len(set(keys)) != len(keys):
        raise InputError(f"--settings names a setting twice: {','.join(keys)}")
    return keys


def sheet_indices(n_frames: int, columns: int = SHEET_FRAMES) -> list[int]:
    """``columns`` evenly spaced frame indices from first to last (fewer if the clip is shorter)."""
    if n_frames < 1 or columns < 1:
        return []
    return sorted(set(np.linspace(0, n_frames - 1, min(columns, n_frames)).round().astype(int).tolist()))


def sheet_size(n_rows: int, n_cols: int, frame_wh: tuple[int, int]) -> tuple[int, int]:
    """(W, H) of a contact sheet of ``n_rows`` labelled rows of ``n_cols`` frames of ``frame_wh``."""
    w, h = frame_wh
    return n_cols * w + (n_cols - 1) * GAP, n_rows * (LABEL_H + h) + (n_rows - 1) * GAP


def contact_sheet(rows: Sequence[tuple[str, Sequence[np.ndarray]]]) -> np.ndarray:
    """Rows of equally sized uint8 [H, W, 3] frames, each under a band with its label -> one image."""
    from PIL import Image, ImageDraw, ImageFont

    if not rows or not rows[0][1]:
        raise ValueError("contact sheet needs at least one row with one frame")
    h, w = rows[0][1][0].shape[:2]
    n_cols = max(len(frames) for _, frames in rows)
    sw, sh = sheet_size(len(rows), n_cols, (w, h))
    sheet = Image.new("RGB", (sw, sh), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    y = 0
    for label, frames in rows:
        draw.rectangle([0, y, sw - 1, y + LABEL_H - 1], fill=(32, 32, 32))
        draw.text((3, y + 2), label, fill=(255, 255, 255), font=font)
        for c, frame in enumerate(frames):
            if frame.shape[:2] != (h, w):
                raise ValueError(f"contact sheet frames differ in size: {frame.shape[:2]} vs {(h, w)}")
            sheet.paste(Image.fromarray(np.ascontiguousarray(frame)), (c * (w + GAP), y + LABEL_H))
        y += LABEL_H + h + GAP
    return np.asarray(sheet)


def format_metric(value: float, name: str) -> str:
    """A metric as the tables show it: 4 decimals for CLIP scores, 2 for Pixel-MSE and s/frame."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" if name in ("pixel_mse", "seconds_per_frame") else f"{value:.4f}"


def markdown_table(result: AblationResult) -> str:
    """The ablation as a Markdown table (best value per column in bold) with its provenance."""
    best = result.best()
    head = ["setting", "refs", "latent update", *(hdr for _, hdr, _ in METRICS)]
    lines = [
        f"# Pix2Video ablation: {result.input.name}",
        "",
        f"prompt {result.prompt!r}, source prompt {result.source_prompt!r}; model {result.model}, "
        f"{plural(result.n_frames, 'frame')} at {result.size[0]}x{result.size[1]}, "
        f"{plural(result.steps, 'DDIM step')}; "
        f"CLIP {result.clip_model}, flow {result.flow}. Pixel-MSE on the 0-255 scale; "
        "s/frame is edit time per frame, inversion excluded.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * len(METRICS)) + "|",
    ]
    for r in result.rows:
        cells = [r.label, r.refs, r.latent_update]
        for name, _, _ in METRICS:
            text = format_metric(getattr(r, name), name)
            cells.append(f"**{text}**" if best.get(name) == r.key else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Paper, Table 2 (DAVIS, 512x512, RAFT flow): ours {' / '.join(paper_scores('ours'))}; "
        f"w/o update {' / '.join(paper_scores('no-update'))} (CLIP-Text / CLIP-Image / Pixel-MSE).",
        "",
    ]
    return "\n".join(lines)


def output_paths(out_dir: Path, keys: Sequence[str]) -> dict[str, Path]:
    paths = {k: out_dir / f"{k}.mp4" for k in keys}
    paths.update(
        {
            "table.json": out_dir / "table.json",
            "table.md": out_dir / "table.md",
            "contact_sheet.png": out_dir / "contact_sheet.png",
        }
    )
    return paths


def default_out_dir(input_path: Path) -> Path:
    base = input_path.with_suffix("") if input_path.is_file() else input_path
    return base.parent / f"{base.name}.ablation"


def run_ablation(
    cfg: EditConfig,
    input_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    settings: Sequence[str] | str | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    flow: str = "dis",
    overwrite: bool = False,
    sheet_frames: int = SHEET_FRAMES,
    progress: Progress | None = None,
    runtime: Any = None,
    scorer: ClipScorer | None = None,
) -> AblationResult:
    """Edit ``input_path`` with ``cfg.prompt`` under each ablation setting and score every result.

    ``cfg`` carries everything but ``refs`` and ``latent_update``, which each setting sets.
    Everything the user can get wrong is checked before any model loads; the CLIP model loads
    before the first edit, so a bad ``clip_model`` fails in seconds, not after the edits.
    """
    progress = progress or NullProgress()
    input_path = Path(input_path)
    # 1. Check inputs: everything the user can get wrong, before any model loads
    plan = _check(cfg, input_path, out_dir, settings, flow, sheet_frames, overwrite)
    # 2. Load CLIP and the flow: a bad --clip-model or an unusable --flow fails here, in seconds, before any edit
    flow_fn = make_flow(flow)
    scorer = scorer or ClipScorer(clip_model)
    # 3. Load the models, once for every setting
    if runtime is None:
        runtime = _load_runtime(cfg, plan.settings)
    # 4. Open the output folder: only now, so a run that cannot start leaves no empty folder
    try:
        plan.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder '{plan.out}': {one_line(exc)}") from None
    # 5. Per setting: edit, evaluate, one row of the table and one of the contact sheet
    cols = sheet_indices(plan.n_frames, sheet_frames)
    result, sheet_rows = _run_settings(cfg, input_path, plan, cols, scorer, flow, flow_fn, progress, runtime)
    # 6. The contact sheet and the tables
    result.contact_sheet = writer.save_png(plan.paths["contact_sheet.png"], contact_sheet(sheet_rows))
    result.table_json = write_json_atomic(plan.paths["table.json"], result.to_dict())
    result.table_md = write_text_atomic(plan.paths["table.md"], markdown_table(result))
    return result


@dataclass(frozen=True)
class _Plan:
    """An ablation's checked inputs."""

    prompt: str
    settings: list[Setting]
    n_frames: int  # frames the selection holds
    out: Path
    paths: dict[str, Path]  # key -> output file (see :func:`output_paths`)


def _check(cfg: EditConfig, input_path: Path, out_dir: str | Path | None, settings: Sequence[str] | str | None,
           flow: str, sheet_frames: int, overwrite: bool) -> _Plan:
    """:func:`run_ablation`'s inputs checked (prompt, settings, flow, sheet, the input's
    selection, the output folder and its files), before any model loads."""
    from p2v_fast.pipeline import probe_input
    from p2v_fast.weights.downloads import check_downloads
    from p2v_fast.weights.prompts import check_prompt

    prompt = check_prompt(cfg.prompt)
    keys = parse_settings(settings)
    if flow not in FLOW_METHODS:
        raise InputError(f"--flow must be one of {', '.join(FLOW_METHODS)}; got {flow!r}")
    if sheet_frames < 1:
        raise InputError(f"--sheet-frames must be >= 1; got {sheet_frames}")
    info = probe_input(input_path, cfg)
    check_downloads(cfg.model, cfg.captioner, cfg.source_prompt)  # before CLIP and SD2 load
    n_sel = reader.selected_count(info, cfg.start, cfg.max_frames, cfg.stride)
    if n_sel < 2:
        raise InputError(f"an ablation needs at least 2 frames (temporal metrics); the selection has {n_sel}")
    out = Path(out_dir) if out_dir is not None else default_out_dir(input_path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file; give a folder")
    if input_path.is_dir() and out.resolve() == input_path.resolve():
        raise InputError(f"--out '{out}' is the input image folder (its outputs would be read as frames); "
                         "give another folder")
    paths = output_paths(out, keys)
    if not overwrite:
        existing = [p for p in paths.values() if p.exists()]
        if existing:
            raise InputError(f"'{existing[0]}' exists; pass --overwrite to replace the ablation in '{out}'")
    return _Plan(prompt, [SETTINGS[k] for k in keys], n_sel, out, paths)


def _load_runtime(cfg: EditConfig, settings: Sequence[Setting]) -> Any:
    """The models every setting's edit reuses: with a differentiable path if any setting's
    update is ``autograd``."""
    from p2v_fast.nets.runtime import load_runtime

    needs_grad = any(s.latent_update == "autograd" for s in settings)
    return load_runtime(cfg.replace(latent_update="autograd" if needs_grad else "off"))


def _run_settings(cfg: EditConfig, input_path: Path, plan: _Plan, cols: list[int], scorer: ClipScorer, flow: str,
                  flow_fn: Any, progress: Progress,
                  runtime: Any) -> tuple[AblationResult, list[tuple[str, list[np.ndarray]]]]:
    """Every setting's edit, scored: the result with one row per setting, and the contact
    sheet's rows (the source's frames at ``cols``, then each setting's)."""
    source_thumbs: dict[int, np.ndarray] = {}
    rows_thumbs: list[tuple[str, list[np.ndarray]]] = []
    result: AblationResult | None = None
    source_prompt = cfg.source_prompt
    for n, s in enumerate(plan.settings, 1):
        progress.log(f"[{n}/{len(plan.settings)}] {s.label}: refs {s.refs}, latent update {s.latent_update}")
        scfg = cfg.replace(refs=s.refs, latent_update=s.latent_update, inject=s.inject, source_prompt=source_prompt)
        res, row, thumbs = _run_setting(scfg, s, input_path, plan, cols, source_thumbs, scorer, flow, flow_fn,
                                        progress, runtime)
        source_prompt = res.source_prompt  # caption once; later settings reuse it (same inversion key)
        if result is None:
            result = AblationResult(
                input=input_path, prompt=plan.prompt, source_prompt=res.source_prompt, model=cfg.model,
                size=res.size, n_frames=res.n_frames, steps=cfg.steps, clip_model=scorer.name, flow=flow,
                out_dir=plan.out)
        result.rows.append(row)
        rows_thumbs.append((s.label, thumbs))
    assert result is not None  # keys is never empty
    return result, [("source", [source_thumbs[i] for i in cols]), *rows_thumbs]


def _run_setting(scfg: EditConfig, s: Setting, input_path: Path, plan: _Plan, cols: list[int],
                 source_thumbs: dict[int, np.ndarray], scorer: ClipScorer, flow: str, flow_fn: Any,
                 progress: Progress, runtime: Any) -> tuple[Any, AblationRow, list[np.ndarray]]:
    """Edit with one setting's ``scfg`` and score the result: the edit, its row, and its
    thumbnails at ``cols`` (the source's are kept in ``source_thumbs`` on first sight)."""
    from p2v_fast.pipeline import edit_video

    res = edit_video(scfg, input_path, plan.paths[s.key], overwrite=True, progress=progress, runtime=runtime)
    thumbs: dict[int, np.ndarray] = {}

    def keep(i: int, edited: np.ndarray, source: np.ndarray) -> None:
        if i in cols:
            thumbs[i] = edited
            source_thumbs.setdefault(i, source)

    ev: VideoEval = evaluate_video(
        res.output, input_path, plan.prompt, scorer=scorer, flow=flow, start=scfg.start,
        max_frames=scfg.max_frames, stride=scfg.stride, resize=scfg.resize, progress=progress, on_frame=keep,
        flow_fn=flow_fn,
    )
    row = AblationRow(
        key=s.key, label=s.label, refs=s.refs, latent_update=s.latent_update, video=str(res.output),
        clip_text=ev.clip_text, clip_image=ev.clip_image, pixel_mse=ev.pixel_mse,
        masked_fraction=ev.masked_fraction, seconds_per_frame=res.seconds_per_frame,
        unet_calls=res.stats.unet_calls, inversion_cache_hit=res.inversion_cache_hit,
    )
    progress.log(
        f"{s.label}: CLIP-Text {format_metric(row.clip_text, 'clip_text')}, "
        f"CLIP-Image {format_metric(row.clip_image, 'clip_image')}, "
        f"Pixel-MSE {format_metric(row.pixel_mse, 'pixel_mse')}, "
        f"{row.seconds_per_frame:.2f} s/frame"
    )
    return res, row, [thumbs[i] for i in cols]
