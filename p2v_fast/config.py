"""The options of an edit, in one frozen object, validated in one place."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2v_fast.errors import InputError

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-depth"
LATENT_UPDATES = ("autograd", "detached", "off")
REFS = ("anchor+prev", "anchor", "prev", "none")
#: Which self-attention layers get cross-frame attention: the decoder's 9 (the paper's choice) or
#: every one, encoder and bottleneck too (the paper's Table 3 ablation; PyTorch backend only).
INJECTIONS = ("decoder", "all")
DEPTH_NORMS = ("frame", "clip")
DTYPES = ("fp32", "fp16", "bf16")
# "tf32": fp32 weights and tensors, TF32 tensor-core matmuls and convolutions (CUDA only);
# "same": the edit's --dtype
INVERT_DTYPES = (*DTYPES, "tf32", "same")
RESIZES = ("crop", "stretch", "pad")
#: --output-size: the edit written at the input's size (resampled from the working size) or at the working size.
OUTPUT_SIZES = ("input", "working")
BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")
SCHEDULES = ("sequential", "wavefront")
#: DDIM's timestep grid: "model" (the model's scheduler config; SD2: "leading" spacing, steps_offset 1, so
#: 981, 961, ..., 1 at 50 steps) or "authors" (the authors' code builds its DDIMScheduler with steps_offset 0:
#: 980, 960, ..., 0; p2v_fast.method.ddim.DDIMSchedule)
TIMESTEP_GRIDS = ("model", "authors")
#: The CLIP model and the optical flows of the paper's metrics (p2v_fast.quality.metrics; p2v eval, p2v ablate).
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
#: The captioner of a missing --source-prompt (--captioner; a model folder's own captioner/ first).
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
FLOW_METHODS = ("dis", "raft")
#: Most CPU threads --threads takes (torch.set_num_threads overflows far above; more than the
#: cores only oversubscribes them).
MAX_THREADS = 1024
#: Frame rates an image folder may play at (--fps): below 0.01 fps the rate's fraction underflows.
FPS_RANGE = (0.01, 1000.0)
#: Most frames per inversion call when ``--invert-batch`` is not given (p2v_fast.method.inversion).
MAX_INVERT_BATCH = 16
# delta is given at 512x512 (a 64x64 latent); see EditConfig.update_weight.
REFERENCE_LATENT_PIXELS = 64 * 64
#: --guidance-scale's range: CFG past a few tens only saturates (the paper: 7.5); 1e308 made every
#: latent inf and the video black.
GUIDANCE_SCALE_RANGE = (1.0, 100.0)
#: Largest --update-weight: 1000x the paper's delta, room for the autograd form (weaker than the
#: detached one at the same delta, DESIGN.md sec. 1.6); 1e30 made frames 2-N black.
MAX_UPDATE_WEIGHT = 1e5


@dataclass(frozen=True)
class EditConfig:
    # --- prompts ---
    prompt: str = ""  # target prompt P'
    source_prompt: str | None = None  # inversion prompt; None: BLIP caption of the first frame
    # what captions it: a hub id or folder; None: the model folder's captioner/ (mini, tiny), else
    # DEFAULT_CAPTIONER; "none": no captioner (then source_prompt is required)
    captioner: str | None = None
    negative_prompt: str = ""  # replaces the empty unconditional prompt of CFG

    # --- model and runtime ---
    model: str = DEFAULT_MODEL  # hub id, local diffusers folder, or "tiny"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # "auto" (fp16 on CUDA, fp32 on CPU), "fp32", "fp16", "bf16"
    # DDIM inversion's precision. It runs once per clip and is cached, and its error accumulates
    # over every step, so fp32 by default whatever --dtype is (graph backends with fp16 graphs
    # invert on PyTorch in fp32); "same": the edit's dtype and backend.
    invert_dtype: str = "fp32"
    backend: str = "torch"  # runtime of the networks (see p2v_fast.nets.backends)
    engines: Path | None = None  # folder of exported graphs / engines for non-torch backends
    cache_dir: Path | None = None  # inversion cache and tiny models; None: $P2V_CACHE or ~/.cache

    # --- frames ---
    size: int = 512  # short side of the working size, a multiple of 64
    # How a frame becomes a working frame (p2v_fast.media.framing.frame_geometry): "crop" (short side
    # --size, long side the nearest multiple of 64 to the aspect ratio, centre-cropped), "stretch"
    # (squashed to --size x --size, as the paper and its code do), "pad" (fitted inside
    # --size x --size, letterboxed; the output is the frame without its padding)
    resize: str = "crop"
    # The size the edit is written at (p2v_fast.media.framing.output_frame): "input" (the clip's own,
    # resampled from the working size; crop: the cropped region at the clip's scale) or "working"
    output_size: str = "input"
    start: int = 0  # first source frame
    max_frames: int | None = None  # at most this many frames (after stride)
    stride: int = 1  # take every stride-th frame
    fps: float | None = None  # frame rate of an image-folder input (None: 24); a video keeps its own

    # --- sampling (paper: 50 DDIM steps, CFG 7.5) ---
    steps: int = 50
    timestep_grid: str = "model"  # TIMESTEP_GRIDS: the model's own (default) or the authors' code's
    guidance_scale: float = 7.5
    seed: int = 0
    depth_norm: str = "frame"  # "frame" (paper) or "clip" (one min/max for the whole clip)

    # --- scheduling (DESIGN.md sec. 3): same result, different batching ---
    # wavefront (default; equal to sequential up to float reassociation, tests/test_edit_schedule.py)
    # or sequential (Algorithm 1 as written, one frame at a time)
    schedule: str = "wavefront"
    # wavefront: at most this many frames in flight. None: up to 16, each tick's frames in UNet
    # calls of as many frames as fit in memory (measured: p2v_fast.nets.memory.CallBudget)
    batch_frames: int | None = None
    invert_batch: int | None = None  # frames per UNet call during inversion; None: up to 16, as fit
    # budget in bytes for what one process holds on the device (--max-memory): UNet calls are
    # split so that the edit and the inversion stay under it (CUDA: bytes tensors hold; CPU: the
    # resident set); None: what the device has (within torch.cuda.set_per_process_memory_fraction)
    max_memory: int | None = None

    # --- PyTorch speed-ups (torch backend and autograd steps); results equal up to float error ---
    compile: bool = False  # torch.compile the UNet (CUDA graphs via mode="reduce-overhead" on GPU)
    channels_last: bool = False  # channels-last memory format for the UNet
    cuda_graph: bool = False  # tensorrt backend: replay each engine as a CUDA graph (static-shape engines)
    # PyTorch's CPU threads for the run; None: its default, one per physical core (OpenMP's idle
    # threads wait passively either way: cpu_policy, applied by import p2v_fast; docs/performance.md, "CPU threads")
    threads: int | None = None

    # --- Pix2Video (sec. 3.1, 3.2) ---
    refs: str = "anchor+prev"  # K/V source of the 9 decoder self-attention layers
    inject: str = "decoder"  # those 9 layers, or "all" self-attention layers (Table 3; torch backend)
    # "detached" (the authors' code; as good as "autograd" at 2/3 of its time: docs/method.md), "autograd", "off"
    latent_update: str = "detached"
    update_steps: int | None = None  # guided update on the first N steps; None: steps // 2 (paper: 25 of 50)
    # delta of eq. 1 at 512x512. g is a mean over the latent's elements, so its gradient shrinks
    # as 1/N; the delta applied is update_weight * N / (64*64) so that the per-element update does
    # not depend on the resolution.
    update_weight: float = 100.0

    def __post_init__(self) -> None:
        _verify(self)

    def replace(self, **changes: object) -> EditConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **overrides: Any) -> EditConfig:
        """The config a command's parameters describe, in one move: every entry of ``options``
        (e.g. the command's ``locals()``) that names a field, the others (its input, output,
        ``--json``, ...) left out; then ``overrides`` (a value the command converts or fixes)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in options.items() if k in fields}, **overrides})

    @property
    def guided_steps(self) -> int:
        """Number of leading steps with the guided latent update."""
        if self.latent_update == "off":
            return 0
        return self.steps // 2 if self.update_steps is None else self.update_steps

    def effective_delta(self, latent_hw: tuple[int, int]) -> float:
        h, w = latent_hw
        return self.update_weight * (h * w) / REFERENCE_LATENT_PIXELS


