"""`p2v bench --speedups ...`: each PyTorch speed-up measured on its own against eager.

The speed-ups of the torch backend (and of the autograd steps under every backend) must keep
the result, so each is timed alone on the same UNet calls and its output compared with eager
in the model's dtype:

  eager          the reference: the model's dtype, PyTorch's default attention (SDPA)
  sdpa-math      the reference with SDPA forced to its math kernel: what SDPA's fused kernels buy
  channels-last  UNet weights and activations in channels-last memory format
  compile        ``torch.compile`` of the UNet wrapper (``reduce-overhead`` on CUDA: CUDA graphs),
                 for the backward call too, although the edit runs gradient calls eager
  fp16 / bf16    a copy of the UNet in that dtype; scheduler arithmetic stays fp32 in the edit

Calls timed (one frame = both CFG branches, batch 2): the anchor network, the cross-frame
network, and the cross-frame network forward + backward (an ``autograd`` guided step). The
first call of a variant is reported apart (``first_call_seconds``: compilation for
``compile``), then ``warmup`` untimed calls and ``repeats`` timed ones.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from benchmarks.timing import Clock, summarize
from p2v_fast.errors import InputError, one_line
from p2v_fast.nets.attention import feature_shapes
from p2v_fast.nets.backends import TorchBackend

SPEEDUPS = ("eager", "sdpa-math", "channels-last", "compile", "fp16", "bf16")
CALLS = ("anchor", "xframe", "xframe+backward")


def check_speedups(names: tuple[str, ...]) -> None:
    bad = [n for n in names if n not in SPEEDUPS]
    if bad:
        raise InputError(f"--speedups takes {', '.join(SPEEDUPS)}; got {bad[0]!r}")


@contextmanager
def _variant(name: str, models) -> Iterator[TorchBackend]:
    """A torch backend with speed-up ``name`` applied; the shared model is restored after."""
    if name in ("fp16", "bf16"):
        dtype = torch.float16 if name == "fp16" else torch.bfloat16
        yield TorchBackend(dataclasses.replace(models, unet=copy.deepcopy(models.unet).to(dtype), dtype=dtype))
        return
    backend = TorchBackend(models)
    ctx: Any = nullcontext()
    if name == "sdpa-math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.MATH)
    try:
        backend.optimize(compile=name == "compile", channels_last=name == "channels-last")
        backend.compile_grad = True  # measure what compiling the gradient calls would do (the edit does not)
        with ctx:
            yield backend
    finally:
        models.unet.to(memory_format=torch.contiguous_format)
        torch._dynamo.reset()


def _inputs(models, latent_hw: tuple[int, int], frames: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    b = 2 * frames
    dev = models.device
    d = int(models.text_encoder.config.hidden_size)
    shapes = feature_shapes(models.unet, latent_hw)
    return {
        "sample": torch.randn(b, 5, h, w, generator=g).to(dev),
        "timestep": torch.full((b,), 501, dtype=torch.long, device=dev),
        "ehs": torch.randn(b, 77, d, generator=g).to(dev),
        "refs": [torch.randn(b, 2 * n, c, generator=g).to(dev) for n, c in shapes],
    }


def _call(backend: TorchBackend, kind: str, x: dict[str, Any]) -> Callable[[], torch.Tensor]:
    refs = None if kind == "anchor" else x["refs"]
    if kind != "xframe+backward":
        def run() -> torch.Tensor:
            with torch.no_grad():
                return backend.unet(x["sample"], x["timestep"], x["ehs"], refs)[0]
        return run

    def run_grad() -> torch.Tensor:
        sample = x["sample"].detach().clone().requires_grad_(True)
        eps = backend.unet_forward(sample, x["timestep"], x["ehs"], refs)[0].float()
        (grad,) = torch.autograd.grad(eps.square().mean(), sample)
        return grad
    return run_grad


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def run_speedups(models, latent_hw: tuple[int, int], names: tuple[str, ...], frames: int = 1, warmup: int = 1,
                 repeats: int = 3, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time each speed-up in ``names`` on its own; the report's ``variants`` rows have, per call
    kind, seconds per call (summary), the first call's seconds, the speed-up against eager and
    the largest error relative to eager's output (for ``xframe+backward``: the input gradient)."""
    check_speedups(names)
    x = _inputs(models, latent_hw, frames, seed)
    clock = Clock(models.device)
    order = ("eager", *[n for n in names if n != "eager"])  # eager first: the reference
    reference: dict[str, torch.Tensor] = {}
    rows: dict[str, Any] = {}
    for name in order:
        log(f"speed-up {name}")
        try:
            with _variant(name, models) as backend:
                row: dict[str, Any] = {}
                for kind in CALLS:
                    fn = _call(backend, kind, x)
                    a = clock.mark()
                    out = fn()
                    first = clock.seconds(a, clock.mark())
                    for _ in range(warmup):
                        fn()
                    samples = []
                    for _ in range(repeats):
                        a = clock.mark()
                        out = fn()
                        samples.append(clock.seconds(a, clock.mark()))
                    if name == "eager":
                        reference[kind] = out.detach()
                    row[kind] = {"seconds_per_call": summarize(samples), "first_call_seconds": first,
                                 "max_rel_err_vs_eager": _rel(out.detach(), reference[kind])}
        except Exception as exc:  # a variant this machine cannot run (e.g. no compiler) is reported
            if name == "eager":
                raise
            first_line = one_line(exc)
            log(f"speed-up {name}: not run ({first_line})")
            rows[name] = {"error": first_line}
            continue
        rows[name] = row
    for row in rows.values():
        if "error" in row:
            continue
        for kind, r in row.items():
            base = rows["eager"][kind]["seconds_per_call"]["median"]
            r["speedup_vs_eager"] = base / r["seconds_per_call"]["median"]
    return {"latent_hw": list(latent_hw), "frames_per_call": frames, "batch": 2 * frames, "warmup": warmup,
            "repeats": repeats, "dtype": str(models.dtype).removeprefix("torch."), "variants": rows}
