"""The method's effect, measured on held-out scene clips with ground truth (trained model ``mini``).

For each held-out seed (never used in training) a scene clip is rendered, one object's colour
word is changed in its caption (the source prompt is the true caption, the target the caption of
the recoloured scene), and the clip is edited under each setting of the paper's ablation. Each
edit is judged against the truth by :mod:`p2v_fast.quality.scene_truth`: edit accuracy, the other
objects kept, the true-flow warp error, object IoU and the depth estimator's error on the edit;
beside them the estimated-flow Pixel-MSE (DIS) and CLIP-Text (target minus source prompt, with
the model's own CLIP where it has one).

    python -m benchmarks.scene_quality --model mini --clips 8 --frames 16 --out benchmarks/results/X.json

Settings (``--settings``, comma-separated): per-frame (``--refs none --latent-update off``),
prev, anchor, ours (anchor+prev, the default update), no-update, detached, autograd. Timing is
secondary here (the run uses one thread), but each setting's edit seconds per clip are kept
(``seconds_edit``: the edit alone; the clip's first setting also pays its inversion, in
``seconds``), so one run compares the update forms on the same clips:

    python -m benchmarks.scene_quality --settings autograd,detached --clips 6 --frames 16 --out X.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

#: Held-out scene seeds start here; training renders seeds from training.data.TRAIN_SEED0 (1,000,000) up.
HELD_OUT_BASE = 900_000

#: key -> (refs, latent_update); latent_update None means the EditConfig default.
SETTINGS: dict[str, tuple[str, str | None]] = {
    "per-frame": ("none", "off"),
    "prev": ("prev", None),
    "anchor": ("anchor", None),
    "ours": ("anchor+prev", None),
    "no-update": ("anchor+prev", "off"),
    "detached": ("anchor+prev", "detached"),
    "autograd": ("anchor+prev", "autograd"),
    "all-layers": ("anchor+prev", None),
}
#: settings whose references go to other self-attention layers than the decoder's (--inject)
INJECT: dict[str, str] = {"all-layers": "all"}
COLUMNS = ("edit_accuracy", "others_kept", "warp_error", "pixel_mse_dis", "object_iou", "depth_error", "clip_text_gain",
           "seconds_edit")


def scene_edit_case(seed: int, n_frames: int, size: int) -> dict[str, Any]:
    """The clip of ``seed``, and its edit: object 1 recoloured to a colour chosen by the seed."""
    from p2v_fast.media import scenes

    clip = scenes.render_clip(seed, n_frames, (size, size))
    rng = np.random.default_rng(seed + 1)
    source = clip.scene.objects[0].colour
    target = str(rng.choice([c for c in scenes.COLOURS if c != source]))
    return {
        "clip": clip,
        "seed": seed,
        "source_prompt": clip.caption,
        "target_prompt": scenes.caption_of(scenes.with_colour(clip.scene, 0, target)),
        "source_colour": source,
        "target_colour": target,
        "others": {i + 1: o.colour for i, o in enumerate(clip.scene.objects) if i > 0},
    }


def depth_fn(models: Any):
    """Frames [T, H, W, 3] -> the model's relative inverse depth at full resolution [T, H, W]."""
    from p2v_fast.quality.scene_truth import dpt_depth_fn

    return dpt_depth_fn(models.depth_estimator, models.feature_extractor, models.device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from p2v_fast.config import EditConfig
    from p2v_fast.media import reader, scenes
    from p2v_fast.nets.runtime import load_runtime
    from p2v_fast.pipeline import edit_video
    from p2v_fast.quality.metrics import ClipScorer, clip_text_score, make_flow, pixel_mse
    from p2v_fast.quality.scene_truth import flow_epe, score_scene_edit

    torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.settings.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SETTINGS]
    if unknown:
        raise SystemExit(f"error: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    base = EditConfig(prompt="x", model=args.model, size=args.size, steps=args.steps, threads=args.threads,
                      guidance_scale=args.guidance_scale, latent_update="autograd")
    rt = load_runtime(base)
    dfn = depth_fn(rt.models)
    try:
        scorer: Any = ClipScorer(args.clip_model)
    except Exception as e:  # a model without its own CLIP: the column stays empty, said in the record
        print(f"CLIP-Text skipped: {e}", file=sys.stderr)
        scorer = None
    dis = make_flow("dis")
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="p2v-scene-quality-"))
    t_start = time.perf_counter()
    for i in range(args.clips):
        case = scene_edit_case(args.seed_base + i, args.frames, args.size)
        clip = case["clip"]
        src_path = scenes.write_clip(clip, work / f"clip{i}")  # PNG folder: lossless input
        epe = flow_epe(clip.frames, clip.flow, clip.occluded, dis)
        for key in keys:
            refs, update = SETTINGS[key]
            cfg = base.replace(prompt=case["target_prompt"], source_prompt=case["source_prompt"], refs=refs,
                               latent_update=update or EditConfig.latent_update, seed=args.seed,
                               inject=INJECT.get(key, "decoder"))
            t0 = time.perf_counter()
            out = edit_video(cfg, src_path, work / f"clip{i}_{key}.mp4", overwrite=True, runtime=rt)
            seconds = time.perf_counter() - t0
            edited = np.stack(list(reader.read_frames(out.output)))
            score = score_scene_edit(edited, clip.frames, clip.ids, clip.flow, clip.occluded, clip.depth, 1,
                                     case["source_colour"], case["target_colour"], case["others"], dfn)
            gain = float("nan")
            if scorer is not None:
                gain = (clip_text_score(scorer, list(edited), case["target_prompt"])
                        - clip_text_score(scorer, list(edited), case["source_prompt"]))
            row = {"clip": i, "seed": case["seed"], "setting": key, "refs": refs, "latent_update": cfg.latent_update,
                   "source_prompt": case["source_prompt"], "target_prompt": case["target_prompt"],
                   **asdict(score), "pixel_mse_dis": pixel_mse(list(edited), list(clip.frames), "dis").mse,
                   "flow_epe_dis": epe, "clip_text_gain": gain, "seconds": seconds, "seconds_edit": out.seconds_edit}
            rows.append(row)
            print(f"clip {i} {key:10s} acc {score.edit_accuracy:.2f} kept {score.others_kept:.2f} "
                  f"warp {score.warp_error:.1f} (source {score.source_warp_error:.1f}) {seconds:.1f} s "
                  f"(edit {out.seconds_edit:.1f} s)", flush=True)
    summary = summarize(rows, keys)
    return {
        "benchmark": "scene_quality",
        "model": args.model,
        "clip_model": args.clip_model,
        "clips": args.clips,
        "frames": args.frames,
        "size": args.size,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed_base": args.seed_base,
        "threads": args.threads,
        "seconds": time.perf_counter() - t_start,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": sys.version.split()[0], "torch": torch.__version__},
        "commit": _commit(),
        "summary": summary,
        "rows": rows,
    }


