"""A stand-in for the part of TensorRT's API and of CUDA that p2v-fast uses, made from the real artifacts.

It lets the builder's and the runner's own logic run on the CPU (``tests/test_backend_tensorrt.py``)
against an engine that knows only what TensorRT would know: the ONNX graph the build was given
and the optimisation profile the builder was given, never the spec.

- :class:`StandInTrt`: the ``tensorrt`` module of one version (``10.x``: the strongly-typed network
  flag; ``11.x``: strongly typed only, no ``device_memory_size``). ``Builder`` / ``OnnxParser``
  read the graph's inputs and outputs (names, ONNX dtypes, static and symbolic dims) from the file;
  ``IOptimizationProfile.set_shape`` raises on a bad range, as TensorRT does; the build returns None
  (TensorRT's failure) when the profile misses an input, has another rank, or disagrees with a
  static dim of the graph. ``BuilderFlag.TF32`` is on by default, as in TensorRT;
  ``set_memory_pool_limit`` takes a ``MemoryPoolType`` only. The "plan" it serializes records the
  graph's tensors, the profile, the flags and the graph's path.
- :class:`StandInEngine` / :class:`StandInContext`: what the runner calls, recorded in
  ``trt.log``. ``set_optimization_profile_async`` raises on a refused profile (TensorRT raises;
  it never returns False). Output shapes come from running the graph in ONNX Runtime at the set
  input shapes. ``execute_async_v3`` writes either ``per_sample_value`` of each sample's inputs
  (``compute="sum"``: results show which samples ran where) or the graph's own outputs in ONNX
  Runtime (``compute="onnx"``), with TF32 emulated (:func:`tf32_graph`) when the flag was left on.
- :class:`StandInCuda`: the :class:`~p2v_fast.nets.backend_tensorrt.TorchCuda` methods on CPU tensors,
  allocations 256-byte aligned (``misalign=True``: 32 bytes past that), streams that record
  ``wait_stream``/``record_stream``/enter/exit in the same log, and a graph capture whose replay
  reruns the captured work. A capture in which an enqueue failed (returned False, or raised) ends
  with the error ``torch.cuda.graph``'s exit raises for an invalidated capture, which masks the
  one raised inside, as on a GPU.

It checks our logic against TensorRT's documented behaviour, not TensorRT itself: the ``tensorrt``
test tier, on a GPU, is the real thing.
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

#: Veltkamp's splitting constant for fp32 (24-bit significand): ``c - (c - x)`` with ``c = x * (2**13 + 1)``
#: is ``x`` rounded to nearest at 24 - 13 = 11 significant bits, TF32's (10 stored + the implicit one).
TF32_SPLIT = 2.0**13 + 1


def tf32_graph(model):
    """A copy of ONNX ``model`` (an ``onnx.ModelProto``) emulating TF32: every fp32 input of a
    Conv, ConvTranspose, MatMul or Gemm rounded to a 10-bit mantissa (Veltkamp's split as Mul/Sub
    nodes, which ONNX Runtime's CPU provider computes in plain fp32); products still accumulate in
    fp32, as TF32 does. fp16 inputs are left as they are (TF32 is for fp32 only)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types |= {t.name: t.data_type for t in graph.initializer}
    types |= {n.output[0]: a.t.data_type for n in graph.node if n.op_type == "Constant" for a in n.attribute
              if a.name == "value"}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    split = "tf32_emulation_split"
    out.graph.initializer.append(numpy_helper.from_array(np.array(TF32_SPLIT, np.float32), split))
    nodes = []
    for node in out.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            for i, name in enumerate(list(node.input[:2])):
                if types.get(name) == TensorProto.FLOAT:
                    c, d, r = (f"{name}/tf32/{len(nodes)}/{s}" for s in "cdr")
                    nodes += [helper.make_node("Mul", [name, split], [c]), helper.make_node("Sub", [c, name], [d]),
                              helper.make_node("Sub", [c, d], [r])]
                    node.input[i] = r
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def per_sample_value(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B] float64: for each sample, the sum of its values over every input (the "sum" engine's output)."""
    total = None
    for x in inputs.values():
        s = x.double().reshape(x.shape[0], -1).sum(1)
        total = s if total is None else total + s
    assert total is not None
    return total


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"


#: ONNX element types -> TensorRT's (what the ONNX parser maps them to).
_ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 9: DataType.BOOL}


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):  # TensorRT 10.x (pybind11 enums convert to int)
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class BuilderFlag10(enum.IntEnum):
    FP16 = 0
    TF32 = 6
    BF16 = 17


