"""Quality metrics of the paper's Table 2: CLIP-Text, CLIP-Image and Pixel-MSE.

- **CLIP-Text** (faithfulness): mean cosine similarity between the CLIP embedding of the edit
  prompt and that of each edited frame.
- **CLIP-Image** (temporal coherency): mean cosine similarity between the CLIP embeddings of
  consecutive edited frames.
- **Pixel-MSE** (temporal coherency): optical flow between consecutive *source* frames; each
  edited frame t is warped to frame t+1 with it and compared with edited frame t+1. The error
  is a mean of squares on the 0-255 scale, computed in float, over the pixels whose flow passes
  a forward-backward consistency check and does not point outside the frame (occluded and newly
  revealed pixels have no correspondence and are excluded; their share is reported).

The paper uses RAFT for the flow; ``flow="raft"`` does the same when torchvision and its RAFT
weights are available. The default, ``flow="dis"``, is OpenCV's DIS flow, which needs no
weights; numbers from the two are comparable in trend but not identical.

CLIP defaults to ``openai/clip-vit-large-patch14``. ``model="tiny"`` builds a random-weight CLIP
with the real architecture, tokenizer and image processor, so the whole path runs offline
(its scores are meaningless as quality numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from p2v_fast.config import DEFAULT_CLIP_MODEL, FLOW_METHODS
from p2v_fast.errors import InputError, ModelLoadError, one_line
from p2v_fast.weights.tiny import ensure_tiny_clip

if TYPE_CHECKING:  # pragma: no cover
    import torch

TINY_CLIP_NAME = "tiny"
MINI_CLIP_NAME = "mini"

#: The paper's Table 2 (DAVIS, 512x512, real SD2-depth weights, RAFT flow): Pix2Video ("ours")
#: and its "w/o update" ablation; Pixel-MSE on the 0-255 scale.
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "ours": {"clip_text": 0.2891, "clip_image": 0.9767, "pixel_mse": 228.62},
    "no-update": {"clip_text": 0.2893, "clip_image": 0.9740, "pixel_mse": 371.18},
}


def paper_scores(setting: str = "ours") -> tuple[str, str, str]:
    """Table 2's CLIP-Text, CLIP-Image and Pixel-MSE of ``setting`` as the paper prints them."""
    row = PAPER_TABLE2[setting]
    return f"{row['clip_text']:.4f}", f"{row['clip_image']:.4f}", f"{row['pixel_mse']:.2f}"

# Forward-backward consistency check (Sundaram et al. 2010; Ruder et al. 2016):
# |f_a(x) + f_b(x + f_a(x))|^2 < a (|f_a(x)|^2 + |f_b(x + f_a(x))|^2) + b
FB_ALPHA = 0.01
FB_BETA = 0.5


# --------------------------------------------------------------------------------------------
# cache


# --------------------------------------------------------------------------------------------
# tiny CLIP


# --------------------------------------------------------------------------------------------
# mini CLIP


def mini_clip_dir() -> Path:
    """The trained ``mini`` CLIP shipped in the package: ``p2v_fast/weights/mini/clip``."""
    from p2v_fast.weights.hub import MINI_FOLDER

    return MINI_FOLDER / "clip"


# --------------------------------------------------------------------------------------------
# CLIP scorer


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output object (5)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out[1] if isinstance(out, tuple) else out[0]
    return pooled