#: The environment of every run's CPU threads (:func:`cpu_policy`): OpenMP's idle threads sleep
#: instead of spinning for CPU time that other threads, or other processes, need (on a busy CPU a
#: tiny edit ran 6-27x slower without it: docs/performance.md, "CPU threads"); the tokenizers
#: library starts no thread pool of its own.
CPU_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
#: What the first :func:`cpu_policy` call (``import p2v_fast``) found: "late" if torch had loaded
#: OpenMP before, with OMP_WAIT_POLICY unset (a later call cannot tell: the variable is set by then).
_state: dict[str, bool] = {}


def cpu_policy() -> None:
    """Set :data:`CPU_POLICY` in the environment where it is unset (a setting of the user's wins).

    The one thread policy of the CLI and the library: ``import p2v_fast`` applies it (OpenMP reads
    ``OMP_WAIT_POLICY`` once, when torch loads, so it must come before ``import torch``), and
    ``cli.main`` calls it too. The thread count is each run's ``threads`` (None: PyTorch's
    default, one per physical core), applied by ``edit_video``/``invert_video`` either way.
    """
    _state.setdefault("late", "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ)
    for name, value in CPU_POLICY.items():
        os.environ.setdefault(name, value)


def warn_if_policy_late() -> None:
    """A RuntimeWarning (once) if torch was imported before p2v_fast with ``OMP_WAIT_POLICY``
    unset: OpenMP's idle threads then spin, and the library cannot change that any more."""
    if _state.get("late"):
        _state["late"] = False
        warnings.warn("torch was imported before p2v_fast with OMP_WAIT_POLICY unset, so OpenMP's idle threads "
                      "spin (several times slower on a busy CPU); import p2v_fast first, or set "
                      "OMP_WAIT_POLICY=PASSIVE before starting Python", RuntimeWarning, stacklevel=3)


#: ``--paper``: the configuration of the paper's Table 2 as the authors' public code runs it
#: (github.com/duyguceylan/pix2video: code/test_cfg.py, video_model_cross_frame_attn.py, file_utils.py):
#: fp32 pipeline, frames resized to 512x512 without keeping the aspect ratio, 50 DDIM steps on a
#: scheduler built with steps_offset 0, CFG 7.5, the latent update on steps 0-25 (``if i > 25:
#: weight = 0``, so 26 steps where the paper says 25) with delta 100 applied to x0-hat's gradient
#: with eps held fixed (``detached``), anchor and previous frame as attention references, depth
#: min-max per frame. Options given beside ``--paper`` win over these (README, "The paper's
#: configuration").
PAPER: dict[str, Any] = {
    "latent_update": "detached", "update_steps": 26, "update_weight": 100.0, "timestep_grid": "authors",
    "resize": "stretch", "size": 512, "dtype": "fp32", "invert_dtype": "fp32", "steps": 50, "guidance_scale": 7.5,
    "refs": "anchor+prev", "depth_norm": "frame",
}


def paper_options(given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`PAPER`'s settings but those in ``given`` (the options the user gave explicitly, by
    field name, with their values), which win. The authors' code guides steps 0-25 whatever the
    number of steps, so with fewer than 26 ``--steps`` every step is guided."""
    given = given or {}
    preset = {**PAPER, "update_steps": min(PAPER["update_steps"], given.get("steps", PAPER["steps"]))}
    return {k: v for k, v in preset.items() if k not in given}


def check_threads(n: int | None) -> None:
    """InputError unless ``n`` (--threads) is None or 1..MAX_THREADS."""
    if n is not None and n < 1:
        raise InputError(f"--threads must be >= 1; got {n}")
    if n is not None and n > MAX_THREADS:
        raise InputError(f"--threads must be at most {MAX_THREADS}; got {n}")


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    """``value``, or InputError naming ``option`` (e.g. ``--refs``) and its choices."""
    if value not in choices:
        raise InputError(f"{option} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    check_choice(f"--{name}", value, choices)


def _verify(c: EditConfig) -> None:
    """Raise InputError naming the first bad value."""
    _choice("latent-update", c.latent_update, LATENT_UPDATES)
    if c.captioner == "none" and c.source_prompt is None:
        raise InputError("--captioner none needs --source-prompt (the inversion prompt: what the input shows)")
    _choice("refs", c.refs, REFS)
    _choice("inject", c.inject, INJECTIONS)
    if c.inject != "decoder" and c.backend in ("onnxruntime", "tensorrt"):
        raise InputError(f"--inject {c.inject} runs on --backend torch: the engines hold the decoder's 9 layers")
    _choice("depth-norm", c.depth_norm, DEPTH_NORMS)
    _choice("backend", c.backend, BACKENDS)
    _choice("schedule", c.schedule, SCHEDULES)
    _choice("timestep-grid", c.timestep_grid, TIMESTEP_GRIDS)
    check_threads(c.threads)
    if c.cuda_graph and c.backend not in ("tensorrt", "auto"):
        raise InputError(f"--cuda-graph is for --backend tensorrt, not {c.backend} (PyTorch: --compile)")
    if c.batch_frames is not None and c.batch_frames < 1:
        raise InputError(f"--batch-frames must be >= 1; got {c.batch_frames}")
    if c.invert_batch is not None and c.invert_batch < 1:
        raise InputError(f"--invert-batch must be >= 1; got {c.invert_batch}")
    if c.max_memory is not None and c.max_memory < 2**20:
        raise InputError(f"--max-memory must be at least 1 MiB; got {c.max_memory} bytes")
    if c.dtype != "auto":
        _choice("dtype", c.dtype, DTYPES)
    _choice("invert-dtype", c.invert_dtype, INVERT_DTYPES)
    if c.invert_dtype == "tf32" and c.device == "cpu":
        raise InputError("--invert-dtype tf32 is TF32 tensor-core math on a CUDA GPU; on the CPU use fp32")
    _choice("resize", c.resize, RESIZES)
    _choice("output-size", c.output_size, OUTPUT_SIZES)
    if c.size <= 0 or c.size % 64:
        raise InputError(f"--size must be a positive multiple of 64; got {c.size}")
    if c.start < 0:
        raise InputError(f"--start must be >= 0; got {c.start}")
    if c.max_frames is not None and c.max_frames < 1:
        raise InputError(f"--max-frames must be >= 1; got {c.max_frames}")
    if c.stride < 1:
        raise InputError(f"--stride must be >= 1; got {c.stride}")
    if not 1 <= c.steps <= 500:
        raise InputError(f"--steps must be between 1 and 500; got {c.steps}")
    if c.update_steps is not None and not 0 <= c.update_steps <= c.steps:
        raise InputError(f"--update-steps must be between 0 and --steps ({c.steps}); got {c.update_steps}")
    lo, hi = GUIDANCE_SCALE_RANGE
    if not math.isfinite(c.guidance_scale) or not lo <= c.guidance_scale <= hi:
        raise InputError(f"--guidance-scale must be a finite number from {lo:g} to {hi:g}; got {c.guidance_scale}")
    if not math.isfinite(c.update_weight) or not 0 <= c.update_weight <= MAX_UPDATE_WEIGHT:
        raise InputError(f"--update-weight must be a finite number from 0 to {MAX_UPDATE_WEIGHT:g}; "
                         f"got {c.update_weight}")
    if not 0 <= c.seed < 2**64:
        raise InputError(f"--seed must be between 0 and 2**64 - 1; got {c.seed}")
    if c.fps is not None and not (math.isfinite(c.fps) and FPS_RANGE[0] <= c.fps <= FPS_RANGE[1]):
        raise InputError(f"--fps must be a frame rate between {FPS_RANGE[0]:g} and {FPS_RANGE[1]:g}; got {c.fps}")
    if not c.model.strip():
        raise InputError("--model must not be empty")


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device ``--device`` names: "auto" (CUDA if available, else the CPU), "cpu",
    "cuda" or "cuda:N" (or a ``torch.device``); InputError if it is none of them or this machine
    lacks it."""
    import torch

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name!r}: CUDA is not available on this machine (see `p2v info`)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
