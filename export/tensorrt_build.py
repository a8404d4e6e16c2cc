"""Build a TensorRT engine from an exported ONNX graph, and prove it equals ONNX Runtime.

TensorRT 10 and 11 Python API:

- Networks are strongly typed: the ONNX already carries fp16 where fp16 is wanted (TensorRT
  11 removed ``BuilderFlag.FP16``; its ``create_network()`` is strongly typed by default, and
  10.x takes ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``). See NVIDIA's "Migrating from
  TensorRT 10.x to 11.x" guide, "Strongly Typed Networks Are Now Required".
- One optimisation profile per engine, from the spec (min/opt/max shape of every input).
- The workspace limit is exposed (building the SD UNet can exhaust GPU memory).
- TF32 (on by default for fp32 layers) is cleared where the spec does not allow it: fp32
  networks, whose 1e-4 check TF32 alone fails (``p2v_fast.nets.specs``, the TF32 note).
- A timing cache per TensorRT version and GPU (name and compute capability) is loaded before and
  saved after every build, so rebuilding (another size, another profile) reuses measured
  tactics. ``set_timing_cache``'s result is checked; a cache TensorRT refuses (made on another
  device or version) is replaced by a new one, with a note, instead of failing the build.
- The parser reads from the file path, so graphs with external weights load; every parser
  error is kept in the message.
- The caller pins the build to the chosen ``--device`` (TensorRT builds on the current CUDA
  device).
- :func:`validate_engine` runs the built engine and ONNX Runtime on the spec's sample inputs and
  compares every output within the spec's tolerance, before the manifest records the engine;
  ONNX Runtime runs each batch in slices that keep its attention scores within a memory budget.

TensorRT is imported lazily: nothing here is needed for ``--format onnx``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from p2v_fast.errors import EngineError, one_line
from p2v_fast.files import write_bytes_atomic
from p2v_fast.nets.manifest import Machine, outside
from p2v_fast.nets.specs import ExportProfile, Geometry, MinOptMax, NetworkSpec
from p2v_fast.nets.system import import_tensorrt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def timing_cache_path(folder: Path, machine: Machine) -> Path:
    """Timing caches are only valid for one TensorRT version on one GPU: one file each, named by
    TensorRT version, GPU name and compute capability."""
    gpu = re.sub(r"[^a-z0-9]+", "-", (machine.gpu or "gpu").lower()).strip("-")
    cc = (machine.compute_capability or "0").replace(".", "")
    return Path(folder) / f"timing-trt{machine.tensorrt}-{gpu}-sm{cc}.cache"


def network_flags(trt) -> int:
    """``create_network`` flags for a strongly typed network in TensorRT 10 and 11."""
    if trt_major(trt) >= 11:
        return 0  # strongly typed is the default (and the only mode) in 11.x
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _set_timing_cache(config, cache_bytes: bytes, source: Path | None, log: Callable[[str], None]) -> None:
    """Load ``cache_bytes`` into ``config``; a cache TensorRT refuses is replaced by an empty one."""
    cache = config.create_timing_cache(cache_bytes) if cache_bytes else None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if cache_bytes:
        log(f"timing cache '{source}' was made on another GPU or TensorRT version; starting a new one")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineError("TensorRT refused a new, empty timing cache")


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: Mapping[str, MinOptMax],
    *,
    workspace_gb: float | None = None,
    timing_cache: Path | None = None,
    verbose: bool = False,
    log: Callable[[str], None] = lambda message: None,
    tf32: bool = True,
    trt=None,
) -> float:
    """Build ``engine_path`` from ``onnx_path`` with one optimisation profile. Returns seconds.

    ``profile``: input name -> (min, opt, max) shape. ``tf32=False`` clears ``BuilderFlag.TF32``
    (on by default: fp32 layers would round their inputs to a 10-bit mantissa; the spec says
    where that is allowed, :data:`p2v_fast.nets.specs.TOLERANCE`). Writes the engine (and the timing cache)
    atomically; raises :class:`EngineError` with every parser error, or the builder's failure.
    ``trt``: the TensorRT module (tests pass a stand-in).
    """
    trt = trt or import_tensorrt()
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # path: resolves external weights beside the graph
        errors = [one_line(str(parser.get_error(i)), whole=True) for i in range(parser.num_errors)] or ["unknown error"]
        raise EngineError(f"TensorRT cannot parse '{onnx_path}' ({len(errors)} error(s)): " + " | ".join(errors))

    config = builder.create_builder_config()
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        try:  # set_shape raises on a shape TensorRT refuses (it returns nothing)
            trt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        except Exception as exc:
            raise EngineError(f"TensorRT refused the profile of input '{name}' (min {tuple(lo)}, opt {tuple(opt)}, "
                              f"max {tuple(hi)}) for '{onnx_path}': {one_line(exc)}") from None
    if config.add_optimization_profile(trt_profile) < 0:
        raise EngineError(f"TensorRT refused the optimisation profile {dict(profile)} for '{onnx_path}'")

    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() and outside(
        timing_cache.parent, timing_cache.name) is None else b""  # never read through a link out of the folder
    _set_timing_cache(config, cache_bytes, timing_cache, log)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            f"TensorRT could not build an engine from '{onnx_path}' (see its log above); if it ran out of "
            "memory, lower --max-batch or --max-size, or raise --workspace"
        )
    write_bytes_atomic(engine_path, serialized, "the engine")
    if timing_cache is not None:
        write_bytes_atomic(timing_cache, config.get_timing_cache().serialize(), "the timing cache")
    return time.perf_counter() - t0


def validation_cases(spec: NetworkSpec, geometry: Geometry, profile: ExportProfile) -> dict[str, dict]:
    """Sample inputs (the spec's, :func:`~p2v_fast.nets.specs.sample_inputs`) at every corner of the
    profile an engine must serve: ``min`` (smallest batch at the smallest size), ``opt`` (2 samples,
    one anchor-like and one cross-frame, or the static batch, at the opt size) and ``max``
    (largest batch at the largest size). Corners that coincide are run once."""
    from p2v_fast.nets.specs import sample_inputs

    b, h, w = profile.batch, profile.height, profile.width
    corners = {"min": (b[0], h[0], w[0]), "opt": (min(b[2], max(b[0], 2)), h[1], w[1]), "max": (b[2], h[2], w[2])}
    cases, seen = {}, set()
    for label, (batch, height, width) in corners.items():
        dims = spec.dims(geometry, batch, height, width)
        key = tuple(sorted(dims.items()))
        if key not in seen:
            seen.add(key)
            cases[label] = sample_inputs(spec, dims, seed=1)
    return cases


#: What an engine check compares: the engine in TensorRT with its graph in ONNX Runtime.
VS_ONNX_RUNTIME = ("TensorRT", "ONNX Runtime")

#: Channels per attention head where a model's heads are not given (SD2's UNet: 64 throughout).
HEAD_WIDTH = 64


def score_bytes_per_sample(spec: NetworkSpec, dims: Mapping[str, int], heads: Sequence[int] | None = None) -> int:
    """Attention-score bytes one sample of ``spec`` holds in ONNX Runtime at ``dims``
    (:func:`~p2v_fast.nets.memory.attention_score_bytes`, in the graph's float type): the UNet's
    largest injected self-attention (``heads`` per injected layer, default channels /
    :data:`HEAD_WIDTH`; n_k queries, m_k = 2 n_k keys), the VAE's mid-block attention (one head over
    the latent's cells); 0 for ``depth`` (a fixed, small size)."""
    from p2v_fast.nets.memory import attention_score_bytes

    size = 2 if spec.inputs[0].dtype == "float16" else 4
    if spec.name == "unet":
        channels = [int(t.shape[-1]) for t in spec.inputs if t.name.startswith("ref_")]
        heads = heads or [max(1, c // HEAD_WIDTH) for c in channels]
        return max(attention_score_bytes(n, dims[f"n{k}"], dims[f"m{k}"], size) for k, n in enumerate(heads))
    if spec.name in ("vae_encoder", "vae_decoder"):
        cells = dims["h"] * dims["w"]
        return attention_score_bytes(1, cells, cells, size)
    return 0


def validate_engine(engine_path: Path, onnx_path: Path, spec: NetworkSpec, geometry: Geometry,
                    cases: Mapping[str, Mapping[str, torch.Tensor]], device: torch.device, *, trt=None,
                    ops=None, budget: int | None = None, heads: Sequence[int] | None = None) -> dict:
    """Run the engine at ``engine_path`` and the ONNX graph it was built from (ONNX Runtime, TF32
    off) on every case of ``cases`` (label -> inputs: :func:`validation_cases`, the profile's
    corners) and compare every output within the spec's tolerance.

    The engine runs each case's whole batch; ONNX Runtime, which holds every attention layer's
    scores in full (~50 GB for SD2-depth's UNet at batch 8 and 896x896 in fp16), runs it in slices
    of as many samples as keep :func:`score_bytes_per_sample` within ``budget`` bytes (default:
    :func:`~p2v_fast.nets.memory.check_budget` where the reference runs), and each slice is
    compared with the engine's samples; the errors combine into exactly the whole batch's.

    Returns the worst output over the cases (``compare_outputs``, with ``at``: its case); raises
    :class:`~p2v_fast.errors.ExportValidationError` naming the output, the case and the error
    otherwise, and a one-line :class:`EngineError` when ONNX Runtime fails. ``trt`` and ``ops``:
    the TensorRT module and the CUDA side (tests pass stand-ins).
    """
    from export.onnx_export import judge_errors, merge_errors, output_errors, reference_session
    from p2v_fast.errors import ExportValidationError
    from p2v_fast.nets.backend_tensorrt import EngineRunner, TorchCuda
    from p2v_fast.nets.memory import check_budget, samples_per_slice

    trt = trt or import_tensorrt()
    ops = ops or TorchCuda(device)
    reference = reference_session(onnx_path, spec, geometry, device)
    worst: dict = {}
    with ops.on_device():
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise EngineError(f"TensorRT cannot load the engine it just built, '{engine_path}'")
        runner = EngineRunner(trt, engine, spec, geometry, ops=ops, stream=ops.new_stream(), hint="")
        runner.activate(ops.zeros((max(runner.device_memory_size, 1),), torch.uint8))
        budget = check_budget(reference.device) if budget is None else budget  # what the engine left free
        for label, inputs in cases.items():
            feeds = {n: x.to(device) for n, x in inputs.items()}
            got = runner.run(feeds)
            ops.synchronize()
            dims = spec.bind(geometry, {n: tuple(x.shape) for n, x in feeds.items()})
            at = f"{label}: batch {dims['B']}" + (f" at {dims['H']}x{dims['W']}" if "H" in dims else "")
            step = samples_per_slice(score_bytes_per_sample(spec, dims, heads), dims["B"], budget)
            errors: dict = {}
            for start in range(0, dims["B"], step):
                part = slice(start, start + step)
                try:
                    want = reference.run({n: x[part] for n, x in feeds.items()})
                except EngineError as exc:
                    raise EngineError(f"{exc} (the reference for the engine at the profile's {at}, "
                                      f"{step} sample(s) a run)") from None
                errors = merge_errors(errors, output_errors(spec, {n: y[part] for n, y in got.items()}, want,
                                                            VS_ONNX_RUNTIME))
            try:
                result = judge_errors(spec, errors, VS_ONNX_RUNTIME)
            except ExportValidationError as exc:
                raise ExportValidationError(f"{exc} (engine at the profile's {at})") from None
            if not worst or result["rel"] > worst["rel"]:
                worst = {**result, "at": at}
    return worst
