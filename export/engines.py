"""``export_engines``: the engine folder's two stages per network, each "current: say so and
skip, else do" (the shape of StreamDiffusion's ``EngineBuilder.build``).

1. ONNX: export through the wrapper module, clean, check, validate against PyTorch in ONNX
   Runtime (:mod:`export.onnx_export`); skipped when the recorded graph's key matches and its
   file is whole.
2. TensorRT (``format="tensorrt"``): build the engine with the spec's profile and validate it
   against ONNX Runtime at every corner of the profile (:mod:`export.tensorrt_build`); skipped
   likewise.

``manifest.json`` is rewritten after every finished network, so an interrupted export keeps
what it finished.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2v_fast.config import resolve_device
from p2v_fast.errors import EngineError, InputError, one_line
from p2v_fast.nets.export_options import ExportOptions
from p2v_fast.nets.manifest import (
    Artifact,
    Machine,
    Manifest,
    NetworkEntry,
    artifact_names,
    engine_key,
    onnx_key,
    read_manifest,
    write_manifest,
)
from p2v_fast.nets.specs import LEGACY_NETWORKS, NETWORKS, ExportProfile, Geometry, NetworkSpec, network_specs
from p2v_fast.progress import NullProgress, Progress
from p2v_fast.weights.models import ModelId, model_id

__all__ = ["ExportReport", "StageResult", "export_engines"]

#: The prefix of an engine being built and checked, beside the folder's files (never listed).
BUILDING = ".building-"


@dataclass
class StageResult:
    """One row of the summary: a network's artifact, what happened to it, and its cost."""

    network: str
    stage: str  # "onnx" or "tensorrt"
    file: Path
    bytes: int
    seconds: float
    status: str  # "exported", "built" or "cached"
    detail: str = ""  # e.g. the validation error


@dataclass
class ExportReport:
    folder: Path
    manifest: Path
    rows: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """`p2v export --json`: the folder, the manifest and one entry per artifact."""
        return {"folder": str(self.folder), "manifest": str(self.manifest), "seconds": self.seconds,
                "rows": [{**asdict(r), "file": str(r.file)} for r in self.rows]}


@dataclass
class _Export:
    """What every stage of one export reads and writes."""

    options: ExportOptions
    progress: Progress
    models: Any  # the model set, in the export dtype
    device: Any  # torch.device
    folder: Path
    machine: Machine | None  # the GPU engines are built (and pinned) on now; None: graphs only
    built_on: Machine | None  # the GPU the folder's earlier engines were built on
    model: ModelId
    geometry: Geometry
    profile: ExportProfile
    specs: dict[str, NetworkSpec]
    manifest: Manifest
    report: ExportReport


def export_engines(options: ExportOptions, progress: Progress | None = None, models=None) -> ExportReport:
    """Export (and build) the engine folder ``options.out``; returns the summary.

    ``models``: an already loaded model set in the export dtype (tests); by default the model is
    loaded on ``options.device``. Raises :class:`~p2v_fast.errors.BackendUnavailableError`
    before any work when TensorRT is asked for and absent,
    :class:`~p2v_fast.errors.ExportValidationError` when a graph disagrees with PyTorch.
    """
    progress = progress or NullProgress()
    t_start = time.perf_counter()
    # 1. Check the machine (TensorRT and a CUDA GPU for engines) and the folder, before any work
    device, machine = _check_machine(options, models)
    folder = Path(options.out)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--engines '{folder}' is a file, not a folder")
    # 2. Load the model in the export dtype
    models = _load_models(options, models, device, progress)
    # 3. Open the folder (only now: a failed load leaves no empty folder), drop pre-contract graphs
    _open_folder(folder, progress)
    # 4. Plan: the specs, and a manifest that keeps what an earlier export left current
    run = _plan(options, progress, models, device, folder, machine)
    advance = progress.stage("export", len(run.specs) * (2 if machine is not None else 1))
    # 5. Per network: the ONNX stage, then the engine stage; the manifest is written after each
    for name, spec in run.specs.items():
        entry = run.manifest.networks.get(name) or NetworkEntry(spec)
        entry.spec = spec
        earlier_engine = entry.engine
        key = onnx_key(spec, run.model, options.opset, options.exporter)
        _onnx_stage(run, name, entry, key)
        advance(1)
        if machine is None:
            _drop_stale_engine(run, entry, earlier_engine, key)
        else:
            _engine_stage(run, name, entry, key)
            advance(1)
        run.manifest.networks[name] = entry
        write_manifest(folder, run.manifest)
    # 6. Engines of networks not exported now: kept only if they match this profile and machine
    _settle_engines(run)
    run.report.seconds = time.perf_counter() - t_start
    return run.report


