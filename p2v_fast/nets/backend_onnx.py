"""ONNX Runtime backend: the exported graphs on the CPU here, CUDA / TensorRT execution
providers where installed.

Every call goes through IO binding by the spec's names: inputs are bound where the torch
tensors already live (no copy), outputs are preallocated torch tensors of the shapes the spec
derives from the inputs, so results come back as torch tensors on the backend's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from p2v_fast.errors import BackendUnavailableError, EngineError, one_line
from p2v_fast.nets.graph_backend import GraphBackend, engines_folder, load_checked_manifest
from p2v_fast.nets.manifest import check_files, rebuild_command
from p2v_fast.nets.specs import Geometry, MinOptMax, NetworkSpec

_NP = {"float16": np.float16, "float32": np.float32, "int64": np.int64, "int32": np.int32}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError(
            "ONNX Runtime is not installed (pip install 'p2v-fast[onnx]'); use --backend torch"
        ) from None
    return ort


def profile_option(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A TensorRT provider profile string: ``"sample:2x5x64x64,timestep:2,..."``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def tensorrt_provider_options(device_id: int, cache_dir: Path, profile: Mapping[str, MinOptMax] | None) -> dict:
    """Options of ONNX Runtime's TensorRT provider: engine and timing caches in ``cache_dir``, and,
    given ``profile`` (input -> (min, opt, max), the export's), that profile explicitly: without
    it the provider builds for the first shapes it sees and rebuilds whenever a batch or size
    falls outside them."""
    options: dict = {
        "device_id": device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
    }
    if profile:
        for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
            options[key] = profile_option({name: mom[i] for name, mom in profile.items()})
    return options


def providers_for(device: torch.device, cache_dir: Path | None = None,
                  profile: Mapping[str, MinOptMax] | None = None, tf32: bool = True) -> list:
    """Execution providers for ``device``: TensorRT (when its libraries import; with ``profile``,
    the network's min/opt/max input shapes, explicitly) and CUDA on a CUDA device, always CPU
    last. ``cache_dir`` keeps the TensorRT provider's engines. (The CUDA provider runs any shape:
    it has no profile to give.) ``tf32=False``: the CUDA provider's TF32 (on by default) is off,
    as for the reference runs of export checks and networks whose spec does not allow it."""
    ort = _ort()
    available = ort.get_available_providers()
    providers: list = []
    if device.type == "cuda":
        index = device.index or 0
        if "TensorrtExecutionProvider" in available and cache_dir is not None:
            try:
                import tensorrt  # noqa: F401 - the provider needs TensorRT's libraries
            except Exception:
                pass
            else:
                cache_dir.mkdir(parents=True, exist_ok=True)
                providers.append(("TensorrtExecutionProvider", tensorrt_provider_options(index, cache_dir, profile)))
        if "CUDAExecutionProvider" in available:
            cuda = {"device_id": index} if tf32 else {"device_id": index, "use_tf32": 0}
            providers.append(("CUDAExecutionProvider", cuda))
    providers.append("CPUExecutionProvider")
    return providers


def ort_device(device: torch.device) -> torch.device:
    """Where ONNX Runtime can bind tensors: ``device`` if it is CUDA and the CUDA provider is
    installed, else the CPU."""
    if device.type == "cuda" and "CUDAExecutionProvider" in _ort().get_available_providers():
        return device
    return torch.device("cpu")


class OnnxSession:
    """One ONNX graph in ONNX Runtime, bound by its spec's names."""

    def __init__(self, path: Path, spec: NetworkSpec, geometry: Geometry, device: torch.device,
                 providers: list | None = None) -> None:
        ort = _ort()
        self.spec, self.geometry, self.device = spec, geometry, ort_device(device)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the CPU provider warns about fp16 folding
        # No busy-waiting between runs: the edit interleaves ONNX Runtime with PyTorch (autograd
        # steps, scheduler arithmetic), and spinning ORT threads starve PyTorch's (5x slower here).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or providers_for(self.device))
        except Exception as exc:  # ORT raises its own exception types
            raise EngineError(f"ONNX Runtime cannot load '{path}' (truncated or corrupt?): {one_line(exc)}") from None
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if sorted(names_in) != sorted(spec.input_names) or sorted(names_out) != sorted(spec.output_names):
            raise EngineError(f"'{path}' does not have the inputs/outputs of {spec.name}: {names_in} -> {names_out}")

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on ``feeds`` (spec dtypes); outputs as torch tensors on ``self.device``."""
        spec = self.spec
        kind, index = self.device.type, self.device.index or 0
        feeds = {t.name: feeds[t.name].to(self.device, getattr(torch, t.dtype)).contiguous() for t in spec.inputs}
        dims = spec.bind(self.geometry, {n: tuple(t.shape) for n, t in feeds.items()})
        binding = self.session.io_binding()
        for t in spec.inputs:
            x = feeds[t.name]
            binding.bind_input(t.name, kind, index, _NP[t.dtype], tuple(x.shape), x.data_ptr())
        outputs = {}
        for t, shape in zip(spec.outputs, spec.output_shapes(dims).values(), strict=True):
            y = torch.empty(shape, dtype=getattr(torch, t.dtype), device=self.device)
            binding.bind_output(t.name, kind, index, _NP[t.dtype], shape, y.data_ptr())
            outputs[t.name] = y
        if kind == "cuda":
            torch.cuda.synchronize(self.device)  # inputs written by torch kernels on its stream
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # ORT raises its own types, their text spread over lines
            at = f"batch {dims['B']}" + (f" at {dims['H']}x{dims['W']}" if "H" in dims else "")
            what = "ran out of memory running" if "failed to allocate" in str(exc).lower() else "failed to run"
            raise EngineError(f"ONNX Runtime {what} {spec.name} on {at} ({self.device}): {one_line(exc)}") from None
        return outputs


class OnnxRuntimeBackend(GraphBackend):
    """The networks of an engine folder (``NETWORKS``) in ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, models, engines: str | Path | None = None) -> None:
        _ort()
        folder = engines_folder(engines)
        manifest = load_checked_manifest(models, folder)
        check_files(manifest, folder, "onnx")
        # Tensors of the edit live on models.device; the sessions bind where ONNX Runtime can
        # (that device with the CUDA provider, else the CPU) and results come back to it.
        super().__init__(models, folder, manifest, models.device)
        device = ort_device(models.device)
        self.sessions: dict[str, OnnxSession] = {}
        for name, entry in manifest.networks.items():
            assert entry.onnx is not None  # check_files
            profile = entry.spec.profile_shapes(self.geometry, manifest.profile)
            providers = providers_for(device, folder / "ort-tensorrt-cache", profile, tf32=entry.spec.tf32)
            try:
                self.sessions[name] = OnnxSession(folder / entry.onnx.file, entry.spec, self.geometry, device,
                                                  providers)
            except EngineError as exc:
                raise EngineError(f"{exc}; rebuild: {rebuild_command(manifest, folder)}") from None
        if any(s.session.get_providers()[0] == "TensorrtExecutionProvider" for s in self.sessions.values()):
            self.max_batch = manifest.profile.batch[2]  # its engines hold the profile's batches: split larger calls

    def identity(self) -> dict[str, str]:
        """Also the execution provider that runs the graphs (CPU, CUDA or TensorRT: other kernels)."""
        session = next(iter(self.sessions.values()))
        return {**super().identity(), "provider": session.session.get_providers()[0]}

    def _run(self, network: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: y.to(self.device) for name, y in self.sessions[network].run(feeds).items()}
