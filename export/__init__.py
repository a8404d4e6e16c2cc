"""Export the networks (unet, vae_encoder, vae_decoder, depth) to ONNX and build TensorRT engines: ``export_engines``.

Stages per network, each skipped when its artifact is current (its key, see
:mod:`p2v_fast.nets.manifest`, matches and its file is whole) unless ``force``:

1. ONNX: export through the wrapper module, clean, check, validate against PyTorch in ONNX
   Runtime (:mod:`export.onnx_export`).
2. TensorRT (``format="tensorrt"``): build the engine with the spec's profile
   (:mod:`export.tensorrt_build`).

``manifest.json`` is rewritten after every finished network, so an interrupted export keeps
what it finished. ``p2v export`` is the CLI over this function.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from p2v_fast.errors import EngineError, InputError
from p2v_fast.nets.export_options import CLEANERS, DEFAULT_ENGINES, EXPORTERS, FORMATS, WIDEST_DEFAULT, ExportOptions
from p2v_fast.nets.manifest import (
    Artifact,
    Machine,
    Manifest,
    NetworkEntry,
    engine_key,
    onnx_key,
    read_manifest,
    write_manifest,
)
from p2v_fast.nets.specs import LEGACY_NETWORKS, NETWORKS, ExportProfile, network_specs
from p2v_fast.progress import NullProgress, Progress
from p2v_fast.weights.models import ModelId, model_id

__all__ = ["CLEANERS", "DEFAULT_ENGINES", "EXPORTERS", "FORMATS", "WIDEST_DEFAULT", "ExportOptions", "ExportReport",
           "export_engines"]


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


def _device(name: str):
    import torch

    from p2v_fast.nets.runtime import resolve_device

    return resolve_device(name) if name != "auto" else torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def export_engines(options: ExportOptions, progress: Progress | None = None, models=None) -> ExportReport:
    """Export (and build) the engine folder ``options.out``; returns the summary.

    ``models``: an already loaded model set in the export dtype (tests); by default the model is
    loaded on ``options.device``. Raises :class:`~p2v_fast.errors.BackendUnavailableError`
    before any work when TensorRT is asked for and absent,
    :class:`~p2v_fast.errors.ExportValidationError` when a graph disagrees with PyTorch.
    """
    import torch

    from export import onnx_export
    from p2v_fast.nets.specs import geometry_of, sample_inputs

    progress = progress or NullProgress()
    t_start = time.perf_counter()
    machine: Machine | None = None
    if options.format == "tensorrt":
        from p2v_fast.nets.manifest import this_machine
        from p2v_fast.nets.system import require_tensorrt

        require_tensorrt("use --format onnx")  # before any work: TensorRT and a CUDA GPU, or say why not
    device = models.device if models is not None else _device(options.device)
    if options.format == "tensorrt":
        machine = this_machine(device)  # the GPU the engines are built (and pinned) on
        if machine.gpu is None:
            raise InputError(f"TensorRT engines are built on a CUDA device, not --device {device}")

    folder = Path(options.out)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--engines '{folder}' is a file, not a folder")
    dtype = torch.float16 if options.precision == "fp16" else torch.float32
    if models is None:
        from p2v_fast.weights.models import load_models

        progress.log(f"loading {options.model} ({options.precision}) on {device}")
        models = load_models(options.model, device=device, dtype=dtype)
    else:
        if models.dtype != dtype:
            raise InputError(f"models are loaded in {models.dtype}, but --precision {options.precision} needs {dtype}")
    try:  # only once the model has loaded: a failed export leaves no empty folder
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create --out '{folder}': {e.strerror or e}") from None
    _remove_legacy(folder, progress)
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
    report = ExportReport(folder, folder / "manifest.json")
    stages = len(specs) * (2 if options.format == "tensorrt" else 1)
    advance = progress.stage("export", stages)

    for name, spec in specs.items():
        entry = manifest.networks.get(name) or NetworkEntry(spec)
        entry.spec = spec
        earlier_engine = entry.engine
        key = onnx_key(spec, mid, options.opset, options.exporter)
        if not options.force and _current(entry.onnx, key, folder):
            assert entry.onnx is not None
            report.rows.append(StageResult(name, "onnx", folder / entry.onnx.file,
                                           entry.onnx.bytes + entry.onnx.data_bytes, 0.0, "cached"))
            progress.log(f"{name}: ONNX current, skipped")
        else:
            entry.engine = None  # a new graph invalidates the engine
            module = onnx_export.graph_module(name, models)
            # trace and validate small: 2 samples (1 anchor-like, 1 cross-frame), or the static batch
            b, h, w = min(profile.batch[2], max(profile.batch[0], 2)), profile.height[0], profile.width[0]
            inputs = sample_inputs(spec, spec.dims(geometry, b, h, w), device=device)
            result = onnx_export.export_onnx(spec, module, inputs, folder, options.opset, device, geometry,
                                             options.exporter, options.cleaner)
            entry.onnx = Artifact(
                file=result.path.name, key=key, bytes=result.path.stat().st_size, seconds=round(result.seconds, 3),
                data_file=result.data_path.name if result.data_path else None,
                data_bytes=result.data_path.stat().st_size if result.data_path else 0,
            )
            entry.validation = result.worst
            detail = f"{result.worst['rel']:.1e} ({result.worst['output']})"
            report.rows.append(StageResult(name, "onnx", result.path, entry.onnx.bytes + entry.onnx.data_bytes,
                                           result.seconds, "exported", detail))
            progress.log(f"{name}: ONNX exported ({result.cleaner}) and validated in {result.seconds:.1f} s, "
                         f"max rel err {detail}")
        advance(1)

        if machine is None and earlier_engine is not None:  # graphs only: an earlier engine stays if still current
            shapes = spec.profile_shapes(geometry, profile)
            if built_on is None or not _current(entry.engine, engine_key(key, shapes, built_on), folder):
                (folder / earlier_engine.file).unlink(missing_ok=True)  # not left behind unlisted
                entry.engine = None
        if machine is not None:
            shapes = spec.profile_shapes(geometry, profile)
            entry.profile = {k: [list(s) for s in v] for k, v in shapes.items()}
            ekey = engine_key(key, shapes, machine)
            if not options.force and _current(entry.engine, ekey, folder):
                assert entry.engine is not None
                report.rows.append(StageResult(name, "tensorrt", folder / entry.engine.file, entry.engine.bytes,
                                               0.0, "cached"))
                progress.log(f"{name}: TensorRT engine current, skipped")
            else:
                entry.engine = None
                write_manifest(folder, manifest)  # the old engine is no longer listed while this one builds
                entry.engine, entry.engine_validation, row = _build_and_validate(
                    name, spec, entry, shapes, ekey, folder, machine, geometry, profile, device, options, progress)
                report.rows.append(row)
            advance(1)
        manifest.networks[name] = entry
        write_manifest(folder, manifest)

    if machine is not None:  # engines of networks not rebuilt now must match the new profile too
        for name, entry in manifest.networks.items():
            if name not in specs and entry.engine is not None and entry.onnx is not None:
                shapes = entry.spec.profile_shapes(geometry, profile)
                if entry.engine.key != engine_key(entry.onnx.key, shapes, machine):
                    entry.engine = None
        write_manifest(folder, manifest)
    elif manifest.machine is not None and not manifest.has_engines:
        manifest.machine = None  # no engine is left from the earlier build
        write_manifest(folder, manifest)

    report.seconds = time.perf_counter() - t_start
    return report


def _build_and_validate(name: str, spec, entry: NetworkEntry, shapes, ekey: str, folder: Path, machine: Machine,
                        geometry, profile: ExportProfile, device, options: ExportOptions,
                        progress: Progress) -> tuple[Artifact, dict, StageResult]:
    """Build ``name``'s engine on ``device``, then validate it against ONNX Runtime on the spec's
    sample inputs at the profile's minimum, opt and maximum batch and size; only an engine within
    the spec's tolerance at every corner is returned (to be recorded). A failing engine file is
    deleted."""
    import torch

    from export import tensorrt_build

    assert entry.onnx is not None
    path = folder / f"{name}.plan"
    onnx_path = folder / entry.onnx.file
    pinned = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with pinned:  # TensorRT builds on the current CUDA device: pin it to --device
        seconds = tensorrt_build.build_engine(onnx_path, path, shapes, workspace_gb=options.workspace_gb,
                                              timing_cache=tensorrt_build.timing_cache_path(folder, machine),
                                              log=progress.log, tf32=spec.tf32)
    cases = tensorrt_build.validation_cases(spec, geometry, profile)  # every corner of the profile
    try:
        worst = tensorrt_build.validate_engine(path, onnx_path, spec, geometry, cases, device)
    except EngineError:
        path.unlink(missing_ok=True)  # never leave an engine that failed its check under its name
        raise
    detail = f"{worst['rel']:.1e} ({worst['output']})"
    progress.log(f"{name}: TensorRT engine built in {seconds:.1f} s, equals ONNX Runtime to {detail} at the "
                 f"profile's {', '.join(cases)} corners")
    artifact = Artifact(path.name, ekey, path.stat().st_size, round(seconds, 3))
    return artifact, worst, StageResult(name, "tensorrt", path, artifact.bytes, seconds, "built", detail)


def _versions() -> dict:
    import onnx
    import torch

    import p2v_fast

    return {"p2v_fast": p2v_fast.__version__, "torch": torch.__version__, "onnx": onnx.__version__}


__all__ = ["ExportOptions", "ExportReport", "StageResult", "export_engines"]
