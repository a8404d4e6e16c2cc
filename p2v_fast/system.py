"""What this machine can run: versions, devices, runtimes (for `p2v info` and benchmarks)."""

from __future__ import annotations

import importlib
import platform


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:
        return None


def cuda_status() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA device visible"
        return False, f"not usable: {why}"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cc = torch.cuda.get_device_capability(0)
    return True, f"{', '.join(names)} (compute capability {cc[0]}.{cc[1]}, CUDA {torch.version.cuda})"


def onnxruntime_status() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "not installed (pip install 'p2v-fast[onnx]')"
    return True, f"{ort.__version__}, providers: {', '.join(ort.get_available_providers())}"


def import_tensorrt(alternative: str = "use --format onnx"):
    """The ``tensorrt`` module, or a one-line :class:`~p2v_fast.errors.BackendUnavailableError`
    saying why it is not usable here and what to do instead (``alternative``)."""
    from p2v_fast.errors import BackendUnavailableError

    try:
        import tensorrt as trt

        _ = trt.Builder  # PyPI's placeholder package imports but has no API
    except Exception as exc:  # ImportError, or the placeholder's own error
        why = type(exc).__name__
        raise BackendUnavailableError(
            f"TensorRT is not installed or not usable here ({why}; pip install 'p2v-fast[tensorrt]' on a machine "
            f"with an NVIDIA GPU); {alternative}"
        ) from None
    return trt


def tensorrt_status() -> tuple[bool, str]:
    try:
        import tensorrt as trt
        version = trt.__version__
    except Exception as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else "import failed"
        return False, f"not usable: {type(exc).__name__}: {first}"
    ok, cuda = cuda_status()
    if not ok:
        return False, f"{version} installed, but {cuda}"
    return True, version


def system_report() -> list[tuple[str, str]]:
    import torch

    rows = [
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("p2v-fast", _version("p2v_fast") or "?"),
        ("torch", torch.__version__),
        ("diffusers", _version("diffusers") or "missing"),
        ("transformers", _version("transformers") or "missing"),
        ("av (PyAV)", _version("av") or "missing"),
    ]
    rows.append(("CUDA", cuda_status()[1]))
    rows.append(("ONNX Runtime", onnxruntime_status()[1]))
    rows.append(("TensorRT", tensorrt_status()[1]))
    return rows


def engines_report(folder=None) -> list[tuple[str, str]]:
    """Rows for the engine folder (``./engines`` by default): model, profile, and per network its
    files and whether its TensorRT engine matches this machine."""
    from pathlib import Path

    from p2v_fast.manifest import DEFAULT_ENGINES, describe_folder

    path = Path(folder) if folder is not None else DEFAULT_ENGINES
    if folder is None and not (path / "manifest.json").exists():
        return [("engines", f"none in ./{path} (create them with `p2v export`)")]
    return describe_folder(path)
