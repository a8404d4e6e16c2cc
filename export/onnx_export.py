"""Export one network to ONNX, clean it, check it, and prove it equals PyTorch.

Each network goes through a wrapper module whose ``forward`` takes and returns every tensor
explicitly (nothing held in a processor is frozen into the graph as a constant). Steps:

1. ``torch.onnx.export`` (TorchScript tracer, named dynamic axes from the spec; or, with
   ``exporter="dynamo"``, torch.export for fixed-size profiles) into a scratch folder. fp16
   graphs come from a model cast to fp16 *before* export: TensorRT 11 networks are strongly
   typed, so the ONNX must carry the types the engine will run in.
2. Clean: Polygraphy's constant folding (needs onnx-graphsurgeon) when installed, else the
   ONNX project's own optimizer (onnxscript: constant folding, dead-code removal, shape
   inference). Weights over protobuf's 2 GB limit go to one external ``.onnx.data`` file.
   Then every graph input and output is checked against the spec (name, order, dtype, shape
   with its dynamic axes): a cleaning tool that fixed an axis fails here, not in ONNX Runtime.
3. ``onnx.checker`` on the *path* (required for graphs with external data).
4. Run the saved graph in ONNX Runtime on the sample inputs and compare every output with the
   wrapper's PyTorch output; :class:`ExportValidationError` names the network, the output and
   the size of the error when it exceeds the spec's tolerance.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2v_fast.errors import EngineError, ExportValidationError, one_line
from p2v_fast.nets.export_options import CLEANERS
from p2v_fast.nets.specs import Geometry, NetworkSpec

#: Graphs whose weights exceed this are saved with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1_800_000_000


# ----------------------------------------------------------------------------------- wrappers


class UNetGraph(nn.Module):
    """``unet``: the cross-frame UNet wrapper with the spec's input order.

    forward(sample [B,5,h,w], timestep [B] fp32, encoder_hidden_states [B,77,D], self_ref [B] fp32,
    *ref_k [B,2N_k,C_k]) -> (noise_pred [B,4,h,w], feat_0 .. feat_8 [B,N_k,C_k]). A sample with
    self_ref != 0 attends to its own features (an elementwise select, no control flow).
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        from p2v_fast.nets.attention import UNetWithFeatures

        self.inner = UNetWithFeatures(unet)

    def forward(self, sample, timestep, encoder_hidden_states, self_ref, *refs):
        return self.inner(sample, timestep, encoder_hidden_states, *refs, self_ref=self_ref)


class VaeEncoderGraph(nn.Module):
    """images [B,3,H,W] in [-1, 1] -> mean latent x scaling factor [B,4,H/8,W/8]."""

    def __init__(self, vae: Any) -> None:  # diffusers AutoencoderKL
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.scaling_factor


class VaeDecoderGraph(nn.Module):
    """latent [B,4,h,w] (scaled) -> images [B,3,8h,8w] in about [-1, 1]."""

    def __init__(self, vae: Any) -> None:  # diffusers AutoencoderKL
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scaling_factor).sample


class DepthGraph(nn.Module):
    """DPT-Hybrid: pixel_values [B,3,S,S] (its processor's normalisation) -> predicted_depth [B,S',S']."""

    def __init__(self, dpt: nn.Module) -> None:
        super().__init__()
        self.dpt = dpt

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.dpt(pixel_values=pixel_values).predicted_depth


def graph_module(name: str, models) -> nn.Module:
    """The wrapper module of network ``name`` over ``models`` (in the models' dtype; DPT fp32)."""
    if name == "unet":
        module: nn.Module = UNetGraph(models.unet)
    elif name == "vae_encoder":
        module = VaeEncoderGraph(models.vae)
    elif name == "vae_decoder":
        module = VaeDecoderGraph(models.vae)
    elif name == "depth":
        module = DepthGraph(models.depth_estimator)
    else:
        raise KeyError(name)
    return module.eval()


# ----------------------------------------------------------------------------------- steps


@dataclass
class OnnxResult:
    path: Path
    data_path: Path | None
    seconds: float
    worst: dict  # {"output", "max_abs", "rel", "tolerance"}
    cleaner: str = ""  # the tool that cleaned the graph


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's tracer warnings (shape-dependent branches that are constant for
    a fixed architecture, e.g. diffusers' upsample-size check)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield




