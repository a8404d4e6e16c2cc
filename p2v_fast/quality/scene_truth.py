"""Quality measured against a scene clip's ground truth (p2v_fast.media.scenes).

A rendered scene clip knows what a real clip cannot tell: each object's mask and colour, metric
depth, and the exact forward optical flow with its occlusion mask. An edit that recolours one
object is then judged directly:

- *edit accuracy*: the share of frames whose edited object (its ground-truth mask) takes the target
  colour, the colour judged by the hue of the mask's saturated pixels, nearest of the palette's;
  and the share of (frame, other object) pairs that keep their own colour;
- *structure kept*: the depth estimator's inverse depth on the edited frames against the truth
  (1/z), after the least-squares scale and shift that relative depth allows (the same measured on
  the source frames is the estimator's own floor); and the IoU of the objects' union mask with the
  edited frame's saturated (object-coloured) pixels;
- *temporal consistency*: the warp error with the ground-truth flow (frame t+1 sampled at
  p + flow_t(p), compared with frame t on the pixels that stay visible), 0-255 scale, as Pixel-MSE
  is; and the end-point error of an estimated flow against the truth, so the estimated-flow
  Pixel-MSE beside it can be read knowing how wrong its flow is.

Frames are uint8 RGB ``[T, H, W, 3]`` at the clip's size throughout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from p2v_fast.errors import InputError, one_line
from p2v_fast.media.scenes import COLOURS, SHAPES
from p2v_fast.quality.metrics import warp_backward
from p2v_fast.text import plural

#: A pixel counts towards an object's colour when its saturation (HSV) is at least this; the
#: floor and wall tones stay below it (their saturation is at most ~0.3).
MIN_SATURATION = 0.35
#: Frames where the object shows fewer pixels than this are not judged.
MIN_PIXELS = 4


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 or [0,1] float RGB [..., 3] -> hue in degrees [0, 360), saturation, value in [0, 1]."""
    x = rgb.astype(np.float32)
    if rgb.dtype == np.uint8:
        x = x / 255.0
    mx, mn = x.max(-1), x.min(-1)
    c = mx - mn
    safe = np.where(c > 0, c, 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = np.where(c > 0, h * 60.0, 0.0)
    s = np.where(mx > 0, c / np.where(mx > 0, mx, 1.0), 0.0)
    return h, s, mx


PALETTE_HUES: dict[str, float] = {name: float(_hsv(np.array(rgb, np.float32))[0]) for name, rgb in COLOURS.items()}


def _circular_mean_deg(hues: np.ndarray, weights: np.ndarray) -> float:
    a = np.deg2rad(hues)
    return float(np.rad2deg(np.arctan2((weights * np.sin(a)).sum(), (weights * np.cos(a)).sum())) % 360)


def nearest_colour(pixels: np.ndarray) -> str | None:
    """The palette colour nearest in hue to ``pixels`` (uint8 [N, 3]), judged on the saturated
    ones (weighted by saturation); None when fewer than MIN_PIXELS are saturated (grey)."""
    h, s, _ = _hsv(pixels.reshape(-1, 3))
    keep = s >= MIN_SATURATION
    if keep.sum() < MIN_PIXELS:
        return None
    hue = _circular_mean_deg(h[keep], s[keep])
    return min(PALETTE_HUES, key=lambda n: abs((PALETTE_HUES[n] - hue + 180) % 360 - 180))


def colour_hits(frames: np.ndarray, ids: np.ndarray, object_id: int, colour: str) -> list[bool]:
    """Per frame where object ``object_id`` (1-based, as in ``ids``) shows: does it read as ``colour``?"""
    out = []
    for frame, mask in zip(frames, ids == object_id, strict=True):
        if mask.sum() >= MIN_PIXELS:
            out.append(nearest_colour(frame[mask]) == colour)
    return out


def warp_error_truth(frames: np.ndarray, flow: np.ndarray, occluded: np.ndarray) -> float:
    """Mean over pairs of the squared error (0-255 scale, channel mean) between frame t and frame
    t+1 sampled along the true forward flow, on the pixels visible in both and landing inside."""
    errs = []
    for t in range(len(frames) - 1):
        warped, _, _, inside = warp_backward(frames[t + 1], flow[t])
        valid = inside & ~occluded[t]
        if valid.any():
            diff = (warped - frames[t].astype(np.float32)) ** 2
            errs.append(float(diff.mean(-1)[valid].mean()))
    return float(np.mean(errs)) if errs else float("nan")


def flow_epe(frames: np.ndarray, flow: np.ndarray, occluded: np.ndarray,
             estimator: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> float:
    """Mean end-point error (pixels) of ``estimator(a, b)`` (forward flow a -> b, [H, W, 2])
    against the true forward flow, on visible pixels."""
    errs = []
    for t in range(len(frames) - 1):
        est = estimator(frames[t], frames[t + 1])
        valid = ~occluded[t]
        if valid.any():
            errs.append(float(np.linalg.norm(est - flow[t], axis=-1)[valid].mean()))
    return float(np.mean(errs)) if errs else float("nan")


def aligned_inverse_depth_error(pred: np.ndarray, depth: np.ndarray) -> float:
    """Relative error of a predicted relative inverse depth against the true metric depth:
    ``pred`` [H, W] is aligned to 1/depth by least-squares scale and shift, then
    mean |aligned - 1/z| / (1/z) (AbsRel in inverse depth)."""
    target = 1.0 / np.maximum(depth.astype(np.float64), 1e-6)
    a = np.stack([pred.astype(np.float64).ravel(), np.ones(pred.size)], 1)
    coef, *_ = np.linalg.lstsq(a, target.ravel(), rcond=None)
    aligned = (a @ coef).reshape(target.shape)
    return float(np.mean(np.abs(aligned - target) / target))


def object_iou(frames: np.ndarray, ids: np.ndarray) -> float:
    """Mean IoU between the objects' true union mask and the edited frames' saturated pixels."""
    ious = []
    for frame, idm in zip(frames, ids, strict=True):
        _, s, _ = _hsv(frame)
        pred, true = s >= MIN_SATURATION, idm > 0
        union = (pred | true).sum()
        if union:
            ious.append(float((pred & true).sum() / union))
    return float(np.mean(ious)) if ious else float("nan")


@dataclass(frozen=True)
class SceneEditScore:
    """One edit of a scene clip, judged against its ground truth."""

    edit_accuracy: float  # share of judged frames where the edited object has the target colour
    others_kept: float  # share of (frame, other object) pairs keeping their colour (nan: none)
    source_accuracy: float  # the same judge on the source frames, for the source colour (sanity)
    warp_error: float  # true-flow warp error of the edited frames (0-255 MSE)
    source_warp_error: float  # the same on the source frames (the renderer's floor: shading, edges)
    object_iou: float
    depth_error: float  # aligned inverse-depth AbsRel of the estimator on the edited frames (nan: no estimator)
    source_depth_error: float  # the same on the source frames


def score_scene_edit(
    edited: np.ndarray,
    source: np.ndarray,
    ids: np.ndarray,
    flow: np.ndarray,
    occluded: np.ndarray,
    depth: np.ndarray,
    object_id: int,
    source_colour: str,
    target_colour: str,
    other_colours: dict[int, str],
    depth_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> SceneEditScore:
    """Score ``edited`` frames (uint8 [T, H, W, 3], the source's size) against the source clip's truth.

    ``object_id`` (1-based) was to turn ``source_colour`` -> ``target_colour``; ``other_colours``
    maps every other object's id to its colour. ``depth_fn`` maps frames [T, H, W, 3] to relative
    inverse depth [T, H, W] (larger = nearer)."""
    if edited.shape != source.shape:
        raise ValueError(f"edited frames {edited.shape} and source frames {source.shape} differ in shape")
    hits = colour_hits(edited, ids, object_id, target_colour)
    src_hits = colour_hits(source, ids, object_id, source_colour)
    kept: list[bool] = []
    for oid, colour in other_colours.items():
        kept += colour_hits(edited, ids, oid, colour)

    def depth_error(frames: np.ndarray) -> float:
        if depth_fn is None:
            return float("nan")
        pred = depth_fn(frames)
        return float(np.mean([aligned_inverse_depth_error(p, d) for p, d in zip(pred, depth, strict=True)]))

    def share(xs: Sequence[bool]) -> float:
        return float(np.mean(xs)) if xs else float("nan")

    return SceneEditScore(
        edit_accuracy=share(hits),
        others_kept=share(kept),
        source_accuracy=share(src_hits),
        warp_error=warp_error_truth(edited, flow, occluded),
        source_warp_error=warp_error_truth(source, flow, occluded),
        object_iou=object_iou(edited, ids),
        depth_error=depth_error(edited),
        source_depth_error=depth_error(source),
    )


# --------------------------------------------------------------------------------------
# a scene clip's sidecar, read back (p2v eval)


@dataclass(frozen=True)
class SceneTruth:
    """The ground truth that :func:`p2v_fast.media.scenes.write_clip` wrote beside a clip."""

    meta: dict[str, Any]  # caption, objects (ids are 1 + their index), floor, size
    depth: np.ndarray  # float32 [T, H, W], camera z
    ids: np.ndarray  # int [T, H, W], 0 = floor/wall
    flow: np.ndarray  # float32 [T-1, H, W, 2], forward
    occluded: np.ndarray  # bool [T-1, H, W]
    path: Path  # the .npz read


def find_truth(source: str | Path) -> SceneTruth | None:
    """The ground truth of a scene clip (``NAME.npz`` + ``NAME.json`` beside a video, or
    ``ground_truth.npz`` + ``scene.json`` in a frames folder), or None for any other clip."""
    src = Path(source)
    arrays, meta = ((src / "ground_truth.npz", src / "scene.json") if src.is_dir()
                    else (src.with_suffix(".npz"), src.with_suffix(".json")))
    if not (arrays.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        with np.load(arrays, allow_pickle=False) as z:
            truth = SceneTruth(meta=info, depth=z["depth"], ids=z["ids"], flow=z["flow"], occluded=z["occluded"],
                               path=arrays)
        if not isinstance(info, dict) or not isinstance(info.get("objects"), list):
            raise ValueError("no 'objects' list")
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"ground truth beside '{src}' is unreadable ({arrays.name}, {meta.name}): "
                         f"{one_line(exc)}") from exc
    t = len(truth.depth)
    if truth.ids.shape != truth.depth.shape or truth.flow.shape[:3] != (t - 1, *truth.depth.shape[1:]) \
            or truth.occluded.shape != truth.flow.shape[:3]:
        raise InputError(f"ground truth '{arrays}' has arrays of mismatched shapes")
    return truth


@dataclass(frozen=True)
class ColourEdit:
    """A prompt that recolours one object of a scene's caption."""

    object_id: int  # 1-based, as in the ids map
    source_colour: str
    target_colour: str
    others: dict[int, str]  # every other object's id -> its colour


_PAIR = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\b")


def colour_edit(meta: dict[str, Any], prompt: str) -> ColourEdit | None:
    """Which object ``prompt`` recolours, read against the caption: the caption's and the prompt's
    "colour shape" pairs, in order, must name the same shapes, and exactly one colour differs.
    None when the prompt is not such an edit (a material or floor change, two recolourings...)."""
    src = _PAIR.findall(str(meta.get("caption", "")).lower())
    tgt = _PAIR.findall(prompt.lower())
    if not src or len(src) != len(tgt) or [s for _, s in src] != [s for _, s in tgt]:
        return None
    changed = [i for i, (a, b) in enumerate(zip(src, tgt, strict=True)) if a[0] != b[0]]
    if len(changed) != 1:
        return None
    colour, shape = src[changed[0]]
    objects = meta["objects"]
    # the caption names objects left to right; find this one by its colour and shape (the first of
    # identical twins: both look the same, so either is judged the same way)
    matches = [i for i, o in enumerate(objects) if o.get("colour") == colour and o.get("shape") == shape]
    if not matches:
        return None
    index = matches[0]
    return ColourEdit(object_id=index + 1, source_colour=colour, target_colour=tgt[changed[0]][0],
                      others={i + 1: str(o.get("colour")) for i, o in enumerate(objects) if i != index})


def dpt_depth_fn(depth_estimator: Any, feature_extractor: Any, device: Any = "cpu"):
    """Frames [T, H, W, 3] -> a DPT model's relative inverse depth at the frames' size [T, H, W]."""
    import torch

    def run(frames: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            pv = feature_extractor(images=list(frames), return_tensors="pt")["pixel_values"]
            pred = depth_estimator(pixel_values=pv.to(device, torch.float32)).predicted_depth.float()
            pred = torch.nn.functional.interpolate(pred[:, None], size=frames.shape[1:3], mode="bicubic",
                                                   align_corners=False)[:, 0]
        return pred.cpu().numpy()

    return run


def mini_depth_fn():
    """:func:`dpt_depth_fn` of the trained ``mini`` DPT (p2v_fast/weights/mini): scene clips are its domain."""
    import torch
    from transformers import DPTForDepthEstimation

    from p2v_fast.weights.hub import image_processor_class, quiet_loading
    from p2v_fast.weights.models import mini_model_dir

    folder = mini_model_dir()
    with quiet_loading():
        dpt = DPTForDepthEstimation.from_pretrained(str(folder / "depth_estimator"), dtype=torch.float32).eval()
        fe = image_processor_class("DPTImageProcessor").from_pretrained(str(folder / "feature_extractor"))
    return dpt_depth_fn(dpt, fe)


def score_against_truth(edited: np.ndarray, source: np.ndarray, truth: SceneTruth, prompt: str, start: int = 0,
                        stride: int = 1, depth_fn: Callable[[np.ndarray], np.ndarray] | None = None
                        ) -> dict[str, Any]:
    """``p2v eval``'s ground-truth scores of ``edited`` (the source's frames ``start, start + stride, ...``,
    uint8 [T, H, W, 3] at the truth's size): the :class:`SceneEditScore` fields, the edit read from
    ``prompt`` against the caption (edit accuracy only for a one-object colour change), and why
    a score is missing. The true-flow warp error needs consecutive frames (``stride`` 1)."""
    n = len(edited)
    sel = np.arange(start, start + stride * n, stride)
    if sel[-1] >= len(truth.depth):
        raise InputError(f"ground truth '{truth.path}' has {plural(len(truth.depth), 'frame')}; the edit used "
                         f"frames up to {sel[-1]}")
    if edited.shape[1:3] != truth.depth.shape[1:]:
        raise InputError(f"the edited frames are {edited.shape[2]}x{edited.shape[1]} and the ground truth "
                         f"{truth.depth.shape[2]}x{truth.depth.shape[1]}: compare at the clip's own size")
    ids, depth = truth.ids[sel], truth.depth[sel]
    if stride == 1:
        flow, occ = truth.flow[sel[:-1]], truth.occluded[sel[:-1]]
    else:  # no flow between frames `stride` apart: keep the shapes, mask every pixel
        flow = np.zeros((n - 1, *ids.shape[1:], 2), np.float32)
        occ = np.ones((n - 1, *ids.shape[1:]), bool)
    edit = colour_edit(truth.meta, prompt)
    notes = []
    if edit is None:
        notes.append("edit accuracy: the prompt is not a colour change of one object of the caption "
                     f"({truth.meta.get('caption')!r})")
        edit = ColourEdit(object_id=0, source_colour="", target_colour="", others={})
    if stride != 1:
        notes.append("true-flow warp error: needs consecutive frames (--stride 1)")
    score = score_scene_edit(edited, source, ids, flow, occ, depth, edit.object_id, edit.source_colour or "red",
                             edit.target_colour or "red", edit.others, depth_fn)
    out: dict[str, Any] = asdict(score)
    if edit.object_id == 0:
        for k in ("edit_accuracy", "others_kept", "source_accuracy"):
            out[k] = float("nan")
    if stride != 1:
        out["warp_error"] = out["source_warp_error"] = float("nan")
    out.update(object_id=edit.object_id, source_colour=edit.source_colour or None,
               target_colour=edit.target_colour or None, caption=truth.meta.get("caption"), notes=notes)
    return out
