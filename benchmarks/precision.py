"""The inversion's precision measured: each precision's x_T against an fp64 inversion, and its
reconstruction error (frame 1 regenerated from its own x_T, as
:func:`p2v_fast.method.inversion.reconstruction_error` measures it, on latents).

    python -m benchmarks.precision --model tiny --device cpu
    python -m benchmarks.precision --arch sd2-depth --device cuda --size 512 --steps 50

Per precision (fp32; tf32 on CUDA: fp32 with TF32 tensor-core matmuls and convolutions; fp16;
bf16) the same random x_0 [1,4,h,w], depth and source-prompt embedding are DDIM-inverted for
``steps`` steps at guidance 1 (the conditional branch, as the inversion runs) with the same
weights cast (fp16 weights upcast exactly where the model is loaded in fp16):

- ``x_T_dev``: RMS(x_T - x_T fp64) / RMS(x_T fp64 - x_0), the deviation from an fp64 inversion
  relative to how far the inversion moves the latent;
- ``reconstruction``: RMS(x_0 regenerated - x_0) / RMS(x_0), regenerated from the precision's
  own x_T by the sampling steps in the same precision (what ``meta.json`` records);
- ``seconds_per_frame``: the inversion's wall time per frame (one frame, so only a relative
  figure; the device synchronised).

The rule for the default (docs/performance.md): the inversion keeps fp32 unless TF32's
reconstruction error on the full-size architecture is within 10 % of fp32's and its x_T
deviation within 1 % of the distance travelled, on the GPU that runs it.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from p2v_fast.method.ddim import DDIMSchedule
from p2v_fast.method.inversion import _eps
from p2v_fast.nets.backends import TorchBackend
from p2v_fast.nets.runtime import models_in_dtype

PRECISIONS = {"fp64": (torch.float64, False), "fp32": (torch.float32, False), "tf32": (torch.float32, True),
              "fp16": (torch.float16, False), "bf16": (torch.bfloat16, False)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _round_trip(backend: TorchBackend, schedule: DDIMSchedule, x_0, depth, cond) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        float]:
    _sync(backend.device)
    t0 = time.perf_counter()
    x = x_0.clone()
    for s in reversed(range(schedule.steps)):
        eps, idx = _eps(x, depth, s, backend, schedule, cond)
        x = schedule.invert_step(x, eps, idx)
    _sync(backend.device)
    seconds = time.perf_counter() - t0
    x_T, y = x.clone(), x
    for s in range(schedule.steps):
        eps, idx = _eps(y, depth, s, backend, schedule, cond)
        y, _ = schedule.step(y, eps, idx)
    return x_T.double(), y.double(), seconds


def measure_precisions(models, steps: int, latent_hw: tuple[int, int], precisions: tuple[str, ...],
                       seed: int = 0) -> dict[str, Any]:
    """``precisions`` (keys of :data:`PRECISIONS`; tf32 only on CUDA) against fp64, for
    ``models`` (any dtype: each precision runs on a copy cast to it)."""
    device = models.device
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    x_0 = torch.randn(1, 4, h, w, generator=g)
    depth = torch.rand(1, 1, h, w, generator=g) * 2 - 1
    cond = torch.randn(1, 77, int(models.unet.config.cross_attention_dim), generator=g) * 0.5
    rows: dict[str, Any] = {}
    ref_x_T = None
    for name in ("fp64", *[p for p in precisions if p != "fp64"]):
        dtype, tf32 = PRECISIONS[name]
        if tf32 and device.type != "cuda":
            rows[name] = {"skipped": "TF32 needs a CUDA GPU"}
            continue
        backend = TorchBackend(models if models.dtype == dtype else models_in_dtype(models, dtype))
        backend.tf32 = tf32
        schedule = DDIMSchedule(models.scheduler, steps).to(device)
        x_T, rec, seconds = _round_trip(backend, schedule, x_0.to(device), depth.to(device), cond.to(device))
        x0 = x_0.to(device).double()
        row: dict[str, Any] = {"reconstruction": float((rec - x0).pow(2).mean().sqrt() / x0.pow(2).mean().sqrt()),
                               "seconds_per_frame": seconds}
        if ref_x_T is None:
            ref_x_T = x_T
            row["x_T_dev"] = 0.0
        else:
            row["x_T_dev"] = float((x_T - ref_x_T).pow(2).mean().sqrt() / (ref_x_T - x0).pow(2).mean().sqrt())
        rows[name] = row
        del backend
    return {"steps": steps, "latent_hw": list(latent_hw), "device": str(device), "precisions": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="tiny, a hub id or folder (default: --arch sd2-depth)")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--precisions", default="fp32,tf32,fp16,bf16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from benchmarks.arch import build_arch
    from p2v_fast.config import resolve_device
    from p2v_fast.weights.models import load_models

    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    models = (load_models(a.model, device=device, dtype=torch.float32) if a.model else
              build_arch(a.arch or "sd2-depth", device, torch.float32))
    out = measure_precisions(models, a.steps, (a.size // 8, a.size // 8), tuple(a.precisions.split(",")))
    out["model"] = a.model or f"arch:{a.arch or 'sd2-depth'}"
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        from p2v_fast.files import write_json_atomic

        write_json_atomic(a.json, out)


if __name__ == "__main__":
    main()