def _check_frames(frames: Any, what: str, min_count: int = 1) -> list[np.ndarray]:
    """Frames as a list of uint8 [H, W, 3] arrays; InputError otherwise."""
    if isinstance(frames, np.ndarray):
        if frames.ndim == 3:
            raise InputError(
                f"{what}: expected a list of [H, W, 3] frames or an [N, H, W, 3] array, "
                f"got one array of shape {tuple(frames.shape)}"
            )
        items = list(frames)
    else:
        items = list(frames)
    if len(items) < min_count:
        raise InputError(
            f"{what}: need at least {min_count} frame(s), got {len(items)}"
        )
    out = []
    for i, f in enumerate(items):
        a = np.asarray(f)
        if a.ndim != 3 or a.shape[2] != 3:
            raise InputError(
                f"{what}: frame {i} has shape {tuple(a.shape)}, expected [H, W, 3]"
            )
        if a.dtype != np.uint8:
            raise InputError(
                f"{what}: frame {i} has dtype {a.dtype}, expected uint8 (0-255)"
            )
        out.append(a)
    return out


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise InputError("prompt list is empty")
    for p in items:
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"prompt {p!r} is empty")
    return items


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise InputError(
            f"prompt must be a string, got {type(prompt).__name__} {prompt!r}"
        )
    return _check_prompts(prompt)[0]


