"""The machine a benchmark ran on: host, CPU, RAM, device, library versions, peak FLOP/s."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import socket

import psutil
import torch

# Dense (no 2:4 sparsity) tensor-core peaks from the vendors' datasheets, TFLOP/s. "fp32" is
# plain FP32 (CUDA cores); "tf32" is the tensor-core TF32 peak. GeForce fp16/bf16 figures are
# with fp32 accumulation, as PyTorch accumulates. Order matters: the first pattern that
# matches the device name wins (so "A100" is tried before "A10", "H100 PCIe" before "H100").
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"H[12]00.*NVL", "H100/H200 NVL", {"fp16": 835.5, "bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100.*PCIE", "H100 PCIe", {"fp16": 756.0, "bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100", "H100 SXM", {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H200", "H200", {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bL4\b", "L4", {"fp16": 121.0, "bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"fp16": 125.0, "bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX 4090", "RTX 4090", {"fp16": 165.2, "bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090(?! TI)", "RTX 3090", {"fp16": 71.0, "bf16": 71.0, "tf32": 35.6, "fp32": 35.6}),
)


def peak_tflops(device_name: str) -> tuple[str, dict[str, float]] | None:
    """(table entry, {dtype: dense peak TFLOP/s}) for a device name, or None if unknown."""
    upper = device_name.upper()
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, upper):
            return label, dict(peaks)
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, object]:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": int(psutil.virtual_memory().total),
    }


def device_info(device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    """Name, memory and the peak FLOP/s for ``dtype`` (``"unknown"`` where not tabled, e.g. CPUs)."""
    info: dict[str, object] = {"type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            memory_bytes=int(props.total_memory),
            multiprocessors=props.multi_processor_count,
        )
    else:
        info["name"] = f"CPU: {cpu_model()}"
    found = peak_tflops(str(info["name"])) if device.type == "cuda" else None
    key = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, "fp32")
    if found is None:
        info.update(peak_table_entry="unknown", peak_tflops="unknown", peak_tflops_dtype=key)
    else:
        label, peaks = found
        info.update(peak_table_entry=label, peak_tflops=peaks[key], peak_tflops_dtype=key, peak_tflops_all=peaks)
    return info


_PACKAGES = ("p2v-fast", "torch", "diffusers", "transformers", "accelerate", "numpy", "onnx", "onnxruntime",
             "onnxruntime-gpu", "tensorrt", "polygraphy", "psutil")


def versions() -> dict[str, str | None]:
    """Installed versions (from package metadata, so nothing is imported), plus CUDA/cuDNN."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return out
