"""What this machine can run: versions, devices, runtimes (for `p2v info` and benchmarks)."""

from __future__ import annotations

import importlib
import platform
import warnings
from collections.abc import Callable


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
        return False, "not installed (pip install 'p2v-fast[onnx]', or '[onnx-gpu]' on a GPU machine)"
    return True, f"{ort.__version__}, providers: {', '.join(ort.get_available_providers())}"


def _installed(*names: str) -> set[str]:
    """Which of these distributions are installed (their own metadata, not the shared module)."""
    from importlib import metadata

    found = set()
    for name in names:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.add(name)
    return found


#: What is missing where ONNX Runtime lists an execution provider that then does not load.
_PROVIDER_LIBRARIES = {
    "CUDAExecutionProvider": "the CUDA or cuDNN libraries onnxruntime-gpu was built for are missing or of another "
                             "version; graphs run on the CPU",
    "TensorrtExecutionProvider": "TensorRT's libraries are missing or of another version",
}


def provider_problem(provider: str, ort=None) -> str | None:
    """Why ONNX Runtime's execution provider ``provider`` does not load here (a one-node session asks
    for it, and ONNX Runtime falls back to the CPU silently where it cannot), or None when it loads.
    ``ort``: the onnxruntime module (tests pass a stand-in)."""
    from onnx import TensorProto, helper

    if ort is None:
        import onnxruntime

        ort = onnxruntime
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        with warnings.catch_warnings():  # ORT warns when it falls back; the answer below says so
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(model.SerializeToString(), options,
                                           providers=[provider, "CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own types
        from p2v_fast.errors import one_line

        return one_line(exc)
    if provider not in session.get_providers():
        return f"it is listed but did not load ({_PROVIDER_LIBRARIES.get(provider, 'its libraries are missing')})"
    return None


def _tensorrt_provider_problem() -> str | None:
    return provider_problem("TensorrtExecutionProvider")


def _cuda_provider_problem() -> str | None:
    return provider_problem("CUDAExecutionProvider")


def onnxruntime_problems(installed: set[str], providers: list[str], cuda: bool,
                         tensorrt_provider: Callable[[], str | None] = _tensorrt_provider_problem,
                         cuda_provider: Callable[[], str | None] = _cuda_provider_problem) -> list[str]:
    """What is wrong with this machine's ONNX Runtime, one line each: both packages installed (they
    share one module, and the CUDA provider silently disappears), a CUDA machine without the CUDA
    provider or with one that is listed but does not load (every graph then runs on the CPU), a
    TensorRT provider that fails to load."""
    problems = []
    if {"onnxruntime", "onnxruntime-gpu"} <= installed:
        problems.append("both onnxruntime and onnxruntime-gpu are installed, and they overwrite each other: "
                        "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    if cuda and "CUDAExecutionProvider" not in providers:
        problems.append("this machine has a CUDA GPU but ONNX Runtime has no CUDA provider (graphs run on the CPU): "
                        "install onnxruntime-gpu instead of onnxruntime (pip install 'p2v-fast[onnx-gpu]')")
    elif cuda:
        why = cuda_provider()
        if why is not None:
            problems.append(f"ONNX Runtime's CUDA provider fails to load: {why}")
    if cuda and "TensorrtExecutionProvider" in providers:
        why = tensorrt_provider()
        if why is not None:
            problems.append(f"ONNX Runtime's TensorRT provider fails to load: {why}")
    return problems


def _tensorrt_problem() -> tuple[object | None, str | None]:
    """(the tensorrt module, None) or (None, why it cannot be imported)."""
    try:
        import tensorrt as trt

        _ = trt.Builder, trt.Runtime  # PyPI's placeholder package imports but has no API
    except ModuleNotFoundError:
        return None, "the tensorrt Python package is not installed"
    except Exception as exc:  # missing libnvinfer, the placeholder's own error, ...
        from p2v_fast.errors import one_line

        return None, f"importing tensorrt failed ({one_line(exc, kind=True)})"
    return trt, None


_INSTALL = "pip install 'p2v-fast[tensorrt]' on a machine with an NVIDIA GPU"


def import_tensorrt(alternative: str = "use --format onnx"):
    """The ``tensorrt`` module, or a one-line :class:`~p2v_fast.errors.BackendUnavailableError`
    that says first that TensorRT is not usable here and why, then what to do instead."""
    from p2v_fast.errors import BackendUnavailableError

    trt, why = _tensorrt_problem()
    if trt is None:
        raise BackendUnavailableError(f"TensorRT is not usable here: {why} ({_INSTALL}); {alternative}")
    return trt


def require_tensorrt(alternative: str):
    """:func:`import_tensorrt`, and a CUDA GPU torch can use (TensorRT runs nowhere else)."""
    from p2v_fast.errors import BackendUnavailableError

    trt = import_tensorrt(alternative)
    ok, cuda = cuda_status()
    if not ok:
        raise BackendUnavailableError(f"TensorRT is not usable here: it is installed ({trt.__version__}) but CUDA is "
                                      f"{cuda.removeprefix('not usable: ')}; {alternative}")
    return trt


def tensorrt_status() -> tuple[bool, str]:
    trt, why = _tensorrt_problem()
    if trt is None:
        return False, f"not usable: {why}"
    version = str(getattr(trt, "__version__", "?"))
    ok, cuda = cuda_status()
    if not ok:
        return False, f"{version} installed, but CUDA is {cuda}"
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
    ok, ort_status = onnxruntime_status()
    rows.append(("ONNX Runtime", ort_status))
    if ok:
        import onnxruntime as ort

        for problem in onnxruntime_problems(_installed("onnxruntime", "onnxruntime-gpu"),
                                            ort.get_available_providers(), torch.cuda.is_available()):
            rows.append(("  warning", problem))
    rows.append(("TensorRT", tensorrt_status()[1]))
    return rows


def engines_report(folder=None, model: str | None = None) -> list[tuple[str, str]]:
    """Rows for the engine folder (``./engines`` by default): precision and profile, whether the
    model (``model``, default: the one exported) and this machine match, and per network its
    files and whether each is usable here."""
    from pathlib import Path

    from p2v_fast.nets.manifest import DEFAULT_ENGINES, describe_folder

    path = Path(folder) if folder is not None else DEFAULT_ENGINES
    if folder is None and not (path / "manifest.json").exists():
        return [("engine folder", f"none in ./{path} (create one with `p2v export`)")]
    return describe_folder(path, model=model)
