"""p2v info's ONNX Runtime warnings and the install extras a GPU user gets (issue 17 item 3)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from p2v_fast.nets import system
from tests.helpers import p2v

ROOT = Path(__file__).resolve().parents[1]


def test_onnxruntime_problems_are_named_one_line_each() -> None:
    cpu = ["CPUExecutionProvider"]
    assert system.onnxruntime_problems({"onnxruntime"}, cpu, cuda=False) == []
    both = system.onnxruntime_problems({"onnxruntime", "onnxruntime-gpu"}, cpu, cuda=False)
    assert len(both) == 1 and "both onnxruntime and onnxruntime-gpu are installed" in both[0]
    no_cuda = system.onnxruntime_problems({"onnxruntime"}, cpu, cuda=True)
    assert len(no_cuda) == 1 and "no CUDA provider" in no_cuda[0] and "[onnx-gpu]" in no_cuda[0]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    loads = {"tensorrt_provider": lambda: None, "cuda_provider": lambda: None}
    assert system.onnxruntime_problems({"onnxruntime-gpu"}, gpu, cuda=True, **loads) == []
    trt = system.onnxruntime_problems({"onnxruntime-gpu"}, gpu, cuda=True,
                                      **{**loads, "tensorrt_provider": lambda: "libnvinfer.so.11"})
    assert trt == ["ONNX Runtime's TensorRT provider fails to load: libnvinfer.so.11"]
    assert all("\n" not in p for p in both + no_cuda + trt)


def test_the_tensorrt_provider_probe_sees_onnxruntime_fall_back() -> None:
    """The probe asks a real one-node session for the TensorRT provider: ONNX Runtime here has none
    and falls back to the CPU without an error, which the probe reports."""
    assert "did not load" in (system._tensorrt_provider_problem() or "")


class _StandInOrt:
    """The part of onnxruntime the provider probe uses; its session keeps ``loads`` of the providers
    asked for (ONNX Runtime falls back to the CPU, without an error, where a provider does not load)."""

    def __init__(self, loads: tuple[str, ...] = ("CPUExecutionProvider",), error: Exception | None = None) -> None:
        self.loads, self.error, self.asked = loads, error, []

    def SessionOptions(self):
        return type("SessionOptions", (), {})()

    def InferenceSession(self, model: bytes, options, providers):
        self.asked.append(providers)
        if self.error is not None:
            raise self.error
        kept = [p for p in providers if p in self.loads]
        return type("Session", (), {"get_providers": lambda _self: kept})()


def test_the_cuda_provider_is_checked_to_load_not_only_to_be_listed() -> None:
    """Issue 26 item 7: onnxruntime-gpu lists the CUDA provider whether or not the CUDA and cuDNN
    libraries it needs load; a session that falls back to the CPU is a warning of p2v info, in one
    line. Before, a listed provider was taken as working."""
    fell_back = _StandInOrt()
    why = system.provider_problem("CUDAExecutionProvider", ort=fell_back)
    assert fell_back.asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
    assert why is not None and why.startswith("it is listed but did not load") and "cuDNN" in why
    assert system.provider_problem("CUDAExecutionProvider",
                                   ort=_StandInOrt(("CUDAExecutionProvider", "CPUExecutionProvider"))) is None
    failed = system.provider_problem("CUDAExecutionProvider",
                                     ort=_StandInOrt(error=RuntimeError("libcudnn.so.9: cannot open\nmore")))
    assert failed == "libcudnn.so.9: cannot open"
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    problems = system.onnxruntime_problems({"onnxruntime-gpu"}, gpu, cuda=True,
                                           cuda_provider=lambda: system.provider_problem("CUDAExecutionProvider",
                                                                                         ort=fell_back))
    assert problems == [f"ONNX Runtime's CUDA provider fails to load: {why}"]


def test_p2v_info_warns_when_a_listed_cuda_provider_falls_back(monkeypatch) -> None:
    """Through `p2v info`, with this machine's ONNX Runtime (a CPU build) claiming the CUDA provider:
    the probe's real session falls back to the CPU, and info says so."""
    import onnxruntime
    import torch

    monkeypatch.setattr(system, "_installed", lambda *names: {"onnxruntime-gpu"})
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider",
                                                                         "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(system, "cuda_status", lambda: (True, "NVIDIA H100 (stood in)"))
    monkeypatch.setattr(system, "tensorrt_status", lambda: (False, "not usable: not installed"))
    result = p2v("info")
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 0, result.output
    assert "CUDA provider fails to load: it is listed but did not load" in text, text


def test_p2v_info_warns_about_two_onnxruntimes_and_a_missing_cuda_provider(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(system, "_installed", lambda *names: {"onnxruntime", "onnxruntime-gpu"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(system, "cuda_status", lambda: (True, "NVIDIA H100 (stood in)"))
    monkeypatch.setattr(system, "tensorrt_status", lambda: (False, "not usable: not installed"))
    result = p2v("info")
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 0, result.output
    assert "both onnxruntime and onnxruntime-gpu are installed" in text and "no CUDA provider" in text


def test_a_gpu_install_gets_one_onnxruntime_and_tensorrt_of_the_cuda_it_wants() -> None:
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project supports 3.10)
    extras = {m[1]: ast.literal_eval(m[2]) for m in re.finditer(r"^([a-z-]+) = (\[.*\])$", text, re.M)}
    names = {k: {d.split(">")[0].split("<")[0].split("=")[0].strip() for d in v} for k, v in extras.items()}
    assert "onnxruntime-gpu" in names["onnx-gpu"] and "onnxruntime" not in names["onnx-gpu"]
    assert "onnxruntime" not in names["tensorrt"] and "onnxruntime-gpu" not in names["tensorrt"]
    assert "tensorrt>=11,<12" in extras["tensorrt"]  # the tensorrt wheel of 11.x pulls tensorrt_cu13
    assert any(d.startswith("onnxruntime-gpu>=1.27") for d in extras["onnx-gpu"])  # 1.27+: CUDA 13 wheels
    for extra in ("onnx", "onnx-gpu", "tensorrt"):  # the cleaning path a GPU user gets is the one CI tests
        assert "onnx-graphsurgeon" in names[extra]
