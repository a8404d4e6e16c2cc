"""A recording stand-in for the part of TensorRT's API and of CUDA the TensorRT backend uses.

It lets the runner's own logic run on the CPU (``tests/test_backend_tensorrt.py``): buffers,
binding order, stream ordering, shared activation memory, batch splitting and padding, CUDA
graph capture. It checks our logic, not TensorRT: nothing here says that TensorRT accepts what
the runner does (that is the ``tensorrt`` test tier, on a GPU).

- :class:`StandInTrt`: the ``tensorrt`` module (``DataType``, ``TensorIOMode``, ``Logger``,
  ``Runtime``, ``ExecutionContextAllocationStrategy``). Its ``Runtime`` deserializes "plans"
  written by :func:`write_plan` (JSON: spec, geometry, profile, device memory size).
- :class:`StandInEngine` / :class:`StandInContext`: what the runner calls, recorded in
  ``trt.log``. ``execute_async_v3`` reads the bound input buffers (by address) and writes every
  output row b with ``per_sample_value`` of the inputs' row b, so results show which samples
  ran where.
- :class:`StandInCuda`: the :class:`~p2v_fast.backend_tensorrt.TorchCuda` methods on CPU tensors,
  allocations 256-byte aligned (``misalign=True``: 32 bytes past that), streams that record
  ``wait_stream``/``record_stream``/enter/exit in the same log, and a graph capture whose replay
  reruns the captured work.
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from p2v_fast.specs import Geometry, NetworkSpec

#: Veltkamp's splitting constant for fp32 (24-bit significand): ``c - (c - x)`` with ``c = x * (2**13 + 1)``
#: is ``x`` rounded to nearest at 24 - 13 = 11 significant bits, TF32's (10 stored + the implicit one).
TF32_SPLIT = 2.0**13 + 1


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to TF32's 10-bit mantissa (what TF32 does to the inputs of a product)."""
    c = x * TF32_SPLIT
    return c - (c - x)


def tf32_graph(model):
    """A copy of ONNX ``model`` (an ``onnx.ModelProto``) emulating TF32: every fp32 input of a
    Conv, ConvTranspose, MatMul or Gemm rounded to a 10-bit mantissa (:func:`round_to_tf32` as
    Mul/Sub nodes, which ONNX Runtime's CPU provider computes in plain fp32); products still
    accumulate in fp32, as TF32 does. fp16 inputs are left as they are (TF32 is for fp32 only)."""
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
    """[B] float64: for each sample, the sum of its values over every input (the stand-in's output)."""
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
    BOOL = "bool"


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class Logger:
    WARNING = 2
    VERBOSE = 4

    def __init__(self, level: int = 2) -> None:
        self.level = level


def write_plan(path: Path, spec: NetworkSpec, geometry: Geometry, profile: Mapping[str, tuple],
               device_memory: int) -> None:
    """A stand-in engine file: what :class:`StandInEngine` is made from."""
    path.write_text(json.dumps({"spec": spec.to_dict(), "geometry": geometry.to_dict(),
                                "profile": {k: [list(s) for s in v] for k, v in profile.items()},
                                "device_memory": device_memory}))


class StandInTrt:
    """The ``tensorrt`` module, recording into ``log``; ``refuse`` names calls that return False."""

    __version__ = "10.8.0"
    DataType = DataType
    TensorIOMode = TensorIOMode
    ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    Logger = Logger

    def __init__(self, cuda: StandInCuda, refuse: tuple[str, ...] = ()) -> None:
        self.cuda = cuda
        self.log = cuda.log
        self.refuse = refuse
        self.engines: list[StandInEngine] = []
        trt = self

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                self.logger = logger

            def deserialize_cuda_engine(self, data: bytes) -> StandInEngine:
                engine = StandInEngine(trt, json.loads(data))
                trt.engines.append(engine)
                return engine

        self.Runtime = Runtime


