"""Build a TensorRT engine from an exported ONNX graph (TensorRT 10 and 11 Python API).

- Networks are strongly typed: the ONNX already carries fp16 where fp16 is wanted (TensorRT
  11 removed ``BuilderFlag.FP16``; its ``create_network()`` is strongly typed by default, and
  10.x takes ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``). See NVIDIA's "Migrating from
  TensorRT 10.x to 11.x" guide, "Strongly Typed Networks Are Now Required".
- One optimisation profile per engine, from the spec (min/opt/max shape of every input).
- The workspace limit is exposed (building the SD UNet can exhaust GPU memory).
- A timing cache per TensorRT version and GPU architecture is loaded before and saved after
  every build, so rebuilding (another size, another profile) reuses measured tactics.
- The parser reads from the file path, so graphs with external weights load.

TensorRT is imported lazily: nothing here is needed for ``--format onnx``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from p2v_fast.errors import EngineError
from p2v_fast.specs import MinOptMax
from p2v_fast.system import import_tensorrt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def timing_cache_path(folder: Path, tensorrt_version: str, compute_capability: str) -> Path:
    """Timing caches are only valid for one TensorRT version and GPU architecture: one file each."""
    return Path(folder) / f"timing-trt{tensorrt_version}-sm{compute_capability.replace('.', '')}.cache"


def network_flags(trt) -> int:
    """``create_network`` flags for a strongly typed network in TensorRT 10 and 11."""
    if trt_major(trt) >= 11:
        return 0  # strongly typed is the default (and the only mode) in 11.x
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: Mapping[str, MinOptMax],
    *,
    workspace_gb: float | None = None,
    timing_cache: Path | None = None,
    verbose: bool = False,
) -> float:
    """Build ``engine_path`` from ``onnx_path`` with one optimisation profile. Returns seconds.

    ``profile``: input name -> (min, opt, max) shape. Writes the engine atomically; raises
    :class:`EngineError` with the parser's or builder's first error.
    """
    trt = import_tensorrt()
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # path: resolves external weights beside the graph
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT cannot parse '{onnx_path}': {(errors or ['unknown error'])[0][:200]}")

    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        trt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(trt_profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            f"TensorRT could not build an engine from '{onnx_path}' (see its log above); if it ran out of "
            "memory, lower --max-batch or --max-size, or raise --workspace"
        )
    tmp = engine_path.with_name(f".{engine_path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(serialized)
    os.replace(tmp, engine_path)
    if timing_cache is not None:
        data = config.get_timing_cache().serialize()
        tmp_cache = timing_cache.with_name(f".{timing_cache.name}.tmp")
        with open(tmp_cache, "wb") as f:
            f.write(data)
        os.replace(tmp_cache, timing_cache)
    return time.perf_counter() - t0
