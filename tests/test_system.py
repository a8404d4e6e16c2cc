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
    assert system.onnxruntime_problems({"onnxruntime-gpu"}, gpu, cuda=True, tensorrt_provider=lambda: None) == []
    trt = system.onnxruntime_problems({"onnxruntime-gpu"}, gpu, cuda=True, tensorrt_provider=lambda: "libnvinfer.so.11")
    assert trt == ["ONNX Runtime's TensorRT provider fails to load: libnvinfer.so.11"]
    assert all("\n" not in p for p in both + no_cuda + trt)


def test_the_tensorrt_provider_probe_sees_onnxruntime_fall_back() -> None:
    """The probe asks a real one-node session for the TensorRT provider: ONNX Runtime here has none
    and falls back to the CPU without an error, which the probe reports."""
    assert "did not load" in (system._tensorrt_provider_problem() or "")


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