def _torch_export(module: nn.Module, spec: NetworkSpec, inputs: Mapping[str, torch.Tensor], path: Path,
                  opset: int, exporter: str = "torchscript") -> None:
    """``torch.onnx.export`` with the spec's names and dynamic axes.

    ``torchscript`` (the default): the tracer maps the spec's named dynamic axes directly (as
    TensorRT's demo does): batch, height, width and token counts stay dynamic. ``dynamo``
    (torch.export): measured on torch 2.13 with diffusers' UNet, it keeps the batch dynamic but
    specialises height and width (and so every token count) to the traced size, and guards the
    batch below 64 (diffusers' Upsample2D branches on ``shape[0] >= 64``); so it serves
    fixed-size profiles only (see :func:`export.ExportOptions`).
    """
    args = tuple(inputs[n] for n in spec.input_names)
    with _quiet(), torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        elif exporter == "dynamo":
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=_batch_dynamic_shapes(module, spec),
                opset_version=opset,
                dynamo=True,
                external_data=True,
                verbose=False,
            )
        else:
            raise ValueError(f"unknown exporter {exporter!r}")


def _batch_dynamic_shapes(module: nn.Module, spec: NetworkSpec) -> tuple:
    """torch.export ``dynamic_shapes`` for ``module.forward``'s positional parameters: the batch
    axis of every input dynamic (inputs gathered by a ``*args`` parameter form one tuple)."""
    import inspect

    from torch.export import Dim

    per_input = [{axis: Dim.DYNAMIC for axis, name in t.dynamic_axes().items() if name == "B"} for t in spec.inputs]
    params = list(inspect.signature(module.forward).parameters.values())
    shapes: list = []
    for i, p in enumerate(params):
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            shapes.append(tuple(per_input[i:]))
            break
        shapes.append(per_input[i])
    return tuple(shapes)


def _initializer_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)




def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import, a module blocked in sys.modules
        return False


def default_cleaner() -> str:
    """``polygraphy`` when onnx-graphsurgeon and ONNX Runtime (its constant folding needs both: it
    evaluates the foldable subgraphs in ONNX Runtime) are installed, else ``onnxscript``, which
    needs neither: ``[tensorrt]`` alone installs no ONNX Runtime."""
    return "polygraphy" if _installed("onnx_graphsurgeon") and _installed("onnxruntime") else "onnxscript"


def clean_graph(src: Path, dst: Path, tool: str | None = None) -> str:
    """Fold constants and prune ``src`` into ``dst`` (external data when large). Returns the tool used.

    ``tool`` (default :func:`default_cleaner`): ``polygraphy``, Polygraphy's ``fold_constants``
    (onnx-graphsurgeon + ONNX Runtime), with ONNX's own shape inference: ONNX Runtime's, which
    Polygraphy uses by default, turns the token axis of every ``ref_k`` input of ``unet`` into
    a fixed 1 (``['B','m0',64]`` -> ``['B',1,64]``), so it is not allowed; ``onnxscript``, its
    constant folding with onnx_ir's common passes (common subexpressions, identities, unused
    nodes). onnxscript's full ``optimize`` also runs pattern rewrites that cost ~30x more and that
    TensorRT does itself, so it is not used. Graphs over protobuf's limit always take the
    onnxscript path (Polygraphy folds a proto held in memory), and so does ``polygraphy`` where
    ONNX Runtime is not installed (``[tensorrt]`` alone), saying so in the name returned. Either
    way the caller checks the result against the spec (:func:`check_contract`).
    """
    import onnx_ir as ir

    tool = tool or default_cleaner()
    if tool not in CLEANERS:
        raise ValueError(f"unknown cleaning tool {tool!r}")
    model = ir.load(src)
    large = _initializer_bytes(model) > EXTERNAL_DATA_BYTES
    if tool == "polygraphy" and not _installed("onnxruntime"):
        return f"{_clean_onnxscript(model, dst, large)} (polygraphy's folding needs ONNX Runtime, not installed)"
    if tool == "polygraphy" and not large:
        import onnx
        import onnxruntime
        from polygraphy.backend.onnx import fold_constants
        from polygraphy.logger import G_LOGGER

        onnxruntime.set_default_logger_severity(3)  # polygraphy's folding sessions warn per node
        with G_LOGGER.verbosity(G_LOGGER.ERROR):  # its per-pass node counts, on stdout
            proto = fold_constants(onnx.load(str(src)), allow_onnxruntime_shape_inference=False, error_ok=True)
        onnx.save(proto, str(dst))
        return "polygraphy"
    return _clean_onnxscript(model, dst, large)


