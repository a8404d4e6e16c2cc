"""The options of an export (``p2v export``), in one frozen object, validated in one place.

Here rather than in :mod:`export` so that the CLI reads their defaults without loading torch;
:func:`export.export_engines` takes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from p2v_fast.config import DEFAULT_MODEL
from p2v_fast.errors import InputError
from p2v_fast.nets.specs import DEFAULT_OPSET, NETWORKS, PRECISIONS, SIZE_MULTIPLE, ExportProfile

#: The engine folder when none is given (``--engines``).
DEFAULT_ENGINES = Path("engines")
#: "torchscript" (dynamic batch, height and width) or "dynamo" (torch.export: fixed size only).
EXPORTERS = ("torchscript", "dynamo")
#: The ONNX graph cleaners (export.onnx_export.clean_graph).
CLEANERS = ("polygraphy", "onnxscript")
FORMATS = ("onnx", "tensorrt")
#: The widest aspect ratio (W, H) the default profile serves, either way round: 16:9 (an 854x480
#: clip's default crop at --size 512 is 896x512, a 1080x1920 phone clip's 512x896).
WIDEST_DEFAULT = (16, 9)


@dataclass(frozen=True)
class ExportOptions:
    # --- what ---
    model: str = DEFAULT_MODEL  # hub id, local diffusers folder, or "tiny"
    networks: tuple[str, ...] = NETWORKS
    out: Path = DEFAULT_ENGINES  # the engine folder
    format: str = "tensorrt"  # "onnx" (graphs only) or "tensorrt" (graphs + engines)
    precision: str = "fp16"  # UNet and VAE; DPT stays fp32
    opset: int = DEFAULT_OPSET
    # "torchscript" (dynamic batch, height and width) or "dynamo" (torch.export: fixed size only)
    exporter: str = "torchscript"
    # graph cleaning: "polygraphy" or "onnxscript"; None: polygraphy when onnx-graphsurgeon is installed
    cleaner: str | None = None

    # --- shapes: the optimisation profile (opt size = height x width) ---
    height: int = 512
    width: int = 512
    min_size: int | None = None  # smallest height/width the engines accept (None: height/width)
    # Largest. None: the long side of a 16:9 clip at the short side min(height, width) (896 at 512),
    # so the default crop of a landscape or a portrait clip fits (p2v_fast.media.framing.working_size);
    # height/width themselves with --static-batch or the dynamo exporter (one shape).
    max_size: int | None = None
    max_batch: int = 8  # samples per UNet call: frames in flight x 2 CFG branches
    # The batch TensorRT tunes for. None: max_batch, the batch the wavefront sends once frames are
    # in flight (it sends up to 2 x --batch-frames samples per tick, split into calls of max_batch).
    opt_batch: int | None = None
    static_batch: bool = False  # min = opt = max = max_batch (smaller calls are padded; CUDA graphs)

    # --- build ---
    workspace_gb: float | None = None  # TensorRT builder workspace limit (None: TensorRT's default)
    device: str = "auto"  # where PyTorch runs during export: auto, cpu, cuda, cuda:N
    force: bool = False  # redo every stage even when its artifact is current

    def __post_init__(self) -> None:
        _verify(self)

    def default_max_size(self) -> int | None:
        """The largest side the engines accept when ``max_size`` is not given; None: each of
        height and width itself (a fixed size: --static-batch and the dynamo exporter)."""
        if self.static_batch or self.exporter == "dynamo":
            return None
        from p2v_fast.media.framing import working_size

        wide = working_size(*WIDEST_DEFAULT, min(self.height, self.width), SIZE_MULTIPLE, max_side=None)[0]
        return max(self.height, self.width, wide)

    def profile(self) -> ExportProfile:
        """(min, opt, max) of batch, height and width."""
        top = self.max_size if self.max_size is not None else self.default_max_size()
        lo = lambda v: v if self.min_size is None else self.min_size  # noqa: E731
        hi = lambda v: v if top is None else top  # noqa: E731
        opt = min(self.opt_batch or self.max_batch, self.max_batch)
        return ExportProfile(
            batch=(self.max_batch,) * 3 if self.static_batch else (1, opt, self.max_batch),
            height=(lo(self.height), self.height, hi(self.height)),
            width=(lo(self.width), self.width, hi(self.width)),
        )

    def recorded(self) -> dict:
        """The options a rebuild needs (stored in the manifest)."""
        d = asdict(self)
        d["out"], d["networks"] = str(self.out), list(self.networks)
        return d


def _verify(o: ExportOptions) -> None:
    """Raise InputError naming the first bad value."""
    if o.format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}; got {o.format!r}")
    if o.precision not in PRECISIONS:
        raise InputError(f"--dtype must be one of {', '.join(PRECISIONS)}; got {o.precision!r}")
    bad = [n for n in o.networks if n not in NETWORKS]
    if bad or not o.networks:
        raise InputError(f"unknown network {bad[0] if bad else '(none)'!r}; known: {', '.join(NETWORKS)}")
    for name, v in (("height", o.height), ("width", o.width), ("min-size", o.min_size), ("max-size", o.max_size)):
        if v is not None and (v <= 0 or v % SIZE_MULTIPLE):
            raise InputError(f"--{name} must be a positive multiple of {SIZE_MULTIPLE}; got {v}")
    if o.min_size is not None and o.min_size > min(o.height, o.width):
        raise InputError(f"--min-size {o.min_size} is larger than the size {o.height}x{o.width}")
    if o.max_size is not None and o.max_size < max(o.height, o.width):
        raise InputError(f"--max-size {o.max_size} is smaller than the size {o.height}x{o.width}")
    if o.max_batch < 1:
        raise InputError(f"--max-batch must be >= 1; got {o.max_batch}")
    if o.opt_batch is not None and not 1 <= o.opt_batch <= o.max_batch:
        raise InputError(f"--opt-batch must be between 1 and --max-batch ({o.max_batch}); got {o.opt_batch}")
    if o.static_batch and o.opt_batch not in (None, o.max_batch):
        raise InputError(f"--static-batch builds for batch {o.max_batch} only, not --opt-batch {o.opt_batch}")
    if o.exporter not in EXPORTERS:
        raise InputError(f"--exporter must be one of {', '.join(EXPORTERS)}; got {o.exporter!r}")
    if o.exporter == "dynamo" and (o.min_size is not None or o.max_size is not None):
        raise InputError("--exporter dynamo traces one frame size (torch.export specialises the UNet's height and "
                         "width); drop --min-size/--max-size, or use the default torchscript exporter")
    if o.exporter == "dynamo" and o.max_batch > 63:
        raise InputError(f"--exporter dynamo guards the batch below 64 (diffusers' Upsample2D); got --max-batch "
                         f"{o.max_batch}")
    if o.cleaner is not None and o.cleaner not in CLEANERS:
        raise InputError(f"cleaner must be one of {', '.join(CLEANERS)}; got {o.cleaner!r}")
    if not 14 <= o.opset <= 21:
        raise InputError(f"--opset must be between 14 and 21; got {o.opset}")
    if o.workspace_gb is not None and o.workspace_gb <= 0:
        raise InputError(f"--workspace must be > 0 GB; got {o.workspace_gb}")
