"""One spec per exported network: the engine contract (DESIGN.md sec. 2).

A :class:`NetworkSpec` names every input and output, its dtype and its shape with named
dynamic axes; with a model's :class:`Geometry` and an :class:`ExportProfile` it gives the
TensorRT optimisation profile (min/opt/max shape per input), sample inputs for export and
validation, and the shapes a runtime must bind. The same spec object drives the ONNX export,
the TensorRT build and the runtime binding, and is stored in ``manifest.json`` so a runtime
binds by exactly the names and layouts that were exported.

Axis names: ``B`` samples (frames x CFG branches), ``H``/``W`` pixels, ``h``/``w`` latent
cells (pixels / 8), ``n<k>`` tokens of injected layer k (its feature map's cells), ``m<k>`` =
2 ``n<k>`` (anchor || previous). Every axis grows with B, H or W, so the profile's min/opt/max
shapes are the shapes at the min/opt/max of (B, H, W).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from p2v_fast.errors import EngineError, InputError

NETWORKS = ("unet", "vae_encoder", "vae_decoder", "depth")
#: Folders from before the one-graph contract held the UNet twice (same weights); a re-export removes their files.
LEGACY_NETWORKS = ("unet_anchor", "unet_xframe")
PRECISIONS = ("fp16", "fp32")
DEFAULT_OPSET = 18
#: Pixel sizes must be multiples of this (3 VAE downsamplings x 3 UNet downsamplings).
SIZE_MULTIPLE = 64

#: Validation tolerance: max |onnx - torch| / max |torch| per output.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}

# TF32 (TensorRT's default for fp32 layers; PyTorch's cuDNN convolutions and ONNX Runtime's CUDA
# provider use it too) rounds the inputs of convolutions and matrix products to a 10-bit
# mantissa. Emulated on the tiny networks (tests/trt_standin.py, on the CPU) it moves fp32
# outputs by 1.1e-3 (depth) to 1.5e-3 (unet), 10x the fp32 tolerance, and does not touch fp16
# graphs (no fp32 convolution or product is left in them). So each spec says whether TF32 is
# allowed: not in fp32 networks (depth in every precision), whose engines are built with
# BuilderFlag.TF32 cleared; in fp16 networks, whose 2e-2 tolerance covers it. Every reference
# run of an export check (PyTorch, ONNX Runtime) has TF32 off.

Shape = tuple[int, ...]
MinOptMax = tuple[Shape, Shape, Shape]


@dataclass(frozen=True)
class Geometry:
    """The shape facts of one model set that every spec needs (JSON-serialisable).

    SD2-depth: latent_channels 4, unet_in_channels 5, vae_scale 8, text_tokens 77,
    text_dim 1024, feature_scales (4,4,4, 2,2,2, 1,1,1), feature_channels (1280,)*3 +
    (640,)*3 + (320,)*3, DPT-Hybrid 384x384 in and out.
    """

    latent_channels: int
    unet_in_channels: int
    vae_scale: int  # pixels per latent cell
    text_tokens: int
    text_dim: int  # D of encoder_hidden_states
    feature_scales: tuple[int, ...]  # latent cells per feature cell, per injected layer
    feature_channels: tuple[int, ...]  # C_k per injected layer
    depth_in: tuple[int, int]  # DPT input (height, width), fixed
    depth_out: tuple[int, int]  # DPT predicted depth (height, width), fixed

    @property
    def n_layers(self) -> int:
        return len(self.feature_scales)

    def tokens(self, h: int, w: int) -> list[int]:
        """N_k of each injected layer for a latent of h x w cells (ceil division, as the UNet pads)."""
        return [-(-h // s) * -(-w // s) for s in self.feature_scales]

    def dims(self, batch: int, height: int | None = None, width: int | None = None) -> dict[str, int]:
        """Value of every named axis for ``batch`` samples at ``height`` x ``width`` pixels."""
        dims = {"B": batch}
        if height is not None and width is not None:
            h, w = height // self.vae_scale, width // self.vae_scale
            dims.update(H=height, W=width, h=h, w=w)
            for k, n in enumerate(self.tokens(h, w)):
                dims[f"n{k}"] = n
                dims[f"m{k}"] = 2 * n
        return dims

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> Geometry:
        tuples = ("feature_scales", "feature_channels", "depth_in", "depth_out")
        kwargs: dict[str, Any] = {k: tuple(v) if k in tuples else int(v) for k, v in d.items()}
        return cls(**kwargs)


@dataclass(frozen=True)
class ExportProfile:
    """Batch and pixel ranges (min, opt, max) the engines must accept."""

    batch: tuple[int, int, int] = (1, 2, 8)
    height: tuple[int, int, int] = (512, 512, 512)
    width: tuple[int, int, int] = (512, 512, 512)

    def __post_init__(self) -> None:
        for name, (lo, opt, hi) in (("batch", self.batch), ("height", self.height), ("width", self.width)):
            if not 1 <= lo <= opt <= hi:
                raise InputError(f"{name} range must satisfy 1 <= min <= opt <= max; got {lo}/{opt}/{hi}")
        for name, values in (("height", self.height), ("width", self.width)):
            bad = [v for v in values if v % SIZE_MULTIPLE]
            if bad:
                raise InputError(f"{name} {bad[0]} is not a multiple of {SIZE_MULTIPLE}")

    @property
    def fixed_size(self) -> bool:
        return self.height[0] == self.height[2] and self.width[0] == self.width[2]

    def contains(self, batch: int, height: int | None = None, width: int | None = None) -> bool:
        ok = self.batch[0] <= batch <= self.batch[2]
        if height is not None and width is not None:
            ok = ok and self.height[0] <= height <= self.height[2] and self.width[0] <= width <= self.width[2]
        return ok

    def describe(self) -> str:
        """'batch 1-8 at 512x512' or 'batch 1-8 at 256-768 x 256-768' (height x width)."""

        def rng(v: tuple[int, int, int]) -> str:
            return str(v[0]) if v[0] == v[2] else f"{v[0]}-{v[2]}"

        size = f"{rng(self.height)}x{rng(self.width)}" if self.fixed_size else f"{rng(self.height)} x {rng(self.width)}"
        return f"batch {rng(self.batch)} at {size}"

    def to_dict(self) -> dict:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width)}

    @classmethod
    def from_dict(cls, d: Mapping) -> ExportProfile:
        return cls(batch=tuple(d["batch"]), height=tuple(d["height"]), width=tuple(d["width"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype ("float16"/"float32"), shape (int = fixed, str = axis)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def resolve(self, dims: Mapping[str, int]) -> Shape:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class NetworkSpec:
    """Inputs, outputs and validation tolerance of one exported network."""

    name: str
    precision: str  # what was asked; ``depth`` is fp32 whatever this says
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: float
    spatial: bool = True  # H/W axes follow the export profile (False: fixed size, e.g. DPT)
    tf32: bool = False  # TF32 allowed in its fp32 layers (TensorRT's BuilderFlag.TF32); see TOLERANCE
    notes: str = field(default="", compare=False)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in (*self.inputs, *self.outputs):
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``dynamic_axes`` for ``torch.onnx.export``: the named axes of every input and output."""
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def dims(self, geometry: Geometry, batch: int, height: int | None, width: int | None) -> dict[str, int]:
        return geometry.dims(batch, height, width) if self.spatial else geometry.dims(batch)

    def input_shapes(self, dims: Mapping[str, int]) -> dict[str, Shape]:
        return {t.name: t.resolve(dims) for t in self.inputs}

    def output_shapes(self, dims: Mapping[str, int]) -> dict[str, Shape]:
        return {t.name: t.resolve(dims) for t in self.outputs}

    def profile_shapes(self, geometry: Geometry, profile: ExportProfile) -> dict[str, MinOptMax]:
        """TensorRT optimisation profile: (min, opt, max) shape of every input."""
        at = [
            self.dims(geometry, profile.batch[i], profile.height[i], profile.width[i]) for i in range(3)
        ]
        return {t.name: (t.resolve(at[0]), t.resolve(at[1]), t.resolve(at[2])) for t in self.inputs}

    def bind(self, geometry: Geometry, shapes: Mapping[str, Shape]) -> dict[str, int]:
        """Solve the named axes from concrete input shapes and check every input against them.

        Returns the axis values (``B``, ``H``, ``W``, ...). Raises :class:`EngineError` naming the
        input for a missing or unexpected name, a wrong rank, or a shape inconsistent with the
        others (e.g. a ``ref_k`` whose token count does not match ``sample``'s size).
        """
        missing = [n for n in self.input_names if n not in shapes]
        extra = [n for n in shapes if n not in self.input_names]
        if missing or extra:
            what = f"missing {missing}" if missing else f"unexpected {extra}"
            raise EngineError(f"{self.name}: inputs do not match the engine contract ({what})")
        seen: dict[str, int] = {}
        for t in self.inputs:
            shape = tuple(int(d) for d in shapes[t.name])
            if len(shape) != len(t.shape):
                raise EngineError(f"{self.name}: input '{t.name}' has rank {len(shape)}, expected {len(t.shape)}")
            for axis, value in zip(t.shape, shape, strict=True):
                if isinstance(axis, str) and axis in ("B", "H", "W", "h", "w"):
                    seen.setdefault(axis, value)
        batch = seen.get("B")
        if batch is None:
            raise EngineError(f"{self.name}: no input carries the batch axis")
        height = seen.get("H", seen["h"] * geometry.vae_scale if "h" in seen else None)
        width = seen.get("W", seen["w"] * geometry.vae_scale if "w" in seen else None)
        dims = self.dims(geometry, batch, height, width)
        for t in self.inputs:
            want, got = t.resolve(dims), tuple(int(d) for d in shapes[t.name])
            if want != got:
                at = f"batch {batch}" + (f" at {height}x{width}" if self.spatial else "")
                raise EngineError(f"{self.name}: input '{t.name}' has shape {got}; expected {want} for {at}")
        return dims

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "precision": self.precision,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "tolerance": self.tolerance,
            "spatial": self.spatial,
            "tf32": self.tf32,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> NetworkSpec:
        return cls(
            name=d["name"],
            precision=d["precision"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            tolerance=float(d["tolerance"]),
            spatial=bool(d.get("spatial", True)),
            tf32=bool(d.get("tf32", False)),
        )


def _float(precision: str) -> str:
    return "float16" if precision == "fp16" else "float32"


def network_spec(name: str, geometry: Geometry, precision: str) -> NetworkSpec:
    """The spec of network ``name`` for a model of this geometry at this precision."""
    if precision not in PRECISIONS:
        raise InputError(f"--dtype must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    g, f = geometry, _float(precision)
    tol = TOLERANCE[precision]
    if name == "unet":  # one graph for every frame: the anchor's samples select their own features
        inputs = [
            TensorSpec("sample", f, ("B", g.unet_in_channels, "h", "w")),  # 4 latent + 1 depth channel
            TensorSpec("timestep", "float32", ("B",)),  # per-sample timesteps (wavefront batches)
            TensorSpec("encoder_hidden_states", f, ("B", g.text_tokens, g.text_dim)),
            # Per-sample selector, 1 = attend to its own features ([h, h] in place of ref_k), 0 = to
            # ref_k. fp32 whatever the precision, like timestep: TensorRT 10/11 networks are strongly
            # typed (no implicit casts), and an fp32 input compared with 0 gives the BOOL condition
            # of the select with no cast in the graph; it can never be taken for a shape tensor (an
            # integer input can), and the runtime binds the same float32 [B] tensor the edit loop
            # builds, for fp16 and fp32 engines alike.
            TensorSpec("self_ref", "float32", ("B",)),
        ]
        # anchor || previous features of the same step and CFG branch (ignored where self_ref = 1)
        inputs += [TensorSpec(f"ref_{k}", f, ("B", f"m{k}", c)) for k, c in enumerate(g.feature_channels)]
        outputs = [TensorSpec("noise_pred", f, ("B", g.latent_channels, "h", "w"))]
        outputs += [TensorSpec(f"feat_{k}", f, ("B", f"n{k}", c)) for k, c in enumerate(g.feature_channels)]
        return NetworkSpec(name, precision, tuple(inputs), tuple(outputs), tol, tf32=precision == "fp16")
    if name == "vae_encoder":  # images in [-1, 1] -> latent mean x scaling factor
        return NetworkSpec(
            name, precision,
            (TensorSpec("images", f, ("B", 3, "H", "W")),),
            (TensorSpec("latent", f, ("B", g.latent_channels, "h", "w")),),
            tol, tf32=precision == "fp16",
        )
    if name == "vae_decoder":  # scaled latent -> images in [-1, 1]
        return NetworkSpec(
            name, precision,
            (TensorSpec("latent", f, ("B", g.latent_channels, "h", "w")),),
            (TensorSpec("images", f, ("B", 3, "H", "W")),),
            tol, tf32=precision == "fp16",
        )
    if name == "depth":  # DPT-Hybrid: fp32 always (its batch norms), fixed input size
        return NetworkSpec(
            name, precision,
            (TensorSpec("pixel_values", "float32", ("B", 3, *g.depth_in)),),
            (TensorSpec("predicted_depth", "float32", ("B", *g.depth_out)),),
            TOLERANCE["fp32"],
            spatial=False,
        )
    raise InputError(f"unknown network {name!r}; known: {', '.join(NETWORKS)}")


def network_specs(geometry: Geometry, precision: str, names: tuple[str, ...] = NETWORKS) -> dict[str, NetworkSpec]:
    return {n: network_spec(n, geometry, precision) for n in names}


def geometry_of(models) -> Geometry:
    """Read the :class:`Geometry` of a loaded model set (``p2v_fast.weights.models.Models``).

    The DPT sizes come from one run of its image processor and model on a blank frame (DPT-Hybrid
    only runs at its configured size).
    """
    import numpy as np
    import torch

    from p2v_fast.nets.attention import injected_layer_names

    unet = models.unet
    modules = dict(unet.named_modules())
    names = injected_layer_names(unet)
    n_up = len(unet.up_blocks)
    # as p2v_fast.nets.attention.feature_shapes: up_blocks.j runs at latent / 2**(n_up - 1 - j)
    scales = tuple(2 ** (n_up - 1 - int(n.split(".")[1])) for n in names)
    channels = tuple(int(modules[n].to_q.in_features) for n in names)
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    pixel_values = models.feature_extractor(images=[blank], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pred = models.depth_estimator(pixel_values=pixel_values.to(models.device, torch.float32)).predicted_depth
    return Geometry(
        latent_channels=int(models.vae.config.latent_channels),
        unet_in_channels=int(unet.config.in_channels),
        vae_scale=int(models.vae_scale_factor),
        text_tokens=int(models.tokenizer.model_max_length),
        text_dim=int(models.text_encoder.config.hidden_size),
        feature_scales=scales,
        feature_channels=channels,
        depth_in=(int(pixel_values.shape[-2]), int(pixel_values.shape[-1])),
        depth_out=(int(pred.shape[-2]), int(pred.shape[-1])),
    )


def sample_inputs(spec: NetworkSpec, dims: Mapping[str, int], device="cpu", seed: int = 0) -> dict:
    """Random inputs of the spec's shapes and dtypes, in each input's natural range.

    sample/latents ~ N(0, 1), images and DPT input ~ U(-1, 1), timesteps spread over [1, 999],
    text embeddings and reference features ~ N(0, 1) (post-LayerNorm scale), ``self_ref``
    1, 0, 1, ... (anchor-like and cross-frame samples in one batch).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in spec.inputs:
        shape = t.resolve(dims)
        if t.name == "timestep":
            x = torch.linspace(999, 1, shape[0]).round()
        elif t.name == "self_ref":  # a mixed batch: even samples attend to themselves, odd ones to ref_k
            x = (torch.arange(shape[0]) % 2 == 0).float()
        elif t.name in ("images", "pixel_values"):
            x = torch.rand(shape, generator=g) * 2 - 1
        else:
            x = torch.randn(shape, generator=g)
        out[t.name] = x.to(device=device, dtype=getattr(torch, t.dtype))
    return out
