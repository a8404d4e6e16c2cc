"""What an edit will need, before anything loads: `p2v edit --dry-run`.

From the clip's probe, the config and the model's architecture (no torch, no weights read):
the working size and frames, the UNet calls of the inversion and of the edit, and the peak GPU
memory the run is expected to reach. Calls come from the wavefront's own bookkeeping
(:mod:`p2v_fast.method.wavefront`: admission, call groups, and the feature store run on
stand-ins of the stored tensors' sizes, so the stored bytes are the store's own count).

The memory model (every term is printed; docs/performance.md, "Before the run"):

- **weights**: parameter counts x bytes: UNet, VAE and text encoder in the edit's dtype, the
  depth estimator in fp32 (as :func:`p2v_fast.weights.models.load_models` keeps it), the BLIP
  captioner in the edit's dtype when no ``--source-prompt`` is given (it is loaded for the first
  frame's caption and kept): ``--captioner``'s folder, else the model folder's ``captioner/``, else
  BLIP base's count. Counts: SD2-depth's published architecture
  (:data:`p2v_fast.weights.sd2_depth.PARAMETERS`) for a hub id, or the safetensors headers of a
  local folder (``mini``, a diffusers folder).
- **inversion copy**: on a cache miss, a PyTorch inversion in another precision than the edit's
  (``--invert-dtype fp32``, the default, beside fp16) runs on a copy of the UNet, VAE and text
  encoder in that precision (:func:`p2v_fast.nets.runtime.inversion_runtime`), freed after.
- **stored features**: the anchor's features at every step and the other frames' until their
  successor used them (the store's peak, exact).
- **activations**: bytes per UNet sample above the call's inputs, :data:`ACTIVATION_BYTES`
  (SD2-depth at 512x512, counted on the meta device: see there) scaled by the element size and
  by the injected features' elements (so by the latent cells, and for a narrower UNet such as
  ``mini``'s by its width too); plus the call's reference features (anchor || previous, both
  branches), and one frame's VAE decode (:data:`DECODE_BYTES`, scaled alike). A differentiable
  call (``autograd``'s guided steps) keeps its activations for its backward pass.

Calls are split to fit the memory the card has (:class:`p2v_fast.nets.memory.CallBudget`), so
the estimate is given twice: at one frame per UNet call (the least the edit can run in) and at
the frames in flight the schedule allows (what it takes when the card has room).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2v_fast.config import DEFAULT_MODEL, MAX_INVERT_BATCH, EditConfig
from p2v_fast.errors import InputError
from p2v_fast.method.wavefront import DEFAULT_WAVEFRONT_FRAMES, FeatureStore, call_groups, wavefront_ticks
from p2v_fast.text import plural
from p2v_fast.weights.catalog import BLIP_BASE

#: Bytes per element of each precision; "auto" is fp16 on a CUDA GPU, fp32 on the CPU.
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
#: Latent cells the activation figures are given at (64x64: 512x512 pixels).
REFERENCE_HW = (64, 64)
#: Activation bytes of one UNet sample at 64x64 latent cells (512x512 pixels) in a 2-byte
#: precision, above the call's inputs (the features it returns included), for SD2-depth's UNet
#: through the cross-frame wrapper: "inference" is the peak of a call without gradients,
#: "backward" of a differentiable call with its backward pass. Counted by
#: ``python -m benchmarks.activation_memory`` (the full-size UNet on the meta device, every
#: storage an op allocates while a tensor refers to it, attention as the GPU's fused kernels);
#: linear in the samples (a 1-frame call holds exactly two samples' worth) and nearly in the latent
#: cells (from 256x256 to 512x512: inference to 0.02 %, backward to 1.5 %, the cross-attention
#: inputs it keeps not growing with the cells). Kernels' workspaces and the allocator's
#: fragmentation are not counted.
ACTIVATION_BYTES = {"inference": 81_964_160, "backward": 785_373_056}
#: The VAE decoding one frame at 64x64 latent cells, 2-byte precision (the frame sink decodes one
#: frame at a time, beside the edit's calls); counted by the same benchmark.
DECODE_BYTES = 402_685_952
#: Parameters of BLIP base (DEFAULT_CAPTIONER), from its download's size (fp32 weights: 4 bytes each).
BLIP_BASE_PARAMETERS = BLIP_BASE.size // 4


@dataclass(frozen=True)
class Architecture:
    """What a model set weighs and how wide its UNet's injected layers are."""

    label: str  # where the numbers come from
    parameters: dict[str, int]  # network -> parameters (unet, vae, text_encoder, depth_estimator; a folder's captioner)
    unet: dict[str, Any]  # the UNet's config (block_out_channels, up_block_types, layers_per_block, ...)


