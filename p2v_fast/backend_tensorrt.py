"""TensorRT backend: a thin runner over the engines ``p2v export --format tensorrt`` builds.

TensorRT 10/11 runtime API: deserialize the engine, ``set_input_shape`` and
``set_tensor_address`` per named tensor, ``execute_async_v3`` on the current torch CUDA stream,
with torch CUDA tensors as the buffers (outputs preallocated at the shapes the context
reports). The pure logic (profile selection, name/dtype/shape binding, manifest checks) is in
functions that need no TensorRT, so it is tested on machines without it.

Refusals, each one line naming the ``p2v export`` command that fixes it: no TensorRT or no
CUDA here, engines built with another TensorRT version or for another GPU architecture, for
another model, truncated engine files, a frame size or batch outside the engines' profile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from p2v_fast.errors import BackendUnavailableError, EngineError
from p2v_fast.graph_backend import GraphBackend, engines_folder, load_checked_manifest
from p2v_fast.manifest import Machine, check_files, check_machine, check_size, rebuild_command, this_machine
from p2v_fast.specs import Geometry, MinOptMax, NetworkSpec, Shape
from p2v_fast.system import import_tensorrt

# ------------------------------------------------------------------------------ pure logic


def fits(shape: Shape, lo: Shape, hi: Shape) -> bool:
    return len(shape) == len(lo) == len(hi) and all(a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True))


def select_profile(profiles: Sequence[Mapping[str, MinOptMax]], shapes: Mapping[str, Shape]) -> int | None:
    """Index of the first optimisation profile whose [min, max] range holds every input shape."""
    for i, profile in enumerate(profiles):
        if all(name in profile and fits(tuple(shape), profile[name][0], profile[name][2])
               for name, shape in shapes.items()):
            return i
    return None


def check_io(spec: NetworkSpec, engine_io: Mapping[str, tuple[str, str]]) -> None:
    """The engine's IO tensors (name -> ("input"|"output", dtype)) are exactly the spec's."""
    want = {t.name: ("input", t.dtype) for t in spec.inputs} | {t.name: ("output", t.dtype) for t in spec.outputs}
    if set(want) != set(engine_io):
        missing, extra = sorted(set(want) - set(engine_io)), sorted(set(engine_io) - set(want))
        raise EngineError(f"{spec.name} engine tensors differ from the spec (missing {missing}, unexpected {extra})")
    for name, (mode, dtype) in want.items():
        if engine_io[name] != (mode, dtype):
            raise EngineError(f"{spec.name} engine tensor '{name}' is {engine_io[name]}, the spec says {(mode, dtype)}")


def output_shapes(spec: NetworkSpec, geometry: Geometry, shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """Shapes of the outputs for these input shapes, as the spec derives them."""
    return spec.output_shapes(spec.bind(geometry, shapes))


def batch_and_size(spec: NetworkSpec, geometry: Geometry, shapes: Mapping[str, Shape]) -> tuple[int, int | None,
                                                                                                 int | None]:
    """(batch, height, width) in pixels of a call (height/width None for fixed-size networks)."""
    dims = spec.bind(geometry, shapes)
    return dims["B"], dims.get("H"), dims.get("W")


# ------------------------------------------------------------------------------ runtime


def _dtype_names(trt) -> dict:
    """TensorRT DataType -> the spec's dtype names."""
    names = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "BF16": "bfloat16",
             "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}
    return {getattr(trt.DataType, k): v for k, v in names.items() if hasattr(trt.DataType, k)}


class EngineRunner:
    """One deserialized engine and its execution context."""

    def __init__(self, trt, runtime, path: Path, spec: NetworkSpec, geometry: Geometry, hint: str) -> None:
        self.spec, self.geometry, self.path, self.hint = spec, geometry, path, hint
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT cannot load '{path}' (corrupt, or built by another TensorRT); rebuild: {hint}")
        self.context = self.engine.create_execution_context()
        dtypes = _dtype_names(trt)
        io = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = "input" if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            io[name] = (mode, dtypes.get(self.engine.get_tensor_dtype(name), "?"))
        check_io(spec, io)
        self.profiles: list[dict[str, MinOptMax]] = []
        for p in range(self.engine.num_optimization_profiles):
            profile = {}
            for t in spec.inputs:
                lo, opt, hi = (tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(t.name, p))
                profile[t.name] = (lo, opt, hi)
            self.profiles.append(profile)
        self.active_profile = 0

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {n: tuple(t.shape) for n, t in feeds.items()}
        expected = output_shapes(self.spec, self.geometry, shapes)  # also checks the inputs agree
        profile = select_profile(self.profiles, shapes)
        if profile is None:
            raise EngineError(f"{self.spec.name}: input shapes {dict(shapes)} are outside the engine's profile; "
                              f"rebuild: {self.hint}")
        stream = torch.cuda.current_stream(next(iter(feeds.values())).device)
        if profile != self.active_profile:
            self.context.set_optimization_profile_async(profile, stream.cuda_stream)
            self.active_profile = profile
        for name, x in feeds.items():
            if not self.context.set_input_shape(name, tuple(x.shape)):
                raise EngineError(f"{self.spec.name}: TensorRT refused shape {tuple(x.shape)} for '{name}'")
            self.context.set_tensor_address(name, x.data_ptr())
        outputs = {}
        for t in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            if shape != expected[t.name]:
                raise EngineError(f"{self.spec.name}: engine output '{t.name}' has shape {shape}, "
                                  f"the spec says {expected[t.name]}")
            y = torch.empty(shape, dtype=getattr(torch, t.dtype), device=next(iter(feeds.values())).device)
            self.context.set_tensor_address(t.name, y.data_ptr())
            outputs[t.name] = y
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"{self.spec.name}: TensorRT execution failed")
        return outputs  # ordered on the torch stream: later torch ops see the results


class TensorRTBackend(GraphBackend):
    """The five networks as TensorRT engines on a CUDA device."""

    name = "tensorrt"
    artifact = "engine"

    def __init__(self, models, engines: str | Path | None = None, machine: Machine | None = None) -> None:
        folder = engines_folder(engines)
        manifest = load_checked_manifest(models, folder)
        check_files(manifest, folder, "engine")
        machine = machine or this_machine()
        if machine.tensorrt is None:
            import_tensorrt("use --backend onnxruntime or torch")  # raises, saying why
        check_machine(manifest, machine, folder)  # before loading: a mismatch gives one clear line
        trt = import_tensorrt("use --backend onnxruntime or torch")
        if models.device.type != "cuda":
            raise BackendUnavailableError(
                f"the tensorrt backend runs on a CUDA device, not {models.device}; pass --device cuda"
            )
        super().__init__(models, folder, manifest, models.device)
        self.max_batch = manifest.profile.batch[2]
        hint = rebuild_command(manifest, folder, format="tensorrt")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.runners = {
                name: EngineRunner(trt, self.runtime, folder / entry.engine.file, entry.spec, self.geometry, hint)
                for name, entry in manifest.networks.items()
                if entry.engine is not None
            }

    def _run(self, network: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spec = self.specs[network]
        batch, height, width = batch_and_size(spec, self.geometry, {n: tuple(t.shape) for n, t in feeds.items()})
        check_size(self.manifest, self.folder, batch, height, width)
        return self.runners[network].run(feeds)