class BuilderFlag11(enum.IntEnum):  # 11 removed the precision flags (FP16, BF16, INT8, FP8): strongly typed
    TF32 = 6


class Logger:
    WARNING = 2
    VERBOSE = 4

    def __init__(self, level: int = 2) -> None:
        self.level = level


# ------------------------------------------------------------------------------ graphs in ONNX Runtime

_SESSIONS: dict[tuple[str, bool], object] = {}


def _session(path: str, tf32: bool):
    """One ONNX Runtime session per graph file (and TF32 emulation), shared by every engine built from it."""
    key = (path, tf32)
    if key not in _SESSIONS:
        import onnx
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        model = onnx.load(path)
        if tf32:
            model = tf32_graph(model)
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def _read_graph(path: str) -> list[dict]:
    """The graph's inputs then outputs, as TensorRT's parser sees them: name, mode, dtype, dims
    (an int, or -1 for a symbolic or unknown dim)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    io = []
    for mode, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            if v.name in weights:
                continue
            t = v.type.tensor_type
            dtype = _ONNX_TO_TRT.get(t.elem_type)
            if dtype is None:
                raise ValueError(f"stand-in parser: {v.name} has ONNX type {t.elem_type}")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            io.append({"name": v.name, "mode": mode, "dtype": dtype.name, "dims": dims})
    return io


# ------------------------------------------------------------------------------ the tensorrt module


class StandInTrt:
    """The ``tensorrt`` module of ``version``, recording into ``cuda.log``.

    ``refuse``: calls that fail (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``
    return False; ``set_optimization_profile_async`` and ``set_shape`` raise, as TensorRT does).
    ``refuse_in_capture``: calls that fail only while a CUDA graph is being captured.
    ``compute``: what an engine's outputs are ("sum" or "onnx", see the module docstring; "onnx-tf32":
    "onnx" with TF32 whatever the flag says, an engine that differs from its graph by ~1e-3).
    """

    DataType = DataType
    TensorIOMode = TensorIOMode
    ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    MemoryPoolType = MemoryPoolType
    Logger = Logger

    def __init__(self, cuda: StandInCuda, refuse: tuple[str, ...] = (), version: str = "10.8.0",
                 compute: str = "sum", refuse_in_capture: tuple[str, ...] = ()) -> None:
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.cuda = cuda
        self.log = cuda.log
        self.refuse, self.refuse_in_capture, self.compute = refuse, refuse_in_capture, compute
        self.engines: list[StandInEngine] = []
        self.builds: list[dict] = []  # every plan built (its JSON)
        self.BuilderFlag = BuilderFlag11 if self.major >= 11 else BuilderFlag10
        if self.major < 11:
            self.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
        trt = self

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                self.logger = logger

            def deserialize_cuda_engine(self, data: bytes) -> StandInEngine | None:
                try:
                    plan = json.loads(data)
                except ValueError:
                    return None  # TensorRT logs and returns None for a corrupt plan
                if plan.get("tensorrt") != trt.__version__:
                    return None  # a plan from another TensorRT version
                engine = StandInEngine(trt, plan)
                trt.engines.append(engine)
                return engine

        class Builder:
            def __init__(self, logger: Logger) -> None:
                self.logger = logger

            def create_network(self, flags: int = 0) -> Network:
                if trt.major >= 11:
                    strongly_typed = True  # the only mode
                else:
                    strongly_typed = bool(flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED.value))
                return Network(flags, strongly_typed)

            def create_builder_config(self) -> Config:
                return Config(trt)

            def create_optimization_profile(self) -> Profile:
                return Profile(trt)

            def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
                return trt._build(network, config)

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                self.network = network
                self.errors: list[str] = []

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, i: int) -> str:
                return self.errors[i]

            def parse_from_file(self, path: str) -> bool:
                try:
                    self.network.io = _read_graph(path)
                except Exception as exc:  # not an ONNX file, or a type TensorRT does not take
                    self.errors.append(f"ModelImporter: failed to parse '{path}': {exc}")
                    return False
                self.network.path = str(Path(path).resolve())
                return True

        self.Runtime, self.Builder, self.OnnxParser = Runtime, Builder, OnnxParser

    def _build(self, network: Network, config: Config) -> bytes | None:
        """TensorRT's checks of the profile against the network; None (with a log entry) when one fails."""
        def fail(why: str) -> None:
            self.log.append(("build_failed", why))  # TensorRT logs the reason and returns None

        if network.io is None:
            return fail("empty network")  # type: ignore[func-returns-value]
        if not config.profiles:
            return fail("no optimisation profile")  # type: ignore[func-returns-value]
        inputs = [t for t in network.io if t["mode"] == "input"]
        for p in config.profiles:
            why = self._profile_problem(inputs, p.shapes)
            if why:
                return fail(why)  # type: ignore[func-returns-value]
        profile = config.profiles[0].shapes
        largest = sum(4 * int(torch.Size(hi).numel()) for _, _, hi in profile.values())
        plan = {
            "tensorrt": self.__version__, "io": network.io, "onnx": network.path,
            "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in config.profiles],
            "tf32": self.BuilderFlag.TF32 in config.flags or self.compute == "onnx-tf32",
            "strongly_typed": network.strongly_typed,
            "workspace": config.pools.get("WORKSPACE"), "device_memory": largest // 8 + 256,
        }
        self.builds.append(plan)
        return json.dumps(plan).encode()

    @staticmethod
    def _profile_problem(inputs: list[dict], profile: Mapping) -> str | None:
        for t in inputs:
            if t["name"] not in profile:
                if -1 in t["dims"]:
                    return f"input '{t['name']}' is dynamic and has no profile"
                continue
            for corner in profile[t["name"]]:
                if len(corner) != len(t["dims"]):
                    return f"profile of '{t['name']}' has rank {len(corner)}, the network {len(t['dims'])}"
                for axis, (d, s) in enumerate(zip(t["dims"], corner, strict=True)):
                    if d != -1 and d != s:
                        return f"profile of '{t['name']}' gives {s} for axis {axis}, which the network fixes to {d}"
        unknown = set(profile) - {t["name"] for t in inputs}
        if unknown:
            return f"profile names tensors the network does not have: {sorted(unknown)}"
        return None