def summarize(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, float]]:
    """Per setting, the mean over its clips of every column (edit seconds included)."""
    columns = (*COLUMNS, "source_warp_error", "source_depth_error", "flow_epe_dis")
    return {k: {c: _mean([r[c] for r in rows if r["setting"] == k]) for c in columns} for k in keys}


def _mean(xs: list[float]) -> float:
    finite = [x for x in xs if isinstance(x, float | int) and math.isfinite(x)]
    return float(np.mean(finite)) if finite else float("nan")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def markdown(result: dict[str, Any]) -> str:
    head = ("| setting | edit accuracy ↑ | others kept ↑ | warp error (true flow) ↓ | Pixel-MSE (DIS) ↓ "
            "| object IoU ↑ | depth AbsRel ↓ | CLIP-Text gain ↑ | edit s/clip |")
    lines = [head, "|" + " --- |" * 9]
    for key, s in result["summary"].items():
        lines.append(f"| {key} | {s['edit_accuracy']:.3f} | {s['others_kept']:.3f} | {s['warp_error']:.1f} "
                     f"| {s['pixel_mse_dis']:.1f} | {s['object_iou']:.3f} | {s['depth_error']:.3f} "
                     f"| {s['clip_text_gain']:.4f} | {s.get('seconds_edit', float('nan')):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mini")
    p.add_argument("--clip-model", default="mini")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-base", type=int, default=HELD_OUT_BASE)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--settings", default="per-frame,prev,anchor,ours,no-update,detached")
    p.add_argument("--out", type=Path, required=True, help="the JSON record to write")
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; choose another --out", file=sys.stderr)
        return 1
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