def _check_machine(options: ExportOptions, models) -> tuple[Any, Machine | None]:
    """The device to export on, and for ``format="tensorrt"`` the GPU the engines are built on
    (TensorRT and a CUDA device are required before any work: say why not)."""
    _require_onnxruntime(options)
    if options.format != "tensorrt":
        return (models.device if models is not None else resolve_device(options.device)), None
    from p2v_fast.nets.manifest import this_machine
    from p2v_fast.nets.system import require_tensorrt

    require_tensorrt("use --format onnx")
    device = models.device if models is not None else resolve_device(options.device)
    machine = this_machine(device)
    if machine.gpu is None:
        raise InputError(f"TensorRT engines are built on a CUDA device, not --device {device}")
    return device, machine


def _require_onnxruntime(options: ExportOptions) -> None:
    """Every graph is checked against PyTorch in ONNX Runtime, and every engine against its graph:
    without ONNX Runtime (``[tensorrt]`` alone installs none) say so before any work."""
    from p2v_fast.errors import BackendUnavailableError
    from p2v_fast.nets.system import onnxruntime_status

    if onnxruntime_status()[0]:
        return
    if options.format == "tensorrt":
        what, install = "graph and engine", "pip install 'p2v-fast[onnx-gpu,tensorrt]'"
    else:
        what, install = "graph", "pip install 'p2v-fast[onnx]' (or '[onnx-gpu]' on a GPU machine)"
    raise BackendUnavailableError(f"p2v export checks every {what} in ONNX Runtime, which is not installed: {install}")


def _load_models(options: ExportOptions, models, device, progress: Progress):
    """``models`` if given (and in the export dtype), else the model loaded on ``device``."""
    import torch

    dtype = torch.float16 if options.precision == "fp16" else torch.float32
    if models is not None:
        if models.dtype != dtype:
            raise InputError(f"models are loaded in {models.dtype}, but --dtype {options.precision} needs {dtype}")
        return models
    from p2v_fast.weights.models import load_models

    progress.log(f"loading {options.model} ({options.precision}) on {device}")
    return load_models(options.model, device=device, dtype=dtype)


def _open_folder(folder: Path, progress: Progress) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create --out '{folder}': {one_line(e)}") from None
    _remove_legacy(folder, progress)


def _plan(options: ExportOptions, progress: Progress, models, device, folder: Path,
          machine: Machine | None) -> _Export:
    """The specs to export and the manifest to fill: the folder's earlier entries for the same
    model, precision and opset are kept (unless ``force``, only those whose spec is unchanged)."""
    from p2v_fast.nets.specs import geometry_of

    mid = model_id(models)
    geometry = geometry_of(models)
    profile = options.profile()
    specs = network_specs(geometry, options.precision, options.networks)
    entries, built_on = _previous(folder, mid, options.precision, options.opset)
    if not options.force:
        entries = {k: v for k, v in entries.items() if k not in specs or v.spec == specs[k]}
    manifest = Manifest(
        model=mid, precision=options.precision, opset=options.opset, geometry=geometry, profile=profile,
        options=options.recorded(), machine=machine or built_on, networks=dict(entries),
        versions=_versions(),
    )
    return _Export(options, progress, models, device, folder, machine, built_on, mid, geometry, profile, specs,
                   manifest, ExportReport(folder, folder / "manifest.json"))


