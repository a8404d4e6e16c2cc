"""Framing: how a source picture becomes a working frame, and the frames' geometry.

Frames are ``numpy.uint8`` arrays of shape ``[H, W, 3]`` (RGB, 0..255) or PIL images; sizes are
always ``(W, H)``. :func:`frame_geometry` picks the working size and the picture's box for a
``--size`` and a ``--resize`` mode (crop, stretch, pad); :func:`fit_frame` makes one frame so.
:func:`output_frame` says where the edit is written: at the input's size (the default; the
working frame resampled back, ``pad``'s bars cut first) or at the working size.
User-caused problems raise :class:`~p2v_fast.errors.InputError` with a one-line message.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from p2v_fast.config import OUTPUT_SIZES
from p2v_fast.errors import InputError

#: Largest working frame side in pixels (SD2 is trained at 512 and 768; 2048 is a 256x256 latent).
MAX_SIDE = 2048
RESIZE_MODES = ("crop", "stretch", "pad")


def check_resize(resize: str) -> str:
    """``resize`` if it is one of :data:`RESIZE_MODES`, else InputError naming them."""
    if resize not in RESIZE_MODES:
        raise InputError(f"--resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
    return resize


def working_size(width: int, height: int, short_side: int = 512, multiple: int = 64,
                 max_side: int | None = MAX_SIDE) -> tuple[int, int]:
    """``(W, H)`` with the short side = ``short_side`` and the long side a multiple of
    ``multiple`` as close to the source aspect ratio as possible (halves round up). Neither side
    may exceed ``max_side`` (InputError naming the limit and the largest ``--size`` that fits)."""
    if multiple <= 0:
        raise InputError(f"size multiple must be positive, got {multiple}")
    if short_side <= 0 or short_side % multiple:
        raise InputError(f"short side must be a positive multiple of {multiple}, got {short_side}")
    if width <= 0 or height <= 0:
        raise InputError(f"invalid frame size {width}x{height}")
    short, long = min(width, height), max(width, height)

    def long_side(s: int) -> int:
        return max(multiple, math.floor(long * s / short / multiple + 0.5) * multiple)

    long_out = long_side(short_side)
    if max_side is not None and long_out > max_side:
        fits = [s for s in range(multiple, max_side + 1, multiple) if long_side(s) <= max_side]
        hint = (f"the largest --size that fits this {width}x{height} source is {fits[-1]}" if fits else
                f"no --size fits this {width}x{height} source (its aspect ratio is too extreme)")
        w, h = (short_side, long_out) if width <= height else (long_out, short_side)
        raise InputError(f"working size {w}x{h} (--size {short_side}) is over the limit of {max_side} pixels per "
                         f"side; {hint}")
    return (short_side, long_out) if width <= height else (long_out, short_side)


def fit_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale ``image`` to cover ``size`` = (W, H) keeping aspect, then centre-crop (LANCZOS)."""
    w, h = image.size
    tw, th = size
    if (w, h) == (tw, th):
        return image
    if w * th > tw * h:  # source is wider: crop left/right
        bw = h * tw / th
        box = ((w - bw) / 2, 0.0, (w + bw) / 2, float(h))
    else:
        bh = w * th / tw
        box = (0.0, (h - bh) / 2, float(w), (h + bh) / 2)
    return image.resize((tw, th), Image.Resampling.LANCZOS, box=box)