class ClipScorer:
    """CLIP image and text embeddings (L2-normalised) for the CLIP-Text/Image metrics.

    ``model``: a Hugging Face id or a local folder (``CLIPModel`` + ``CLIPProcessor``), or
    ``"tiny"`` for the offline random-weight stand-in, which is built once in the cache and then
    loaded through the same ``from_pretrained`` path as a real model, or ``"mini"`` for the
    small CLIP trained on the scene clips (shipped in the package, same path).
    """

    def __init__(
        self,
        model: str = DEFAULT_CLIP_MODEL,
        device: str = "cpu",
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"CLIP batch size must be >= 1, got {batch_size}")
        self.name = model
        self.device = device
        self.batch_size = batch_size
        try:
            import torch
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as exc:
            raise ModelLoadError(f"cannot load CLIP: {one_line(exc, kind=True)}") from exc
        from p2v_fast.weights.downloads import CLIP_INSTEAD
        from p2v_fast.weights.hub import load_from_hub_or_folder, quiet_loading

        def load(source: str, local_only: bool) -> tuple[Any, Any]:
            with quiet_loading():  # no per-weight progress bars or load-time advice on stderr
                # fp32 whatever the files hold (mini ships fp16; the scorer runs in fp32)
                clip = CLIPModel.from_pretrained(source, local_files_only=local_only, dtype=torch.float32)
                return clip, CLIPProcessor.from_pretrained(source, local_files_only=local_only)

        # a hub id: the cache first, then the hub only if it answers (offline: one line at once)
        if model == TINY_CLIP_NAME:
            source = str(ensure_tiny_clip())
        elif model == MINI_CLIP_NAME:  # the trained small CLIP of --model mini, in the package
            source = str(mini_clip_dir())
        else:
            source = model
        clip, self.processor = load_from_hub_or_folder(
            source, load, CLIP_INSTEAD)
        try:
            self.model = clip.to(device).eval()
        except Exception as exc:
            raise ModelLoadError(f"cannot move CLIP model {model!r} to {device}: {one_line(exc, kind=True)}") from None
        cfg = self.model.config
        self.image_size = int(cfg.vision_config.image_size)
        tok_max = int(getattr(self.processor.tokenizer, "model_max_length", 77) or 77)
        self.max_text_len = min(tok_max, int(cfg.text_config.max_position_embeddings))

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def preprocess(self, frames: Any) -> torch.Tensor:
        """uint8 [H, W, 3] frames -> ``pixel_values`` [N, 3, S, S] (resize, crop, normalise)."""
        items = _check_frames(frames, "CLIP input")
        out = self.processor(
            images=items, return_tensors="pt", input_data_format="channels_last"
        )
        return out["pixel_values"]

    def image_embeds(self, frames: Any) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (float32, on the CPU)."""
        import torch

        items = _check_frames(frames, "CLIP input")
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(items), self.batch_size):
                pix = self.preprocess(items[i : i + self.batch_size]).to(self.device)
                emb = _features(self.model.get_image_features(pixel_values=pix))
                chunks.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(chunks)

    def text_embeds(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [M, D] (float32, on the CPU)."""
        import torch

        items = _check_prompts(prompts)
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(items), self.batch_size):
                enc = self.processor(
                    text=items[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_text_len,
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                emb = _features(
                    self.model.get_text_features(
                        input_ids=enc["input_ids"],
                        attention_mask=enc.get("attention_mask"),
                    )
                )
                chunks.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(chunks)


def clip_text_score(scorer: ClipScorer, frames: Any, prompt: str) -> float:
    """CLIP-Text: mean cosine similarity between ``prompt`` and each frame."""
    prompt = _check_prompt(prompt)
    items = _check_frames(frames, "edited frames")
    img = scorer.image_embeds(items)
    txt = scorer.text_embeds([prompt])
    return float((img @ txt[0]).mean())


def clip_image_score(scorer: ClipScorer, frames: Any) -> float:
    """CLIP-Image: mean cosine similarity between the embeddings of consecutive frames."""
    items = _check_frames(frames, "edited frames", min_count=2)
    emb = scorer.image_embeds(items)
    return float((emb[:-1] * emb[1:]).sum(-1).mean())


# --------------------------------------------------------------------------------------------
# optical flow and Pixel-MSE


@dataclass(frozen=True)
class PixelMSEResult:
    """Pixel-MSE (0-255 scale) and the share of pixels excluded as occluded/out of frame.

    ``mse`` is the mean of ``per_pair`` (one value per consecutive pair, as the paper averages
    per-frame errors); a pair with no valid pixel contributes NaN and is skipped in the mean.
    ``masked_fraction`` is the excluded share over all pairs' pixels.
    """

    mse: float
    masked_fraction: float
    per_pair: list[float] = field(default_factory=list)


class _DisFlow:
    """OpenCV DIS optical flow (preset MEDIUM) on grayscale frames."""

    def __init__(self) -> None:
        import cv2

        self._cv2 = cv2
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)  # type: ignore[attr-defined]

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Flow f [H, W, 2] (x, y) with ``a(p) ~ b(p + f(p))``."""
        cv2 = self._cv2
        ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
        gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
        return self._dis.calc(ga, gb, None).astype(np.float32)


class _RaftFlow:
    """torchvision's RAFT-large with its pretrained weights (the paper's flow)."""

    def __init__(self, device: str = "cpu", pretrained: bool = True) -> None:
        """``pretrained=False``: random weights (tests; nothing is downloaded)."""
        raft_large, Raft_Large_Weights = _torchvision_raft()
        import torch

        from p2v_fast.weights.downloads import RAFT_INSTEAD
        from p2v_fast.weights.hub import fetch_url_file

        weights = Raft_Large_Weights.DEFAULT
        if pretrained:
            # torchvision downloads into torch hub's checkpoints folder without a timeout: fetch the
            # file there first (offline: one line at once), so torchvision then finds it
            fetch_url_file(weights.url, Path(torch.hub.get_dir()) / "checkpoints", "RAFT's weights",
                           RAFT_INSTEAD)
        try:
            self._model = raft_large(weights=weights if pretrained else None, progress=False).to(device).eval()
            self._transforms = weights.transforms()
        except Exception as exc:
            raise ModelLoadError(f"cannot load RAFT weights ({one_line(exc, kind=True)}); use --flow dis") from None
        self._device = device

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        h, w = a.shape[:2]
        ta = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]
        tb = torch.from_numpy(np.ascontiguousarray(b)).permute(2, 0, 1)[None]
        ta, tb = self._transforms(ta, tb)  # float in [-1, 1]
        ph, pw = (-h) % 8, (-w) % 8  # RAFT needs sizes divisible by 8
        if ph or pw:
            ta = F.pad(ta, (0, pw, 0, ph), mode="replicate")
            tb = F.pad(tb, (0, pw, 0, ph), mode="replicate")
        with torch.inference_mode():
            flows = self._model(ta.to(self._device), tb.to(self._device))
        f = flows[-1][0, :, :h, :w].permute(1, 2, 0)
        return f.float().cpu().numpy()


def torchvision_install_hint() -> str:
    """What to install for --flow raft: the [eval] extra, and the torchvision build that matches
    the installed torch (torchvision 0.N+15 pairs with torch 2.N; a +cpu or +cuXYZ torch takes its
    torchvision from the same PyTorch index, PyPI's build does not load on a CPU-only torch)."""
    import torch

    version = torch.__version__
    base, _, local = version.partition("+")
    major, minor = [*base.split("."), "0", "0"][:2]
    if major != "2" or not minor.isdigit():
        return "pip install 'p2v-fast[eval]'"
    index = f" --index-url https://download.pytorch.org/whl/{local}" if local else ""
    return (f"pip install 'p2v-fast[eval]' (the build for this torch {version}: "
            f"pip install 'torchvision==0.{int(minor) + 15}.*'{index})")


def _torchvision_raft() -> tuple[Any, Any]:
    """torchvision's ``raft_large`` and ``Raft_Large_Weights``, or one ModelLoadError line saying
    exactly what to install (torchvision missing, or a build that does not load with this torch)."""
    try:
        from torchvision.models.optical_flow import Raft_Large_Weights, raft_large
    except ImportError:
        raise ModelLoadError(f"--flow raft (the paper's flow) needs torchvision, which is not installed: "
                             f"{torchvision_install_hint()}; or use --flow dis") from None
    except Exception as exc:  # e.g. PyPI's CUDA build on a CPU-only torch: "operator torchvision::nms does not exist"
        raise ModelLoadError(f"--flow raft: torchvision is installed but does not load with this torch "
                             f"({one_line(exc, kind=True)}); {torchvision_install_hint()}; or use --flow dis") from None
    return raft_large, Raft_Large_Weights


def make_flow(flow: str) -> Any:
    """The optical-flow callable ``f(a, b) -> [H, W, 2]`` (``a(p) ~ b(p + f(p))``) for ``flow``.

    Build it once and pass it to :class:`StreamingEvaluator` to score several videos without
    reloading RAFT's weights each time.
    """
    return _make_flow(flow)


def _make_flow(flow: str) -> Any:
    if flow == "dis":
        return _DisFlow()
    if flow == "raft":
        return _RaftFlow()
    raise InputError(
        f"unknown flow method {flow!r}; expected one of {', '.join(FLOW_METHODS)}"
    )


def _sample(img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """Bilinear sampling of ``img`` at (map_x, map_y) (float32 in and out)."""
    import cv2

    return cv2.remap(
        img,
        map_x,
        map_y,
        interpolation=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )


def warp_backward(
    img: np.ndarray, flow: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backward-warp ``img`` with ``flow`` [H, W, 2]: ``out(p) = img(p + flow(p))``.

    Returns the warped image (float32), the sample positions (map_x, map_y) and a boolean mask
    of positions that fall inside ``img``.
    """
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = gx + flow[..., 0]
    map_y = gy + flow[..., 1]
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    warped = _sample(img.astype(np.float32), map_x, map_y)
    return warped, map_x, map_y, inside


def consistency_mask(
    flow_a: np.ndarray,
    flow_b: np.ndarray,
    alpha: float = FB_ALPHA,
    beta: float = FB_BETA,
) -> np.ndarray:
    """Pixels p of frame A whose flow A->B is undone by B->A, and whose target lies in B.

    ``flow_a`` maps A to B (``A(p) ~ B(p + flow_a(p))``), ``flow_b`` maps B to A. A pixel is
    valid when |f_a(p) + f_b(p + f_a(p))|^2 < alpha (|f_a|^2 + |f_b(p + f_a)|^2) + beta and
    p + f_a(p) is inside the frame.
    """
    fb_warped, _, _, inside = warp_backward(flow_b, flow_a)
    diff = flow_a + fb_warped
    lhs = (diff**2).sum(-1)
    rhs = alpha * ((flow_a**2).sum(-1) + (fb_warped**2).sum(-1)) + beta
    return inside & (lhs < rhs)


def _check_pairs(edited: Any, source: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    ed = _check_frames(edited, "edited frames", min_count=0)
    src = _check_frames(source, "source frames", min_count=0)
    if len(ed) != len(src):
        raise InputError(
            f"edited and source frame counts differ: {len(ed)} edited vs {len(src)} source"
        )
    if len(ed) < 2:
        raise InputError(f"need at least 2 frames for temporal metrics, got {len(ed)}")
    ref = src[0].shape
    for i, (e, s) in enumerate(zip(ed, src, strict=True)):
        if s.shape != ref:
            raise InputError(
                f"source frame {i} has size {s.shape[1]}x{s.shape[0]}, "
                f"frame 0 has {ref[1]}x{ref[0]}"
            )
        if e.shape != s.shape:
            raise InputError(
                f"edited frame {i} is {e.shape[1]}x{e.shape[0]} but source frame {i} is "
                f"{s.shape[1]}x{s.shape[0]} (WxH)"
            )
    return ed, src


def _pair_error(
    flow_fn: Any, ed_a: np.ndarray, ed_b: np.ndarray, src_a: np.ndarray, src_b: np.ndarray
) -> tuple[float, int, int]:
    """One consecutive pair (t = a, t+1 = b) of Pixel-MSE: (error or NaN, valid pixels, pixels)."""
    bw = flow_fn(src_b, src_a)  # src_b(p) ~ src_a(p + bw(p))
    fw = flow_fn(src_a, src_b)  # src_a(p) ~ src_b(p + fw(p))
    valid = consistency_mask(bw, fw)
    warped, _, _, _ = warp_backward(ed_a, bw)
    err = ((warped - ed_b.astype(np.float32)) ** 2).mean(-1)
    n_valid = int(valid.sum())
    value = float(err[valid].astype(np.float64).mean()) if n_valid else float("nan")
    return value, n_valid, int(valid.size)


def pixel_mse(edited: Any, source: Any, flow: str = "dis") -> PixelMSEResult:
    """Pixel-MSE: warp each edited frame to the next with the source video's flow.

    For each pair (t, t+1): flows source t+1 -> t (``bw``) and t -> t+1 (``fw``); the warped
    frame is ``edited_t(p + bw(p))`` for every pixel p of frame t+1 (backward warping), and the
    squared error against ``edited_{t+1}`` (float, 0-255 scale, averaged over channels) is
    averaged over the pixels p that pass the forward-backward check and sample inside frame t.
    """
    ed, src = _check_pairs(edited, source)
    if flow not in FLOW_METHODS:
        raise InputError(
            f"unknown flow method {flow!r}; expected one of {', '.join(FLOW_METHODS)}"
        )
    flow_fn = _make_flow(flow)
    per_pair: list[float] = []
    excluded = 0
    total = 0
    for t in range(len(ed) - 1):
        value, n_valid, n_total = _pair_error(flow_fn, ed[t], ed[t + 1], src[t], src[t + 1])
        total += n_total
        excluded += n_total - n_valid
        per_pair.append(value)
    finite = [v for v in per_pair if np.isfinite(v)]
    mse = float(np.mean(finite)) if finite else float("nan")
    return PixelMSEResult(mse=mse, masked_fraction=excluded / total, per_pair=per_pair)


# --------------------------------------------------------------------------------------------
# all together


def evaluate(
    edited_frames: Any,
    source_frames: Any,
    prompt: str,
    scorer: ClipScorer,
    flow: str = "dis",
) -> dict[str, float | int]:
    """Table 2's metrics for one edit: clip_text, clip_image, pixel_mse (+ masked_fraction)."""
    ed, src = _check_pairs(edited_frames, source_frames)
    prompt = _check_prompt(prompt)
    if flow not in FLOW_METHODS:
        raise InputError(
            f"unknown flow method {flow!r}; expected one of {', '.join(FLOW_METHODS)}"
        )
    mse = pixel_mse(ed, src, flow=flow)
    img = scorer.image_embeds(ed)
    txt = scorer.text_embeds([prompt])
    return {
        "clip_text": float((img @ txt[0]).mean()),
        "clip_image": float((img[:-1] * img[1:]).sum(-1).mean()),
        "pixel_mse": mse.mse,
        "masked_fraction": mse.masked_fraction,
        "n_frames": len(ed),
    }


class StreamingEvaluator:
    """Table 2's metrics over frame pairs fed one at a time; holds O(1) frames.

    Gives the same numbers as :func:`evaluate` on the full lists (up to float rounding), but keeps
    only the previous (edited, source) pair and at most ``scorer.batch_size`` edited frames waiting
    for CLIP, so a whole video never sits in memory::

        ev = StreamingEvaluator(scorer, "a crochet swan", flow="dis")
        for edited, source in zip(edited_frames, source_frames):
            ev.add(edited, source)
        scores = ev.result()
    """

    def __init__(
        self, scorer: ClipScorer, prompt: str, flow: str = "dis", flow_fn: Any = None
    ) -> None:
        prompt = _check_prompt(prompt)
        if flow not in FLOW_METHODS:
            raise InputError(
                f"unknown flow method {flow!r}; expected one of {', '.join(FLOW_METHODS)}"
            )
        self.scorer = scorer
        self.prompt = prompt
        self.flow = flow
        self._flow_fn = flow_fn if flow_fn is not None else _make_flow(flow)
        self._text = scorer.text_embeds([prompt])[0]
        self._shape: tuple[int, ...] | None = None
        self._prev: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: list[np.ndarray] = []
        self._last_emb: torch.Tensor | None = None
        self.n_frames = 0
        self.per_pair: list[float] = []
        self._excluded = 0
        self._total = 0
        self._text_sum = 0.0
        self._image_sum = 0.0
        self._n_image = 0

    def add(self, edited: np.ndarray, source: np.ndarray) -> None:
        """Feed frame t of the edited video and frame t of the source (uint8 [H, W, 3], same size)."""
        i = self.n_frames
        (ed,) = _check_frames([edited], f"edited frame {i}")
        (src,) = _check_frames([source], f"source frame {i}")
        if self._shape is None:
            self._shape = src.shape
        if src.shape != self._shape:
            raise InputError(
                f"source frame {i} has size {src.shape[1]}x{src.shape[0]}, "
                f"frame 0 has {self._shape[1]}x{self._shape[0]}"
            )
        if ed.shape != src.shape:
            raise InputError(
                f"edited frame {i} is {ed.shape[1]}x{ed.shape[0]} but source frame {i} is "
                f"{src.shape[1]}x{src.shape[0]} (WxH)"
            )
        if self._prev is not None:
            value, n_valid, n_total = _pair_error(self._flow_fn, self._prev[0], ed, self._prev[1], src)
            self.per_pair.append(value)
            self._total += n_total
            self._excluded += n_total - n_valid
        self._prev = (ed, src)
        self._pending.append(ed)
        self.n_frames += 1
        if len(self._pending) >= self.scorer.batch_size:
            self._flush()

    def _flush(self) -> None:
        import torch

        if not self._pending:
            return
        emb = self.scorer.image_embeds(self._pending)
        self._pending = []
        self._text_sum += float((emb @ self._text).double().sum())
        chain = emb if self._last_emb is None else torch.cat([self._last_emb[None], emb])
        if len(chain) > 1:
            self._image_sum += float((chain[:-1] * chain[1:]).sum(-1).double().sum())
            self._n_image += len(chain) - 1
        self._last_emb = emb[-1]

    def result(self) -> dict[str, float | int]:
        """The scores so far, as :func:`evaluate` returns them; needs at least 2 frames."""
        self._flush()
        if self.n_frames < 2:
            raise InputError(f"need at least 2 frames for temporal metrics, got {self.n_frames}")
        finite = [v for v in self.per_pair if np.isfinite(v)]
        return {
            "clip_text": self._text_sum / self.n_frames,
            "clip_image": self._image_sum / self._n_image,
            "pixel_mse": float(np.mean(finite)) if finite else float("nan"),
            "masked_fraction": self._excluded / self._total,
            "n_frames": self.n_frames,
        }