class StandInEngine:
    def __init__(self, trt: StandInTrt, plan: Mapping) -> None:
        self.trt = trt
        self.spec = NetworkSpec.from_dict(plan["spec"])
        self.geometry = Geometry.from_dict(plan["geometry"])
        self.profile = {k: tuple(tuple(s) for s in v) for k, v in plan["profile"].items()}
        self.device_memory_size_v2 = int(plan["device_memory"])
        self.contexts: list[StandInContext] = []
        self._names = [t.name for t in (*self.spec.inputs, *self.spec.outputs)]

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    def get_tensor_name(self, i: int) -> str:
        return self._names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.spec.input_names else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType(self.spec.tensor(name).dtype)

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
        assert profile == 0
        return self.profile[name]

    def create_execution_context(self, strategy: ExecutionContextAllocationStrategy) -> StandInContext:
        context = StandInContext(self, strategy)
        self.contexts.append(context)
        return context


class StandInContext:
    def __init__(self, engine: StandInEngine, strategy: ExecutionContextAllocationStrategy) -> None:
        self.engine, self.strategy = engine, strategy
        self.name = engine.spec.name
        self.log = engine.trt.log
        self.memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.captured: tuple[dict, dict] | None = None  # (addresses, shapes) a CUDA graph was captured with

    def _ok(self, call: str) -> bool:
        return call not in self.engine.trt.refuse

    def set_device_memory(self, address: int, size: int) -> None:
        self.memory = (address, size)
        self.log.append(("set_device_memory", self.name, address, size))

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.log.append(("set_optimization_profile_async", self.name, profile, stream))
        return self._ok("set_optimization_profile_async")

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.log.append(("set_input_shape", self.name, name, tuple(shape)))
        lo, _, hi = self.engine.profile[name]
        ok = all(a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok and self._ok("set_input_shape")

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.spec.input_names:
            return self.shapes[name]
        dims = self.engine.spec.bind(self.engine.geometry, self.shapes)  # raises if an input shape is missing
        return self.engine.spec.output_shapes(dims)[name]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.log.append(("set_tensor_address", self.name, name, address))
        self.addresses[name] = address
        return self._ok("set_tensor_address")

    def execute_async_v3(self, stream: int) -> bool:
        cuda = self.engine.trt.cuda
        self.log.append(("execute_async_v3", self.name, stream, cuda.active, cuda.capturing))
        assert self.memory is not None, "executed without activation memory"
        if cuda.capturing:
            self.captured = (dict(self.addresses), dict(self.shapes))
            return True  # recorded into the graph, not run
        if cuda.replaying:  # the graph's kernels read the captured bindings, whatever is bound now
            assert self.captured == (self.addresses, self.shapes), "replayed a CUDA graph whose bindings changed"
        spec = self.engine.spec
        inputs = {n: cuda.tensor_at(self.addresses[n], self.shapes[n]) for n in spec.input_names}
        value = per_sample_value(inputs)
        for name in spec.output_names:
            out = cuda.tensor_at(self.addresses[name], self.get_tensor_shape(name))
            out.copy_(value.view(-1, *([1] * (out.dim() - 1))).expand_as(out))
        return self._ok("execute_async_v3")


class Stream:
    def __init__(self, name: str, handle: int, log: list) -> None:
        self.name, self.cuda_stream, self.log = name, handle, log

    def wait_stream(self, other: Stream) -> None:
        self.log.append(("wait_stream", self.name, other.name))


class StandInCuda:
    """:class:`~p2v_fast.backend_tensorrt.TorchCuda` on CPU tensors, recording."""

    def __init__(self, misalign: bool = False) -> None:
        self.log: list[tuple] = []
        self.misalign = misalign
        self.torch_stream = Stream("torch", 7, self.log)
        self.active: str = "torch"
        self.capturing = False
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

    def record_stream(self, tensor: torch.Tensor, stream: Stream) -> None:
        self.log.append(("record_stream", stream.name, tensor.data_ptr()))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.log.append(("copy", self.active, dst.data_ptr(), src.data_ptr()))
        dst.copy_(src)

    def capture(self, stream: Stream, work: Callable[[], None]) -> Callable[[], None]:
        self.log.append(("capture", stream.name))
        self.capturing = True
        try:
            work()
        finally:
            self.capturing = False

        def replay() -> None:  # a graph replays the captured addresses and shapes
            self.log.append(("replay", self.active))
            self.replaying = True
            try:
                work()
            finally:
                self.replaying = False

        return replay
