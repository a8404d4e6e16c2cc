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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from p2v_fast.media.scenes import COLOURS
from p2v_fast.quality.metrics import warp_backward

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