def pad_box(source: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Box ``(x, y, w, h)`` of a ``source`` = (W, H) picture fitted inside ``size`` = (W, H),
    aspect kept, centred; ``w`` and ``h`` even (H.264 needs even sizes) and at least 2."""
    (sw, sh), (tw, th) = source, size
    scale = min(tw / sw, th / sh)
    w = min(tw - tw % 2, max(2, 2 * round(sw * scale / 2)))
    h = min(th - th % 2, max(2, 2 * round(sh * scale / 2)))
    return (tw - w) // 2, (th - h) // 2, w, h


def frame_geometry(width: int, height: int, size: int = 512,
                   resize: str = "crop") -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The working frame ``(W, H)`` for a ``width`` x ``height`` source at ``size``, and the box
    ``(x, y, w, h)`` of the source's picture inside it (the whole frame unless ``pad``).

    - ``crop``: short side ``size``, long side the nearest multiple of 64 to the aspect ratio
      (:func:`working_size`); scaled to cover, centre-cropped. 854x480 at 512 -> 896x512.
    - ``stretch``: ``size`` x ``size``, squashed (the paper's and its code's framing).
      854x480 at 512 -> 512x512.
    - ``pad``: ``size`` x ``size``, the picture fitted inside with its aspect kept and black
      bars around it. 854x480 at 512 -> 512x512 holding a 512x288 picture at (0, 112).
    """
    if check_resize(resize) == "crop":
        wh = working_size(width, height, size)
        return wh, (0, 0, *wh)
    working_size(size, size, size)  # validates size
    if width <= 0 or height <= 0:
        raise InputError(f"invalid frame size {width}x{height}")
    box = pad_box((width, height), (size, size)) if resize == "pad" else (0, 0, size, size)
    return (size, size), box


def fit_frame(image: Image.Image, size: tuple[int, int], resize: str = "crop",
              source: tuple[int, int] | None = None) -> Image.Image:
    """``image`` as a ``size`` = (W, H) working frame by ``resize`` (see :func:`frame_geometry`).
    ``pad`` places the picture in the box :func:`pad_box` gives for ``source`` (the clip's
    probed size; default the image's own), so every frame of a clip gets the same box."""
    if resize == "stretch":
        return image if image.size == tuple(size) else image.resize(size, Image.Resampling.LANCZOS)
    if resize == "pad":
        x, y, w, h = pad_box(source or image.size, size)
        canvas = Image.new("RGB", size, (0, 0, 0))
        canvas.paste(fit_cover(image, (w, h)), (x, y))
        return canvas
    return fit_cover(image, size)


def fit_array(arr: np.ndarray, size: tuple[int, int] | None, resize: str = "crop",
             source: tuple[int, int] | None = None) -> np.ndarray:
    if size is None or ((arr.shape[1], arr.shape[0]) == tuple(size) and resize != "pad"):
        return np.ascontiguousarray(arr)
    return np.asarray(fit_frame(Image.fromarray(arr), size, resize, source))


def _even(n: int) -> int:
    """``n`` rounded down to an even number, at least 2 (H.264's 4:2:0 needs even sides)."""
    return max(2, n - n % 2)


def output_frame(source: tuple[int, int], size: tuple[int, int], resize: str = "crop",
                 box: tuple[int, int, int, int] | None = None,
                 output: str = "input") -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Where a ``size`` = (W, H) working frame of a ``source`` = (W, H) clip framed by ``resize``
    (``box``: the picture's box in it, None for the whole frame) is written: the region
    ``(x, y, w, h)`` of the working frame kept, and the output's ``(W, H)``, both sides even.

    - ``output="working"``: the working frame as it is, less ``pad``'s bars.
    - ``output="input"``: ``stretch`` and ``pad`` (bars cut) at the source's size, its aspect
      restored; ``crop`` at the cropped region's size in the source (the part of the source
      the edit saw, at the source's scale: 200x120 edited at 128x64 -> 200x100). Odd source
      sides are rounded down to even.
    """
    if output not in OUTPUT_SIZES:
        raise InputError(f"--output-size must be one of {', '.join(OUTPUT_SIZES)}; got {output!r}")
    region = box or (0, 0, *size)
    if output == "working":
        return region, (region[2], region[3])
    (sw, sh), (tw, th) = source, size
    if resize == "crop":  # fit_cover's box, in source pixels
        sw, sh = (round(sh * tw / th), sh) if sw * th > tw * sh else (sw, round(sw * th / tw))
    return region, (_even(sw), _even(sh))


def resample(frame: np.ndarray, region: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """``frame``'s ``region`` (x, y, w, h) resized to ``size`` = (W, H) (LANCZOS): uint8 [H, W, 3]."""
    x, y, w, h = region
    if (w, h) == size:
        return np.ascontiguousarray(frame[y : y + h, x : x + w])
    image = Image.fromarray(frame).resize(size, Image.Resampling.LANCZOS, box=(x, y, x + w, y + h))
    return np.asarray(image)


def side_by_side(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[H, Wa + Wb', 3]``: ``a`` then ``b``, ``b`` resized (keeping aspect) to ``a``'s height."""
    if b.shape[0] != a.shape[0]:
        w = max(1, round(b.shape[1] * a.shape[0] / b.shape[0]))
        b = np.asarray(Image.fromarray(b).resize((w, a.shape[0]), Image.Resampling.LANCZOS))
    return np.concatenate([a, b], axis=1)