def _clean_onnxscript(model, dst: Path, large: bool) -> str:
    """onnxscript's constant folding with onnx_ir's common passes (:func:`clean_graph`)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    logging.getLogger("onnxscript.optimizer._constant_folding").setLevel(logging.ERROR)  # BatchNorm notes
    for _ in range(2):  # folding exposes identities and duplicates, whose removal exposes more folding
        onnxscript.optimizer.fold_constants(model)
        for cls in (passes.IdentityEliminationPass, passes.CommonSubexpressionEliminationPass,
                    passes.RemoveUnusedNodesPass, passes.RemoveUnusedOpsetsPass):
            cls()(model)
    for node in model.graph.all_nodes():  # the dynamo exporter's provenance (4.7 MB on the tiny UNet)
        node.metadata_props.clear()
    if not large:  # keep every weight in the one file (an exporter may have written them beside src)
        ir.external_data.load_to_model(model)
    ir.save(model, dst, external_data=f"{dst.name}.data" if large else None)
    return "onnxscript"


#: ONNX element types -> the spec's dtype names.
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool", 3: "int8", 2: "uint8"}


def graph_io(graph) -> dict[str, tuple[str, str, tuple[int | str | None, ...]]]:
    """name -> ("input"|"output", dtype, shape) of an ONNX ``GraphProto``'s inputs and outputs
    (a dim is its value, its name, or None when it has neither). Initializers listed as inputs
    (old exporters) are left out."""
    weights = {i.name for i in graph.initializer}
    io = {}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            if kind == "input" and v.name in weights:
                continue
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
            io[v.name] = (kind, _ONNX_DTYPES.get(t.elem_type, f"onnx type {t.elem_type}"), dims)
    return io


def contract_problem(spec: NetworkSpec, io: Mapping[str, tuple[str, str, tuple]]) -> str | None:
    """What in a graph's inputs/outputs (:func:`graph_io`) breaks the spec's contract: a missing,
    unexpected or reordered tensor, another dtype, another rank, a fixed dim where the spec has a
    dynamic axis or another value; None when it keeps it. A symbolic dim (named or unnamed) may
    stand where the spec has any axis: :func:`check_contract` writes the spec's in."""
    want = [("input", t) for t in spec.inputs] + [("output", t) for t in spec.outputs]
    got_order = [n for n in io if io[n][0] == "input"] + [n for n in io if io[n][0] == "output"]
    if got_order != [t.name for _, t in want]:
        return f"tensors {got_order}, the spec says {[t.name for _, t in want]}"
    for kind, t in want:
        _, dtype, shape = io[t.name]
        if dtype != t.dtype:
            return f"{kind} '{t.name}' is {dtype}, the spec says {t.dtype}"
        bad = len(shape) != len(t.shape) or any(
            isinstance(g, int) and g != s for g, s in zip(shape, t.shape, strict=False))
        if bad:
            return f"{kind} '{t.name}' has shape {list(shape)}, the spec says {list(t.shape)}"
    return None


def check_contract(path: Path, spec: NetworkSpec, tool: str) -> None:
    """After cleaning: every graph input and output keeps its name, order, dtype and shape from
    the spec (:class:`EngineError` naming the first that does not); symbolic dims get the spec's
    axis back: its name, or its value where the spec fixes it (the tracer leaves some output dims
    symbolic, with names like ``Mullatent_dim_1``, that TensorRT and ONNX Runtime would show)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    problem = contract_problem(spec, graph_io(proto.graph))
    if problem is not None:
        raise EngineError(f"{spec.name}: cleaning the graph ({tool}) broke its contract: {problem}")
    renamed = False
    values = {v.name: v for v in (*proto.graph.input, *proto.graph.output)}
    for t in (*spec.inputs, *spec.outputs):
        for d, s in zip(values[t.name].type.tensor_type.shape.dim, t.shape, strict=True):
            if isinstance(s, str) and d.dim_param != s:
                d.dim_param, renamed = s, True
            elif isinstance(s, int) and not d.HasField("dim_value"):
                d.dim_value, renamed = s, True
    if renamed:  # the weights stay where they are (external data is referenced, not rewritten)
        onnx.save(proto, str(path))


def check_graph(path: Path, network: str) -> None:
    """``onnx.checker`` on the path (works for graphs with external data)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # checker raises several types
        raise EngineError(f"{network}: exported ONNX graph fails onnx.checker: {one_line(exc)}") from None


#: What an export check compares: the graph in ONNX Runtime with the wrapper in PyTorch.
VS_PYTORCH = ("ONNX Runtime", "PyTorch")


def output_errors(spec: NetworkSpec, got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
                  sides: tuple[str, str] = VS_PYTORCH) -> dict[str, tuple[float, float]]:
    """Per output: (max |got - want|, max |want|). Errors of slices of one batch combine by
    :func:`merge_errors` into exactly the whole batch's. ``sides``: what ``got`` and ``want``
    come from, for the messages (:class:`ExportValidationError` on another shape or a
    non-finite value)."""
    errors = {}
    for name in spec.output_names:
        a, b = got[name].float().cpu(), want[name].float().cpu()
        if a.shape != b.shape:
            raise ExportValidationError(f"{spec.name}: output '{name}' has shape {tuple(a.shape)} in {sides[0]}, "
                                        f"{tuple(b.shape)} in {sides[1]}")
        if not torch.isfinite(a).all():
            raise ExportValidationError(f"{spec.name}: output '{name}' has non-finite values in {sides[0]}")
        errors[name] = (float((a - b).abs().max()), float(b.abs().max()))
    return errors


