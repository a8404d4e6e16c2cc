"""TensorRT backend: a thin runner over the engines ``p2v export --format tensorrt`` builds.

Written against the TensorRT 10/11 runtime API, as NVIDIA's ``demo/Diffusion`` engine runner
uses it:

- **Aligned, preallocated I/O.** Each engine owns one set of input and output buffers per
  (engine, shape), allocated once for the profile's largest batch; a call copies its inputs
  into the first rows and copies its outputs out. Only these buffers are ever bound, so every
  address is the start of an allocation (the CUDA caching allocator aligns to 512 bytes; the
  runner checks the 256 bytes TensorRT requires and names the tensor otherwise). A batch
  larger than the profile is split by the caller (:meth:`GraphBackend.run`) into slices that
  are copied, never bound. Every ``set_input_shape`` / ``set_tensor_address`` /
  ``execute_async_v3`` result is checked; shapes are set before addresses.
- **A dedicated CUDA stream** per backend for the copies and ``execute_async_v3``, ordered with
  torch's current stream: the engine stream waits for torch's (``wait_stream``) before reading
  the inputs, torch's waits for the engine's before the outputs are used, and tensors crossing
  streams are ``record_stream``-ed so the caching allocator does not reuse them early.
- **Shared activation memory.** Contexts are created with the user-managed allocation strategy
  and all share one buffer of the largest engine's device memory size (the engines run one at
  a time on the one stream), instead of every engine holding its own.
- **CUDA graphs for static shapes** (``cuda_graph=True``, the CLI's ``--cuda-graph``): engines
  whose profile is one shape (``p2v export --static-batch`` at a fixed size) have their
  ``execute_async_v3`` captured once, after a warm-up run, and replayed; smaller calls are padded
  to the static batch. A capture that fails (an enqueue returning False, an invalidated capture)
  falls back to plain launches with one warning line. Dynamic-shape engines are refused with the
  rebuild command.

The CUDA side (allocation, streams, graph capture) goes through :class:`TorchCuda`, so the
runner's own logic is tested on the CPU with a recording stand-in for TensorRT's engine and
context and for the CUDA operations (``tests/test_backend_tensorrt.py``); only the real thing is
left to the ``tensorrt`` test tier.

Refusals, each one line: TensorRT or CUDA not usable here (first, with the reason), engines
built with another TensorRT version or for another GPU, for another model, truncated engine
files, a frame size or batch outside the engines' profile (with the ``p2v export`` command that
fixes it).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from p2v_fast.errors import BackendUnavailableError, EngineError, one_line
from p2v_fast.nets.graph_backend import GraphBackend, engines_folder, load_checked_manifest
from p2v_fast.nets.manifest import Machine, check_files, check_machine, rebuild_command, this_machine
from p2v_fast.nets.specs import Geometry, MinOptMax, NetworkSpec, Shape
from p2v_fast.nets.system import require_tensorrt

#: TensorRT requires every I/O address to be aligned to this many bytes.
ALIGNMENT = 256


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

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


def is_static(profile: Mapping[str, MinOptMax]) -> bool:
    """Every input has one shape (min == max): what a CUDA graph can replay."""
    return all(tuple(lo) == tuple(hi) for lo, _, hi in profile.values())


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


def check_aligned(network: str, name: str, address: int) -> None:
    if address % ALIGNMENT:
        raise EngineError(f"{network}: buffer of '{name}' at 0x{address:x} is not {ALIGNMENT}-byte aligned, "
                          "as TensorRT requires")


# ------------------------------------------------------------------------------ CUDA side


class TorchCuda:
    """The CUDA operations the runner needs, on one device, through torch: buffers from the
    caching allocator, streams, ``record_stream`` and CUDA graph capture. Tests substitute a
    recording stand-in with the same methods."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise BackendUnavailableError(f"the tensorrt backend runs on a CUDA device, not {device}; "
                                          "pass --device cuda")
        self.device = device

    def zeros(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=dtype, device=self.device)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    def new_stream(self) -> Any:
        return torch.cuda.Stream(device=self.device)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    @staticmethod
    def handle(stream: Any) -> int:
        return int(stream.cuda_stream)

    @staticmethod
    def use_stream(stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)  # also makes the stream's device current

    def on_device(self) -> contextlib.AbstractContextManager:
        return torch.cuda.device(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    @staticmethod
    def record_stream(tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)

    @staticmethod
    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst <- src`` on the current stream, without blocking the host."""
        dst.copy_(src, non_blocking=True)

    @staticmethod
    def capture(stream: Any, work: Callable[[], object]) -> Callable[[], None]:
        """Capture ``work`` (enqueued on ``stream``) into a CUDA graph; returns its replay. Raises
        (from the capture's end) when the capture was invalidated."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            work()
        return graph.replay


# ------------------------------------------------------------------------------ runtime


def _dtype_names(trt) -> dict:
    """TensorRT DataType -> the spec's dtype names."""
    names = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "BF16": "bfloat16",
             "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}
    return {getattr(trt.DataType, k): v for k, v in names.items() if hasattr(trt.DataType, k)}


def device_memory_size(engine) -> int:
    """Activation memory an execution context of ``engine`` needs (``device_memory_size_v2`` from
    TensorRT 10.1 on, ``device_memory_size`` before)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


def create_user_managed_context(trt, engine):
    """An execution context without its own activation memory: ``create_execution_context(strategy)``
    (TensorRT 10.x and 11.x alike); a runtime whose binding lacks that overload gets the strategy
    through an ``IRuntimeConfig`` instead."""
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    try:
        context = engine.create_execution_context(strategy)
    except TypeError:
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        context = engine.create_execution_context(config)
    return context


def set_device_memory(context, address: int, size: int) -> None:
    """Give ``context`` ``size`` bytes at ``address`` (``set_device_memory(ptr, size)`` from
    TensorRT 10.1 on, the ``device_memory`` attribute before)."""
    try:
        context.set_device_memory(address, size)
    except (AttributeError, TypeError):
        context.device_memory = address


class EngineRunner:
    """One deserialized engine: its context, its preallocated I/O buffers, its CUDA graph.

    ``ops``: the CUDA side (:class:`TorchCuda`); ``stream``: the backend's engine stream.
    Call :meth:`activate` with the shared activation memory before :meth:`run`.
    """

    def __init__(self, trt, engine, spec: NetworkSpec, geometry: Geometry, *, ops: Any, stream: Any, hint: str,
                 static_hint: str | None = None, cuda_graph: bool = False,
                 warn: Callable[[str], None] | None = None) -> None:
        self.trt, self.engine, self.spec, self.geometry = trt, engine, spec, geometry
        self.ops, self.stream, self.hint = ops, stream, hint
        self.warn = warn or _warn
        dtypes = _dtype_names(trt)
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            io[name] = (mode, dtypes.get(engine.get_tensor_dtype(name), "?"))
        check_io(spec, io)
        self.profiles: list[dict[str, MinOptMax]] = []
        for p in range(engine.num_optimization_profiles):
            profile = {}
            for t in spec.inputs:
                lo, opt, hi = (tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(t.name, p))
                profile[t.name] = (lo, opt, hi)
            self.profiles.append(profile)
        if not self.profiles:
            raise EngineError(f"{spec.name}: the engine has no optimisation profile; rebuild: {hint}")
        self.static = len(self.profiles) == 1 and is_static(self.profiles[0])
        if cuda_graph and not self.static:
            raise EngineError(f"--cuda-graph needs static-shape engines, and {spec.name}'s profile is dynamic; "
                              f"rebuild: {static_hint or hint}")
        self.cuda_graph = cuda_graph
        self.context: Any = None
        self.active_profile = 0
        self._buffers: dict[str, torch.Tensor] = {}  # name -> [max batch, ...], for one shape key
        self._key: tuple | None = None  # (profile, per-input shape without batch) of the buffers
        self._bound: tuple | None = None  # (key, run batch) the context's shapes/addresses are set for
        self._replay: Callable[[], None] | None = None

    @property
    def device_memory_size(self) -> int:
        return device_memory_size(self.engine)

    def activate(self, memory: torch.Tensor) -> None:
        """Create the context (user-managed allocation) on the shared activation ``memory``."""
        size = memory.numel() * memory.element_size()
        if size < self.device_memory_size:
            raise EngineError(f"{self.spec.name}: shared activation memory of {size} bytes is smaller than the "
                              f"{self.device_memory_size} the engine needs")
        check_aligned(self.spec.name, "activation memory", memory.data_ptr())
        self.context = create_user_managed_context(self.trt, self.engine)
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {self.spec.name}")
        set_device_memory(self.context, memory.data_ptr(), size)

    # --- one call -------------------------------------------------------------------------

    def _buffers_for(self, profile: int, shapes: Mapping[str, Shape], batch: int) -> dict[str, torch.Tensor]:
        """The buffer set for these shapes (batch axis aside), allocated at the profile's largest
        batch the first time a shape is seen; one set is kept (an edit runs at one size)."""
        key = (profile, tuple((n, tuple(s[1:])) for n, s in sorted(shapes.items())))
        if key != self._key:
            cap = self.profiles[profile][self.spec.inputs[0].name][2][0]  # the profile's max batch
            at = {n: (cap, *s[1:]) for n, s in shapes.items()}
            outs = output_shapes(self.spec, self.geometry, at)
            self._buffers = {}  # free the old set first
            for t in (*self.spec.inputs, *self.spec.outputs):
                shape = at[t.name] if t.name in at else outs[t.name]
                self._buffers[t.name] = self.ops.zeros(shape, getattr(torch, t.dtype))  # finite padding rows
            self._key, self._bound, self._replay = key, None, None
        return self._buffers

    def _bind(self, profile: int, views: Mapping[str, torch.Tensor], key: tuple) -> None:
        """Profile, then every input shape, then every address; each result checked."""
        ctx, name = self.context, self.spec.name
        if profile != self.active_profile:
            first = self.spec.inputs[0].name
            refused = f"{name}: TensorRT refused optimisation profile {profile} for input '{first}' " \
                      f"{tuple(views[first].shape)}"
            try:  # TensorRT raises on a refused profile (it never returns False); both are one line
                ok = ctx.set_optimization_profile_async(profile, self.ops.handle(self.stream))
            except Exception as exc:
                raise EngineError(f"{refused}: {one_line(exc)}") from None
            if not ok:
                raise EngineError(refused)
            self.active_profile = profile
        for t in self.spec.inputs:
            shape = tuple(views[t.name].shape)
            if not ctx.set_input_shape(t.name, shape):
                raise EngineError(f"{name}: TensorRT refused shape {shape} for input '{t.name}'; rebuild: {self.hint}")
        for t in self.spec.outputs:
            got, want = tuple(ctx.get_tensor_shape(t.name)), tuple(views[t.name].shape)
            if got != want:
                raise EngineError(f"{name}: engine output '{t.name}' has shape {got}, the spec says {want}")
        for t in (*self.spec.inputs, *self.spec.outputs):
            address = views[t.name].data_ptr()
            check_aligned(name, t.name, address)
            if not ctx.set_tensor_address(t.name, address):
                raise EngineError(f"{name}: TensorRT refused the address of '{t.name}'")
        self._bound = key

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.ops.handle(self.stream)):
            raise EngineError(f"{self.spec.name}: TensorRT execution failed")

    def _capture(self) -> None:
        """Capture the enqueue into a CUDA graph, or fall back to plain launches with one warning.

        The enqueue inside the capture never raises: an error raised there is masked by
        ``torch.cuda.graph``'s exit (an invalidated capture raises its own), so its result is kept
        and checked once the capture has ended."""
        results: list[bool] = []
        why = "execute_async_v3 returned False during the capture"
        try:
            replay = self.ops.capture(self.stream, lambda: results.append(
                bool(self.context.execute_async_v3(self.ops.handle(self.stream)))))
        except Exception as exc:  # the capture's end: invalidated, or an operation capture does not allow
            replay, why = None, one_line(exc) if all(results) else why
        if replay is not None and results == [True]:
            self._replay = replay
            return
        self.cuda_graph = False
        self.warn(f"warning: {self.spec.name}: CUDA graph capture failed ({why}); running without a CUDA graph")

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on ``feeds`` (the spec's inputs and dtypes, on the device, batch within the
        profile); returns new output tensors, ready for torch's current stream."""
        if self.context is None:
            raise RuntimeError("EngineRunner.activate() was not called")
        spec = self.spec
        shapes = {t.name: tuple(feeds[t.name].shape) for t in spec.inputs}
        expected = output_shapes(spec, self.geometry, shapes)  # also checks the inputs agree
        batch = shapes[spec.inputs[0].name][0]
        if self.static:  # one shape only: pad a smaller call to the static batch
            run_batch = self.profiles[0][spec.inputs[0].name][0][0]
            padded = {n: (run_batch, *s[1:]) for n, s in shapes.items()}
            profile = select_profile(self.profiles, padded) if batch <= run_batch else None
        else:
            run_batch, profile = batch, select_profile(self.profiles, shapes)
        if profile is None:
            raise EngineError(f"{spec.name}: input shapes {dict(shapes)} are outside the engine's profile; "
                              f"rebuild: {self.hint}")
        buffers = self._buffers_for(profile, shapes, run_batch)
        views = {n: b[:run_batch] for n, b in buffers.items()}  # prefixes: the allocation's own address
        key = (self._key, run_batch)

        caller = self.ops.current_stream()
        outputs = {t.name: self.ops.empty(expected[t.name], getattr(torch, t.dtype)) for t in spec.outputs}
        self.stream.wait_stream(caller)  # the inputs were written on torch's stream
        with self.ops.use_stream(self.stream):
            for t in spec.inputs:
                x = feeds[t.name]
                self.ops.copy(views[t.name][:batch], x)
                self.ops.record_stream(x, self.stream)  # read here: not to be reused before
            if self._bound != key:
                self._bind(profile, views, key)
            if self._replay is not None:
                self._replay()
            else:
                self._execute()
                if self.cuda_graph:  # after a warm-up run: capture the same work once, replay from now on
                    self._capture()
            for t in spec.outputs:
                y = outputs[t.name]
                self.ops.copy(y, views[t.name][:batch])
                self.ops.record_stream(y, self.stream)  # written here, allocated on torch's stream
        caller.wait_stream(self.stream)  # torch's later work sees the outputs
        return outputs


class TensorRTBackend(GraphBackend):
    """The engine folder's networks as TensorRT engines on one CUDA device.

    ``trt``, ``machine`` and ``ops`` are for tests (a stand-in TensorRT module, machine, and CUDA
    side); by default TensorRT is imported (first of all: without it the backend says why it is
    not usable here), this machine is read and the CUDA side is torch's on ``models.device``.
    """

    name = "tensorrt"
    artifact = "engine"  # identity(): the engines' keys (an inversion on another build is another result)

    def __init__(self, models, engines: str | Path | None = None, *, cuda_graph: bool = False,
                 machine: Machine | None = None, trt: Any = None, ops: Any = None) -> None:
        trt = trt or require_tensorrt("use --backend onnxruntime or torch")
        device = models.device
        ops = ops or TorchCuda(device)  # refuses a non-CUDA --device
        folder = engines_folder(engines)
        manifest = load_checked_manifest(models, folder)
        check_files(manifest, folder, "engine")
        check_machine(manifest, machine or this_machine(device), folder)  # before loading anything
        super().__init__(models, folder, manifest, device)
        self.max_batch = manifest.profile.batch[2]
        hint = rebuild_command(manifest, folder, format="tensorrt")
        static_hint = rebuild_command(manifest, folder, format="tensorrt", static_batch=True)
        self.trt, self.ops = trt, ops
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with ops.on_device():  # TensorRT works on the current CUDA device: pin it to --device
            self.stream = ops.new_stream()  # one stream for every engine: they share activation memory
            self.runners: dict[str, EngineRunner] = {}
            for name, entry in manifest.networks.items():
                assert entry.engine is not None  # check_files
                path = folder / entry.engine.file
                engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise EngineError(f"TensorRT cannot load '{path}' (corrupt, or built by another TensorRT); "
                                      f"rebuild: {hint}")
                self.runners[name] = EngineRunner(trt, engine, entry.spec, self.geometry, ops=ops, stream=self.stream,
                                                  hint=hint, static_hint=static_hint, cuda_graph=cuda_graph)
            # One activation buffer of the largest engine's size, shared by every context.
            size = max(r.device_memory_size for r in self.runners.values())
            self.activation_memory = ops.zeros((max(size, 1),), torch.uint8)
            for runner in self.runners.values():
                runner.activate(self.activation_memory)

    def _run(self, network: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the frame size was checked by run(), which also split the batch to the profile's maximum
        with self.ops.on_device():
            return self.runners[network].run(feeds)
