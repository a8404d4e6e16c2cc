"""`p2v bench --plan`: the wavefront's ticks, UNet calls and peak stored features for a clip,
per cap on the frames in flight, simulated without weights (:mod:`p2v_fast.method.plan`).

Feature sizes come from the architecture's config (a UNet built on the meta device: shapes
only), so the SD2-depth numbers at 512x512 fp16 need no download and no memory. The edit's
memory beside the features (weights, each call's activations) depends on the card and is
measured by the benchmark proper, not here.
"""

from __future__ import annotations

from typing import Any

import torch
from rich.table import Table

from p2v_fast.config import EditConfig
from p2v_fast.errors import InputError
from p2v_fast.method.plan import simulate_wavefront
from p2v_fast.nets.attention import feature_shapes
from p2v_fast.text import plural

#: Caps compared by default (frames in flight); the default cap is 16.
CAPS = (4, 8, 16, 32, 50)
#: Longest clip --plan simulates (it steps every frame: ~10 s per 1000 frames at 50 steps on 2 CPU cores).
MAX_PLAN_FRAMES = 10_000
MODES = ("detached", "autograd")  # "off" plans as "detached": the same calls, no x0-hat kept


def architecture_shapes(arch: str | None, model: str | None, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """(N_k, C_k) of the 9 injected layers of ``arch`` ("sd2-depth") or ``model`` ("tiny"), from
    the config on the meta device."""
    from diffusers import UNet2DConditionModel

    if model == "tiny":
        from p2v_fast.weights.tiny import UNET_CONFIG as config
    elif model is None and arch in (None, "sd2-depth"):
        from benchmarks.arch import SD2_DEPTH_UNET as config
    else:
        raise InputError(f"--plan needs --arch sd2-depth or --model tiny (architectures known without weights); "
                         f"got {'--model ' + repr(model) if model else '--arch ' + repr(arch)}")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return feature_shapes(unet, latent_hw)


def plan_report(frames: int, steps: int, size: int, dtype: str = "fp16", caps: tuple[int, ...] = CAPS,
                arch: str | None = None, model: str | None = None,
                update_steps: int | None = None) -> dict[str, Any]:
    """Plans of a ``frames`` x ``steps`` edit at ``size`` x ``size`` for every cap and mode."""
    if not 1 <= frames <= MAX_PLAN_FRAMES or not caps or min(caps) < 1:
        raise InputError(f"--plan needs --frames from 1 to {MAX_PLAN_FRAMES} and caps >= 1; got "
                         f"{plural(frames, 'frame')}, caps {caps}")
    if dtype not in ("fp16", "bf16", "fp32", "auto"):
        raise InputError(f"--dtype must be auto, fp16, bf16 or fp32; got {dtype!r}")
    torch_dtype = {"fp16": torch.float16, "auto": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    latent_hw = (size // 8, size // 8)
    shapes = architecture_shapes(arch, model, latent_hw)
    rows = []
    for mode in MODES:
        cfg = EditConfig(steps=steps, latent_update=mode, update_steps=update_steps, size=size)
        for cap in caps:
            rows.append(simulate_wavefront(cfg, frames, shapes, torch_dtype, latent_hw, cap=cap).as_dict())
    return {"frames": frames, "steps": steps, "size": size, "dtype": str(torch_dtype).removeprefix("torch."),
            "model": model or f"arch:{arch or 'sd2-depth'}", "feature_shapes": shapes, "plans": rows,
            "method": "p2v_fast.method.plan.simulate_wavefront: the edit loop's admission, grouping and feature store "
                      "on meta tensors; calls assume no memory split"}


def plan_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"wavefront plan: {plural(report['frames'], 'frame')} x {plural(report['steps'], 'step')}, "
                        f"{report['size']}x{report['size']} {report['dtype']}, {report['model']}")
    for col in ("latent update", "cap", "ticks", "UNet calls", "frames/call (mean, most)", "peak features",
                "of which anchor", "stored frame-steps"):
        table.add_column(col, justify="left" if col == "latent update" else "right")
    for p in report["plans"]:
        table.add_row(p["latent_update"], str(p["cap"]), str(p["ticks"]), str(p["calls"]),
                      f"{p['mean_frames_per_call']:.1f}, {p['largest_call']}",
                      f"{p['peak_feature_bytes'] / 1e9:.2f} GB", f"{p['anchor_feature_bytes'] / 1e9:.2f} GB",
                      f"{p['peak_stored_steps']:.1f}")
    table.caption = ("ticks: wavefront steps; calls: one per tick, two where autograd's guided frames and the "
                     "others share a tick (before any memory split); peak features: anchor + stored frames + "
                     "x0-hat, as the edit's store counts them; 1 GB = 1e9 bytes")
    return table