def _onnx_stage(run: _Export, name: str, entry: NetworkEntry, key: str) -> None:
    """ONNX current: say so and skip; else export, validate and record it (a new graph
    invalidates the network's engine)."""
    from export import onnx_export
    from p2v_fast.nets.specs import sample_inputs

    folder, spec = run.folder, entry.spec
    if not run.options.force and _current(entry.onnx, key, folder):
        assert entry.onnx is not None
        run.report.rows.append(StageResult(name, "onnx", folder / entry.onnx.file,
                                           entry.onnx.bytes + entry.onnx.data_bytes, 0.0, "cached"))
        run.progress.log(f"{name}: ONNX current, skipped")
        return
    entry.engine = None  # a new graph invalidates the engine
    module = onnx_export.graph_module(name, run.models)
    # trace and validate small: 2 samples (1 anchor-like, 1 cross-frame), or the static batch
    profile = run.profile
    b, h, w = min(profile.batch[2], max(profile.batch[0], 2)), profile.height[0], profile.width[0]
    inputs = sample_inputs(spec, spec.dims(run.geometry, b, h, w), device=run.device)
    result = onnx_export.export_onnx(spec, module, inputs, folder, run.options.opset, run.device, run.geometry,
                                     run.options.exporter, run.options.cleaner)
    entry.onnx = Artifact(
        file=result.path.name, key=key, bytes=result.path.stat().st_size, seconds=round(result.seconds, 3),
        data_file=result.data_path.name if result.data_path else None,
        data_bytes=result.data_path.stat().st_size if result.data_path else 0,
    )
    entry.validation = result.worst
    detail = f"{result.worst['rel']:.1e} ({result.worst['output']}) vs PyTorch"
    run.report.rows.append(StageResult(name, "onnx", result.path, entry.onnx.bytes + entry.onnx.data_bytes,
                                       result.seconds, "exported", detail))
    run.progress.log(f"{name}: ONNX exported ({result.cleaner}) and validated in {result.seconds:.1f} s, "
                     f"ONNX Runtime vs PyTorch max rel err {result.worst['rel']:.1e} ({result.worst['output']})")


def stale_engine(folder: Path, network: str) -> Path:
    """The engine file a graphs-only re-export removes when ``network``'s engine is stale: the one
    this export's TensorRT stage writes (``<network>.plan``), never a name read from the manifest."""
    return folder / artifact_names(network)["engine"]


def _drop_stale_engine(run: _Export, entry: NetworkEntry, earlier_engine: Artifact | None, key: str) -> None:
    """Graphs only: an earlier engine stays while still current (same graph, profile and
    machine); otherwise its file is deleted, not left behind unlisted."""
    if earlier_engine is None:
        return
    shapes = entry.spec.profile_shapes(run.geometry, run.profile)
    if run.built_on is None or not _current(entry.engine, engine_key(key, shapes, run.built_on), run.folder):
        stale_engine(run.folder, entry.spec.name).unlink(missing_ok=True)  # never a name read from the manifest
        entry.engine = None


def _engine_stage(run: _Export, name: str, entry: NetworkEntry, key: str) -> None:
    """Engine current: say so and skip; else build, validate against ONNX Runtime and record it."""
    assert run.machine is not None
    shapes = entry.spec.profile_shapes(run.geometry, run.profile)
    entry.profile = {k: [list(s) for s in v] for k, v in shapes.items()}
    ekey = engine_key(key, shapes, run.machine)
    if not run.options.force and _current(entry.engine, ekey, run.folder):
        assert entry.engine is not None
        run.report.rows.append(StageResult(name, "tensorrt", run.folder / entry.engine.file, entry.engine.bytes,
                                           0.0, "cached"))
        run.progress.log(f"{name}: TensorRT engine current, skipped")
        return
    entry.engine = None
    write_manifest(run.folder, run.manifest)  # the old engine is no longer listed while this one builds
    entry.engine, entry.engine_validation, row = _build_and_validate(run, name, entry, shapes, ekey)
    run.report.rows.append(row)


def _settle_engines(run: _Export) -> None:
    """After the networks of this export: with engines built now, the other networks' engines
    must match the new profile and machine too (else they are unlisted); with graphs only, the
    manifest forgets the machine once no engine is left."""
    manifest = run.manifest
    if run.machine is not None:
        for name, entry in manifest.networks.items():
            if name not in run.specs and entry.engine is not None and entry.onnx is not None:
                shapes = entry.spec.profile_shapes(run.geometry, run.profile)
                if entry.engine.key != engine_key(entry.onnx.key, shapes, run.machine):
                    entry.engine = None
        write_manifest(run.folder, manifest)
    elif manifest.machine is not None and not manifest.has_engines:
        manifest.machine = None  # no engine is left from the earlier build
        write_manifest(run.folder, manifest)