class Network:
    def __init__(self, flags: int, strongly_typed: bool) -> None:
        self.flags, self.strongly_typed = flags, strongly_typed
        self.io: list[dict] | None = None
        self.path = ""


class Profile:
    """``IOptimizationProfile``: ``set_shape`` raises on a bad range (it returns nothing)."""

    def __init__(self, trt: StandInTrt) -> None:
        self.trt = trt
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, lo, opt, hi) -> None:
        lo, opt, hi = (tuple(int(d) for d in s) for s in (lo, opt, hi))
        if "set_shape" in self.trt.refuse:
            raise RuntimeError(f"IOptimizationProfile::setDimensions: refused for '{name}'")
        if not len(lo) == len(opt) == len(hi) or not all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi,
                                                                                              strict=True)):
            raise ValueError(f"Error Code 3: API Usage Error (min <= opt <= max does not hold for '{name}': "
                             f"{lo}, {opt}, {hi})")
        self.shapes[name] = (lo, opt, hi)


class Config:
    def __init__(self, trt: StandInTrt) -> None:
        self.trt = trt
        self.flags = {trt.BuilderFlag.TF32}  # TensorRT's default
        self.pools: dict[str, int] = {}
        self.profiles: list[Profile] = []
        self.cache: Cache | None = None

    def set_flag(self, flag) -> None:
        self.flags.add(self.trt.BuilderFlag(flag))

    def clear_flag(self, flag) -> None:
        self.flags.discard(self.trt.BuilderFlag(flag))

    def get_flag(self, flag) -> bool:
        return self.trt.BuilderFlag(flag) in self.flags

    def set_memory_pool_limit(self, pool, size: int) -> None:
        if not isinstance(pool, MemoryPoolType):  # pybind11: incompatible function arguments
            raise TypeError(f"set_memory_pool_limit(): incompatible function arguments: {pool!r}")
        self.pools[pool.name] = int(size)

    def add_optimization_profile(self, profile: Profile) -> int:
        if not profile.shapes:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> Cache | None:
        return Cache(data)

    def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
        ok = cache.data in (b"", self.trt.__version__.encode())  # one made by this TensorRT
        if ok:
            self.cache = cache
        return ok

    def get_timing_cache(self) -> Cache | None:
        return self.cache


class Cache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data or b"tuned"


# ------------------------------------------------------------------------------ engine and context