def merge_errors(*parts: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The errors of a batch from those of its slices (:func:`output_errors`): the largest of each."""
    merged: dict[str, tuple[float, float]] = {}
    for part in parts:
        for name, (max_abs, max_ref) in part.items():
            old = merged.get(name, (0.0, 0.0))
            merged[name] = (max(old[0], max_abs), max(old[1], max_ref))
    return merged


def judge_errors(spec: NetworkSpec, errors: Mapping[str, tuple[float, float]],
                 sides: tuple[str, str] = VS_PYTORCH) -> dict:
    """The worst output by max |got - want| / max |want|; :class:`ExportValidationError` beyond the
    spec's tolerance, naming both sides (e.g. "TensorRT vs ONNX Runtime max abs diff ...")."""
    worst_name, worst_abs, worst_rel = "", 0.0, -1.0
    for name in spec.output_names:
        max_abs, max_ref = errors[name]
        rel = max_abs / max(max_ref, 1e-6)
        if rel > worst_rel:
            worst_name, worst_abs, worst_rel = name, max_abs, rel
    if worst_rel > spec.tolerance:
        raise ExportValidationError(
            f"{spec.name}: output '{worst_name}' differs by {worst_rel:.2e} of its range: {sides[0]} vs {sides[1]} "
            f"max abs diff {worst_abs:.3g} (tolerance {spec.tolerance:g})"
        )
    return {"output": worst_name, "max_abs": worst_abs, "rel": worst_rel, "tolerance": spec.tolerance}


def compare_outputs(spec: NetworkSpec, got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
                    sides: tuple[str, str] = VS_PYTORCH) -> dict:
    """Worst output by max |got - want| / max |want|; :class:`ExportValidationError` beyond tolerance."""
    return judge_errors(spec, output_errors(spec, got, want, sides), sides)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """PyTorch without TF32 (cuDNN convolutions use it by default; matmuls when allowed), for
    reference runs: an export check compares at 1e-4, and TF32 alone moves fp32 outputs ~1e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def reference_session(path: Path, spec: NetworkSpec, geometry: Geometry, device: torch.device):
    """``path`` in ONNX Runtime as a reference: on ``device`` where ONNX Runtime can bind it,
    with the CUDA provider's TF32 off (the CPU has none)."""
    from p2v_fast.nets.backend_onnx import OnnxSession, ort_device, providers_for

    return OnnxSession(path, spec, geometry, device, providers_for(ort_device(device), tf32=False))


def reference_outputs(module: nn.Module, spec: NetworkSpec, inputs: Mapping[str, torch.Tensor]) -> dict:
    """``module``'s outputs on ``inputs`` by the spec's names, without gradients or TF32."""
    with torch.no_grad(), no_tf32():
        out = module(*(inputs[n] for n in spec.input_names))
    out = out if isinstance(out, tuple) else (out,)
    return dict(zip(spec.output_names, out, strict=True))


def validate_graph(path: Path, spec: NetworkSpec, geometry: Geometry, module: nn.Module,
                   inputs: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    """Run ``path`` in ONNX Runtime and compare with ``module`` on ``inputs`` (TF32 off in both)."""
    got = reference_session(path, spec, geometry, device).run(inputs)
    return compare_outputs(spec, got, reference_outputs(module, spec, inputs))


def export_onnx(spec: NetworkSpec, module: nn.Module, inputs: Mapping[str, torch.Tensor], folder: Path,
                opset: int, device: torch.device, geometry: Geometry, exporter: str = "torchscript",
                cleaner: str | None = None) -> OnnxResult:
    """Export, clean, check and validate ``spec.name`` into ``folder/<name>.onnx``.

    ``inputs`` are the sample inputs (on ``device``, in the spec's dtypes) used to trace and to
    validate. The files appear in ``folder`` only once every step has passed.
    """
    t0 = time.perf_counter()
    scratch = folder / f".tmp-{spec.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        raw, clean = scratch / "raw.onnx", scratch / f"{spec.name}.onnx"
        _torch_export(module, spec, inputs, raw, opset, exporter)
        tool = clean_graph(raw, clean, cleaner)
        check_contract(clean, spec, tool)
        check_graph(clean, spec.name)
        worst = validate_graph(clean, spec, geometry, module, inputs, device)
        final = folder / clean.name
        data = scratch / f"{clean.name}.data"
        final_data = folder / data.name
        if data.exists():
            os.replace(data, final_data)
        else:
            final_data.unlink(missing_ok=True)
        os.replace(clean, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return OnnxResult(final, final_data if final_data.exists() else None, time.perf_counter() - t0, worst, tool)