def _build_and_validate(run: _Export, name: str, entry: NetworkEntry, shapes,
                        ekey: str) -> tuple[Artifact, dict, StageResult]:
    """Build ``name``'s engine on the run's device, then validate it against ONNX Runtime on the
    spec's sample inputs at the profile's minimum, opt and maximum batch and size (ONNX Runtime in
    batch slices within a memory budget); only an engine within the spec's tolerance at every
    corner is returned (to be recorded). The engine is built under a temporary name and takes its
    own only once validated; whatever fails (the build, the check, an interruption), neither file
    is left: not the new engine, nor the earlier one the manifest no longer lists."""
    import torch

    from export import tensorrt_build

    assert entry.onnx is not None and run.machine is not None
    path = run.folder / artifact_names(name)["engine"]
    building = run.folder / f"{BUILDING}{path.name}"
    onnx_path = run.folder / entry.onnx.file
    device = run.device
    pinned = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    building.unlink(missing_ok=True)  # left by a run that was killed
    try:
        with pinned:  # TensorRT builds on the current CUDA device: pin it to --device
            seconds = tensorrt_build.build_engine(onnx_path, building, shapes, workspace_gb=run.options.workspace_gb,
                                                  timing_cache=tensorrt_build.timing_cache_path(run.folder,
                                                                                                run.machine),
                                                  log=run.progress.log, tf32=entry.spec.tf32)
        cases = tensorrt_build.validation_cases(entry.spec, run.geometry, run.profile)  # every corner of the profile
        worst = tensorrt_build.validate_engine(building, onnx_path, entry.spec, run.geometry, cases, device,
                                               heads=_heads(run.models) if name == "unet" else None)
        os.replace(building, path)
    except BaseException:
        path.unlink(missing_ok=True)  # the earlier engine: no longer listed, so not left behind
        raise
    finally:
        building.unlink(missing_ok=True)
    detail = f"{worst['rel']:.1e} ({worst['output']}) vs ONNX Runtime"
    run.progress.log(f"{name}: TensorRT engine built in {seconds:.1f} s; TensorRT vs ONNX Runtime max rel err "
                     f"{worst['rel']:.1e} ({worst['output']}) at the profile's {', '.join(cases)} corners")
    artifact = Artifact(path.name, ekey, path.stat().st_size, round(seconds, 3))
    return artifact, worst, StageResult(name, "tensorrt", path, artifact.bytes, seconds, "built", detail)


def _heads(models) -> list[int] | None:
    """Attention heads of the UNet's injected layers (for the check's memory estimate), or None."""
    from p2v_fast.nets.attention import injected_layer_names

    unet = getattr(models, "unet", None)
    if unet is None:
        return None
    modules = dict(unet.named_modules())
    return [int(modules[n].heads) for n in injected_layer_names(unet)]


def _current(art: Artifact | None, key: str, folder: Path) -> bool:
    return art is not None and art.key == key and art.problem(folder) is None


def _previous(folder: Path, model: ModelId, precision: str,
              opset: int) -> tuple[dict[str, NetworkEntry], Machine | None]:
    """Entries of an existing manifest that can be reused (same model, precision, opset), and
    the machine its engines were built on."""
    try:
        old = read_manifest(folder)
    except EngineError:
        return {}, None
    if old.model.digest != model.digest or old.precision != precision or old.opset != opset:
        return {}, None
    return {k: v for k, v in old.networks.items() if k in NETWORKS}, old.machine


def _remove_legacy(folder: Path, progress: Progress) -> None:
    """Delete the two UNet graphs/engines of a folder from before the one-graph contract
    (``unet_anchor``, ``unet_xframe``: the same weights twice, 3.3 GB each for SD2-depth in fp32):
    the folder's ``unet`` replaces both."""
    for name in LEGACY_NETWORKS:
        gone = [p for p in (folder / f"{name}.onnx", folder / f"{name}.onnx.data", folder / f"{name}.plan")
                if p.is_file()]
        for p in gone:
            p.unlink()
        if gone:
            progress.log(f"removed {', '.join(p.name for p in gone)} (replaced by the one unet graph)")


def _versions() -> dict:
    import onnx
    import torch

    import p2v_fast

    return {"p2v_fast": p2v_fast.__version__, "torch": torch.__version__, "onnx": onnx.__version__}