def _safetensors_parameters(folder: Path) -> int:
    """Parameters in a folder's safetensors files, from their headers (nothing else is read)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        with safe_open(str(f), framework="numpy") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def _folder_parameters(folder: Path) -> dict[str, int]:
    """Parameter counts of a diffusers pipeline folder's networks (its own captioner/ included)."""
    counts = {name: _safetensors_parameters(folder / name)
              for name in ("unet", "vae", "text_encoder", "depth_estimator", "captioner")}
    return {k: v for k, v in counts.items() if v}


def captioner_parameters(cfg: EditConfig, arch: Architecture) -> int:
    """Parameters of the captioner the edit loads: none with ``--source-prompt`` (or
    ``--captioner none``); ``--captioner``'s folder counted, a hub id taken for BLIP base; by
    default the model folder's own ``captioner/``, else BLIP base (DEFAULT_CAPTIONER)."""
    if cfg.source_prompt is not None or cfg.captioner == "none":
        return 0
    if cfg.captioner is not None and Path(cfg.captioner).expanduser().is_dir():
        return _safetensors_parameters(Path(cfg.captioner).expanduser())
    if cfg.captioner is None and "captioner" in arch.parameters:
        return arch.parameters["captioner"]
    return BLIP_BASE_PARAMETERS


def architecture(model: str) -> Architecture:
    """The architecture of ``model`` without loading it: SD2-depth's published one for a hub id
    (nothing is downloaded), or a local folder's (``mini``, a diffusers folder): its UNet config
    and its weights' safetensors headers. ``tiny`` (built on first use): its configs in code."""
    from p2v_fast.weights import sd2_depth
    from p2v_fast.weights.hub import looks_like_path

    if model == "tiny":
        from p2v_fast.weights.tiny import UNET_CONFIG

        return Architecture("the random-weight test set: a few MB, not counted", {}, dict(UNET_CONFIG))
    from p2v_fast.weights.hub import MINI_FOLDER

    folder = MINI_FOLDER if model == "mini" else Path(model).expanduser()
    if folder.is_dir():
        config = folder / "unet" / "config.json"
        if not config.is_file():
            raise InputError(f"model folder '{model}' has no unet/config.json")
        try:
            unet = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"model folder '{model}': unet/config.json is unreadable ({e})") from None
        return Architecture("weights counted from its safetensors headers", _folder_parameters(folder), unet)
    if looks_like_path(model):
        raise InputError(f"model folder '{model}' does not exist")
    label = "SD2-depth's published architecture" + (", not downloaded" if model == DEFAULT_MODEL else
                                                     ", assumed for this hub id; not downloaded")
    params = dict(sd2_depth.PARAMETERS)
    return Architecture(label, params, dict(sd2_depth.SD2_DEPTH_UNET))