class StandInEngine:
    def __init__(self, trt: StandInTrt, plan: Mapping) -> None:
        self.trt, self.plan = trt, plan
        self.io = {t["name"]: t for t in plan["io"]}
        self._names = [t["name"] for t in plan["io"]]
        self.profiles = [{k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in plan["profiles"]]
        self.device_memory_size_v2 = int(plan["device_memory"])
        self.contexts: list[StandInContext] = []

    @property
    def device_memory_size(self) -> int:
        if self.trt.major >= 11:
            raise AttributeError("'tensorrt.ICudaEngine' object has no attribute 'device_memory_size'")
        return self.device_memory_size_v2

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    def get_tensor_name(self, i: int) -> str:
        return self._names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if self.io[name]["mode"] == "input" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[self.io[name]["dtype"]]

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
        if not 0 <= profile < len(self.profiles):
            raise RuntimeError(f"profile index {profile} out of range")
        if name in self.profiles[profile]:
            return self.profiles[profile][name]
        dims = tuple(self.io[name]["dims"])  # a static input: its own shape
        return dims, dims, dims

    def create_execution_context(self, strategy: ExecutionContextAllocationStrategy =
                                 ExecutionContextAllocationStrategy.STATIC) -> StandInContext:
        if not isinstance(strategy, ExecutionContextAllocationStrategy):
            raise TypeError(f"create_execution_context(): incompatible function arguments: {strategy!r}")
        context = StandInContext(self, strategy)
        self.contexts.append(context)
        return context


class StandInContext:
    def __init__(self, engine: StandInEngine, strategy: ExecutionContextAllocationStrategy) -> None:
        self.engine, self.strategy = engine, strategy
        self.name = Path(engine.plan["onnx"]).stem
        self.log = engine.trt.log
        self.memory: tuple[int, int] | None = None
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.captured: tuple[dict, dict] | None = None  # (addresses, shapes) a CUDA graph was captured with
        self._out_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}

    def _ok(self, call: str) -> bool:
        trt = self.engine.trt
        return call not in trt.refuse and not (trt.cuda.capturing and call in trt.refuse_in_capture)

    @property
    def _inputs(self) -> list[str]:
        return [n for n, t in self.engine.io.items() if t["mode"] == "input"]

    @property
    def _outputs(self) -> list[str]:
        return [n for n, t in self.engine.io.items() if t["mode"] == "output"]

    def set_device_memory(self, address: int, size: int) -> None:
        self.memory = (address, size)
        self.log.append(("set_device_memory", self.name, address, size))

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.log.append(("set_optimization_profile_async", self.name, profile, stream))
        if not self._ok("set_optimization_profile_async") or not 0 <= profile < self.engine.num_optimization_profiles:
            raise RuntimeError(f"Error Code 3: API Usage Error (setOptimizationProfileAsync: profile {profile} "
                               "refused)")
        self.profile = profile
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.log.append(("set_input_shape", self.name, name, tuple(shape)))
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        ok = len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True))
        if ok and self._ok("set_input_shape"):
            self.shapes[name] = tuple(int(s) for s in shape)
            return True
        return False

    def _output_shapes(self) -> dict[str, tuple[int, ...]]:
        """What TensorRT's shape inference gives for the set input shapes: the graph's own, from
        one ONNX Runtime run on zeros (cached per shape set)."""
        key = tuple(sorted(self.shapes.items()))
        if key not in self._out_shapes:
            import numpy as np

            session = _session(self.engine.plan["onnx"], False)
            feeds = {n: np.zeros(self.shapes[n], dtype=DataType[self.engine.io[n]["dtype"]].value)
                     for n in self._inputs}
            outs = session.run(self._outputs, feeds)  # type: ignore[attr-defined]
            self._out_shapes[key] = {n: tuple(o.shape) for n, o in zip(self._outputs, outs, strict=True)}
        return self._out_shapes[key]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self._inputs:
            return self.shapes.get(name, tuple(self.engine.io[name]["dims"]))
        if set(self.shapes) != set(self._inputs):
            return tuple(self.engine.io[name]["dims"])  # not all input shapes set: -1 where unknown
        return self._output_shapes()[name]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.log.append(("set_tensor_address", self.name, name, address))
        self.addresses[name] = address
        return self._ok("set_tensor_address")

    def execute_async_v3(self, stream: int) -> bool:
        trt = self.engine.trt
        cuda = trt.cuda
        self.log.append(("execute_async_v3", self.name, stream, cuda.active, cuda.capturing))
        assert self.memory is not None, "executed without activation memory"
        if not self._ok("execute_async_v3"):
            cuda.invalidated = cuda.invalidated or cuda.capturing
            return False
        if cuda.capturing:
            self.captured = (dict(self.addresses), dict(self.shapes))
            return True  # recorded into the graph, not run
        if cuda.replaying:  # the graph's kernels read the captured bindings, whatever is bound now
            assert self.captured == (self.addresses, self.shapes), "replayed a CUDA graph whose bindings changed"
        inputs = {n: cuda.tensor_at(self.addresses[n], self.shapes[n]) for n in self._inputs}
        shapes = self._output_shapes()
        outs = {n: cuda.tensor_at(self.addresses[n], shapes[n]) for n in self._outputs}
        if trt.compute in ("onnx", "onnx-tf32"):
            session = _session(self.engine.plan["onnx"], bool(self.engine.plan["tf32"]))
            got = session.run(self._outputs, {n: x.numpy() for n, x in inputs.items()})  # type: ignore[attr-defined]
            for name, y in zip(self._outputs, got, strict=True):
                outs[name].copy_(torch.from_numpy(y))
        else:
            value = per_sample_value(inputs)
            for out in outs.values():
                out.copy_(value.view(-1, *([1] * (out.dim() - 1))).expand_as(out))
        return True