def feature_shapes(unet: dict[str, Any], latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """(N_k, C_k) of the injected layers (the self-attention of every transformer block of the
    decoder's cross-attention blocks 1-3) for a latent of (h, w) cells, from the UNet's config:
    as :func:`p2v_fast.nets.attention.feature_shapes` reads them off the built network."""
    h, w = latent_hw
    up = list(unet["up_block_types"])
    widths = list(reversed(unet["block_out_channels"]))
    per_block = int(unet.get("transformer_layers_per_block") or 1)
    shapes = []
    for j, kind in enumerate(up):
        if j == 0 or "CrossAttn" not in kind:
            continue
        scale = 2 ** (len(up) - 1 - j)
        layers = (int(unet["layers_per_block"]) + 1) * per_block
        shapes += [(-(-h // scale) * -(-w // scale), int(widths[j]))] * layers
    return shapes


class _Sized:
    """A stand-in for a stored tensor: only its size."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def numel(self) -> int:
        return self.nbytes

    def element_size(self) -> int:
        return 1


@dataclass
class _Frame:
    index: int
    step: int = 0


@dataclass(frozen=True)
class CallCount:
    """The edit's UNet calls (before memory splits), and its stored features at their peak."""

    ticks: int
    calls: int
    backward: int  # differentiable calls (autograd's guided steps)
    largest: int  # most frames in one call
    largest_backward: int
    peak_feature_bytes: int


def count_edit(cfg: EditConfig, n_frames: int, feature_step_bytes: int, x0_bytes: int) -> CallCount:
    """The edit's calls and its store's peak: the wavefront's (or the sequential loop's)
    admission and call groups, with every call committing stand-ins of one frame's features
    (``feature_step_bytes``, both branches) and x0-hat (``x0_bytes``) as the edit commits them."""
    store = FeatureStore(cfg, n_frames)
    ticks = calls = backward = largest = largest_backward = 0
    feats = [_Sized(feature_step_bytes)]
    x0 = _Sized(x0_bytes)

    def tick(ready: list[_Frame]) -> None:
        nonlocal ticks, calls, backward, largest, largest_backward
        ticks += 1
        for needs_grad, group in call_groups(ready, cfg):
            calls += 1
            largest = max(largest, len(group))
            if needs_grad:
                backward += 1
                largest_backward = max(largest_backward, len(group))
            for st in group:  # as p2v_fast.method.edit.commit
                store.used(st.index, st.step)
                store.put(st.index, st.step, feats if store.wants_features(st.index) else [], x0)  # type: ignore[arg-type]
                st.step += 1

    cap = 1 if cfg.schedule == "sequential" else (cfg.batch_frames or DEFAULT_WAVEFRONT_FRAMES)
    frames = (_Frame(i) for i in range(n_frames))
    if cfg.schedule == "sequential":
        for st in frames:
            while st.step < cfg.steps:
                tick([st])
    else:
        for _ in wavefront_ticks(frames, cfg.steps, cap, tick):
            pass
    return CallCount(ticks, calls, backward, largest, largest_backward, store.peak_bytes)


@dataclass(frozen=True)
class EditPlan:
    """`p2v edit --dry-run`: what the edit will do and need."""

    cfg: EditConfig
    input: Path
    n_frames: int
    size: tuple[int, int]  # (W, H) working size
    output_size: tuple[int, int]
    dtype: str  # the edit's precision, "auto" resolved for the device named
    gpu: bool  # the estimate is for a CUDA GPU (--device is not cpu)
    arch: Architecture
    invert_calls: int
    invert_batch: int  # most frames per inversion call
    edit: CallCount
    memory: dict[str, int] = field(default_factory=dict)  # term -> bytes (see the module docstring)
    peak_one: int = 0  # at one frame per UNet call
    peak_full: int = 0  # at the most frames per call the schedule allows
    peak_invert_one: int = 0  # during the inversion (cache miss), one frame per call
    peak_invert_full: int = 0  # ... its calls as large as --invert-batch (or 16) allows

    def rows(self) -> list[tuple[str, str]]:
        """Label / value lines: the clip, the settings, the calls, the memory."""
        c, (w, h) = self.cfg, self.size
        where = "GPU" if self.gpu else "CPU"
        written = "" if self.output_size == self.size else \
            f", written at {self.output_size[0]}x{self.output_size[1]}"
        guided = f"{c.latent_update} on the first {plural(c.guided_steps, 'step')}" if c.guided_steps else "off"
        mem = self.memory
        calls = f"inversion {self.invert_calls} (none if cached), edit {self.edit.calls}"
        calls += f" ({self.edit.backward} with gradients)" if self.edit.backward else ""
        calls += f" in {plural(self.edit.ticks, 'tick')} ({c.schedule}) of up to {plural(self.edit.largest, 'frame')}"
        terms = f"weights {_gb(mem['weights'])}, stored features {_gb(mem['features'])}, "
        if mem["inversion_copy"]:
            terms += f"{c.invert_dtype} copy for the inversion {_gb(mem['inversion_copy'])}, "
        terms += f"per frame in a call {_gb(mem['per_frame'])}"
        terms += f" ({_gb(mem['per_frame_backward'])} with gradients)" if self.edit.backward else ""
        return [
            ("input", f"'{self.input}': {plural(self.n_frames, 'frame')} at {w}x{h} ({c.resize}){written}"),
            ("model", f"{c.model} ({self.arch.label}), {self.dtype} on the {where}"),
            ("sampling", f"{c.steps} DDIM steps ({c.timestep_grid} timestep grid), guidance {c.guidance_scale:g}, "
                         f"seed {c.seed}, inversion in {c.invert_dtype}"),
            ("method", f"refs {c.refs}, latent update {guided} (delta {c.update_weight:g} at 512x512), "
                       f"depth min-max per {c.depth_norm}"),
            ("UNet calls", calls),
            (f"peak {where} memory", f"~{_gb(self.peak_one)} at 1 frame per UNet call, ~{_gb(self.peak_full)} at "
                                     f"{plural(self.edit.largest, 'frame')} (calls are split to fit the card); "
                                     f"inversion (none if cached) ~{_gb(self.peak_invert_one)} at 1 frame, "
                                     f"~{_gb(self.peak_invert_full)} at {self.invert_batch}"),
            ("of which", terms + " (an estimate: docs/performance.md, 'Before the run')"),
            *([("to need less", ", ".join(self.savings()))] if self.savings() else []),
        ]

    def savings(self) -> list[str]:
        """The options that lower the least memory the run needs, and by how much."""
        mem, out = self.memory, []
        if mem["inversion_copy"]:
            copy = _gb(mem["inversion_copy"])
            out.append(f"--invert-dtype same (no {self.cfg.invert_dtype} copy: inversion -{copy})")
        if self.edit.backward:
            out.append(f"--latent-update detached (-{_gb(mem['per_frame_backward'] - mem['per_frame'])})")
        if mem["captioner"]:
            out.append(f"--source-prompt (no captioner: -{_gb(mem['captioner'])})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"input": str(self.input), "n_frames": self.n_frames, "size": list(self.size),
                "output_size": list(self.output_size), "dtype": self.dtype, "gpu": self.gpu,
                "architecture": self.arch.label, "parameters": self.arch.parameters,
                "invert_calls": self.invert_calls, "edit_calls": self.edit.calls,
                "edit_backward_calls": self.edit.backward, "ticks": self.edit.ticks,
                "memory": self.memory, "peak_one_frame": self.peak_one, "peak_full": self.peak_full,
                "peak_inversion_one_frame": self.peak_invert_one, "peak_inversion_full": self.peak_invert_full}


def _gb(n: int) -> str:
    """Bytes in GiB, or MiB below 1 GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def plan_edit(cfg: EditConfig, input_path: str | Path, preview: bool = False) -> EditPlan:
    """The plan of `p2v edit` with ``cfg`` on ``input_path``: the clip is probed (InputError as
    the edit would raise it), nothing is loaded."""
    from p2v_fast.media.clip_selection import probe_input, select_clip

    input_path = Path(input_path)
    if preview:
        cfg = cfg.replace(max_frames=1)
    selection = select_clip(input_path, cfg, probe_input(input_path, cfg))
    gpu = cfg.device != "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("fp16" if gpu else "fp32")
    arch = architecture(cfg.model)
    n, latent_hw = selection.n_frames, selection.latent_hw
    elem = ELEMENT_BYTES[dtype]
    shapes = feature_shapes(arch.unet, latent_hw)
    step_bytes = sum(2 * tokens * channels for tokens, channels in shapes) * elem  # one frame, one step, 2 branches
    x0_bytes = 4 * latent_hw[0] * latent_hw[1] * 4  # fp32 [1, 4, h, w]
    edit = count_edit(cfg, n, step_bytes, x0_bytes)
    invert_batch = min(n, cfg.invert_batch or MAX_INVERT_BATCH)
    invert_calls = -(-n // invert_batch) * cfg.steps + cfg.steps  # + the reconstruction check's batch-1 calls
    memory, peaks = _memory(cfg, arch, dtype, latent_hw, step_bytes, edit, invert_batch)
    return EditPlan(cfg, input_path, n, selection.size, selection.output_size, dtype, gpu, arch, invert_calls,
                    invert_batch, edit, memory, *peaks)


def _memory(cfg: EditConfig, arch: Architecture, dtype: str, latent_hw: tuple[int, int], step_bytes: int,
            edit: CallCount, invert_batch: int) -> tuple[dict[str, int], tuple[int, int, int, int]]:
    """The memory terms (bytes) and the peaks: the edit's at one frame per call and at full calls,
    the inversion's likewise."""
    p, elem = arch.parameters, ELEMENT_BYTES[dtype]
    shared = p.get("unet", 0) + p.get("vae", 0) + p.get("text_encoder", 0)
    captioner = captioner_parameters(cfg, arch) * elem
    weights = shared * elem + p.get("depth_estimator", 0) * 4 + captioner
    invert_dtype = dtype if cfg.invert_dtype == "same" else "fp32" if cfg.invert_dtype == "tf32" else cfg.invert_dtype
    copy = shared * ELEMENT_BYTES[invert_dtype] if invert_dtype != dtype and cfg.backend == "torch" else 0
    # SD2-depth's figures scaled by the injected features' elements (width x cells): the cells for
    # SD2-depth at another size, and the width too for a narrower UNet (mini, tiny)
    from p2v_fast.weights.sd2_depth import SD2_DEPTH_UNET

    elements = sum(n * c for n, c in feature_shapes(arch.unet, latent_hw))
    scale = elements / sum(n * c for n, c in feature_shapes(SD2_DEPTH_UNET, REFERENCE_HW))
    per_sample = int(ACTIVATION_BYTES["inference"] * scale * elem / 2)
    per_sample_bwd = int(ACTIVATION_BYTES["backward"] * scale * elem / 2)
    refs = 2 * step_bytes  # anchor || previous, both branches
    per_frame = 2 * per_sample + refs
    per_frame_bwd = 2 * per_sample_bwd + refs
    decode = int(DECODE_BYTES * scale * elem / 2)
    base = weights + edit.peak_feature_bytes + decode
    most = per_frame_bwd if edit.backward else per_frame
    peak_one = base + most
    peak_full = base + max(edit.largest * per_frame, edit.largest_backward * per_frame_bwd)
    invert_elem = ELEMENT_BYTES[invert_dtype]
    invert_sample = int(ACTIVATION_BYTES["inference"] * scale * invert_elem / 2)
    memory = {"weights": weights, "captioner": captioner, "inversion_copy": copy,
              "features": edit.peak_feature_bytes, "per_frame": per_frame, "per_frame_backward": per_frame_bwd,
              "decode": decode}
    return memory, (peak_one, peak_full, weights + copy + invert_sample, weights + copy + invert_batch * invert_sample)