# ------------------------------------------------------------------------------ CUDA


class Stream:
    def __init__(self, name: str, handle: int, log: list) -> None:
        self.name, self.cuda_stream, self.log = name, handle, log

    def wait_stream(self, other: Stream) -> None:
        self.log.append(("wait_stream", self.name, other.name))


#: What ``torch.cuda.graph``'s exit raises when the capture was invalidated (it masks the error raised inside).
CAPTURE_INVALIDATED = "CUDA error: operation failed due to a previous error during capture"


class StandInCuda:
    """:class:`~p2v_fast.nets.backend_tensorrt.TorchCuda` on CPU tensors, recording."""

    def __init__(self, misalign: bool = False) -> None:
        self.log: list[tuple] = []
        self.misalign = misalign
        self.torch_stream = Stream("torch", 7, self.log)
        self.active: str = "torch"
        self.capturing = False
        self.invalidated = False  # an enqueue failed during the capture
        self.replaying = False
        self.buffers: dict[int, torch.Tensor] = {}  # address -> the flat bytes allocated there
        self.dtypes: dict[int, torch.dtype] = {}  # address -> dtype it was allocated for
        self.allocated: list[tuple[int, int]] = []  # (address, bytes) of every zeros() allocation

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        n = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        raw = torch.zeros(n + 512, dtype=torch.uint8)
        offset = (-raw.data_ptr()) % 256 + (32 if self.misalign else 0)
        flat = raw[offset: offset + n]
        self.buffers[flat.data_ptr()] = flat
        self.dtypes[flat.data_ptr()] = dtype
        self.allocated.append((flat.data_ptr(), n))
        return flat.view(dtype).view(tuple(shape))

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.full(tuple(shape), float("nan"), dtype=dtype)  # unwritten rows would show

    def tensor_at(self, address: int, shape) -> torch.Tensor:
        """The bound buffer at ``address`` (an allocation's start) viewed as ``shape``."""
        for start, flat in self.buffers.items():
            if start <= address < start + flat.numel():
                assert address == start, "bound an address inside an allocation"
                n = int(torch.Size(shape).numel())
                return flat.view(self.dtypes[address])[:n].view(tuple(shape))
        raise AssertionError(f"address 0x{address:x} is not a buffer the runner allocated")

    def new_stream(self) -> Stream:
        return Stream("engine", 1001, self.log)

    def current_stream(self) -> Stream:
        return self.torch_stream

    @staticmethod
    def handle(stream: Stream) -> int:
        return stream.cuda_stream

    @contextlib.contextmanager
    def use_stream(self, stream: Stream) -> Iterator[None]:
        before, self.active = self.active, stream.name
        self.log.append(("enter", stream.name))
        try:
            yield
        finally:
            self.log.append(("exit", stream.name))
            self.active = before

    def on_device(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        self.log.append(("synchronize",))

    def record_stream(self, tensor: torch.Tensor, stream: Stream) -> None:
        self.log.append(("record_stream", stream.name, tensor.data_ptr()))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.log.append(("copy", self.active, dst.data_ptr(), src.data_ptr()))
        dst.copy_(src)

    def capture(self, stream: Stream, work: Callable[[], object]) -> Callable[[], None]:
        """As ``torch.cuda.graph``: an enqueue that failed inside (returned False or raised)
        invalidates the capture, and the exit raises :data:`CAPTURE_INVALIDATED` instead."""
        self.log.append(("capture", stream.name))
        self.capturing, self.invalidated = True, False
        try:
            work()
        except BaseException:
            raise RuntimeError(CAPTURE_INVALIDATED) from None
        finally:
            self.capturing = False
        if self.invalidated:
            raise RuntimeError(CAPTURE_INVALIDATED)

        def replay() -> None:  # a graph replays the captured addresses and shapes
            self.log.append(("replay", self.active))
            self.replaying = True
            try:
                work()
            finally:
                self.replaying = False

        return replay
