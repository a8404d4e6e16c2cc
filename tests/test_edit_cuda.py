"""The GPU path of the edit: no host-device syncs in the step loop, and ``--compile`` (CUDA
graphs on a GPU, inductor on a CPU) equal to eager.

The ``cuda`` tests need a CUDA device and skip here with the reason; on a CPU the step loop is
checked for the operations that would sync on a GPU (values read back, tensors made from host
data), and the compiled edit runs in the slow tier (inductor takes minutes on 2 cores).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from p2v_fast.config import EditConfig
from p2v_fast.method.edit import FrameState, wavefront
from tests.helpers import make_context, random_frames


class _HostTraffic(TorchDispatchMode):
    """Records the operations that make a GPU wait for the host or the host for the GPU: a value
    read back (``item``, ``bool``, ``nonzero``), a tensor made from host data, a copy between
    devices."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if any(k in name for k in ("_local_scalar_dense", "lift_fresh", "nonzero", "masked_select")):
            self.seen.append(name)
        elif "_to_copy" in name and "device" in kwargs and torch.device(kwargs["device"]) != args[0].device:
            self.seen.append(name)
        return func(*args, **kwargs)


def _cfg(mode: str, **kw) -> EditConfig:
    return EditConfig(prompt="a swan", model="tiny", steps=4, latent_update=mode, **kw)


def _on(frames: list[FrameState], device: torch.device) -> list[FrameState]:
    return [FrameState(st.index, st.latent.to(device), st.depth.to(device)) for st in frames]


@pytest.mark.parametrize("mode", ["autograd", "detached"])
def test_step_loop_reads_nothing_back(tiny_models, monkeypatch, mode) -> None:
    """CPU stand-in for the CUDA check below: no operation of the wavefront edit (anchor and
    cross-frame frames in one call, the guided update, the feature store) would sync a GPU."""
    ctx = make_context(_cfg(mode), tiny_models, 5)

    def read_back(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host in the step loop")

    for name in ("tolist", "item", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    with _HostTraffic() as traffic:
        out = list(wavefront(ctx, iter(random_frames(5))))
    monkeypatch.undo()
    assert len(out) == 5 and traffic.seen == []
    assert len(ctx.stats.mean_update_rms()) == 2  # read once, after the loop


@pytest.mark.cuda
@pytest.mark.parametrize(("mode", "dtype"), [("autograd", torch.float16), ("autograd", torch.float32),
                                             ("detached", torch.float16)])
def test_step_loop_makes_no_host_sync_on_cuda(tiny_dir, mode, dtype) -> None:
    """Every step of a wavefront edit under ``set_sync_debug_mode("error")``: a blocking copy or
    a value read back raises. A first edit warms up kernels, handles and the allocator."""
    from p2v_fast.weights.models import load_models

    cuda = torch.device("cuda")
    models = load_models("tiny", device=cuda, dtype=dtype)
    list(wavefront(make_context(_cfg(mode), models, 3), iter(_on(random_frames(3), cuda))))
    ctx = make_context(_cfg(mode), models, 5)  # the schedule's tables go to the device here
    frames = _on(random_frames(5, seed=1), cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = list(wavefront(ctx, iter(frames)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(out) == 5 and bool(torch.isfinite(torch.cat([st.latent for st in out])).all())


def _edit(device: torch.device, compile: bool, n: int = 6, cap: int = 4,
          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """A wavefront edit of ``n`` frames (ticks of 1..``cap`` frames: several batch buckets) on
    ``device``; its latents and how many graphs dynamo compiled."""
    from p2v_fast.nets.backends import TorchBackend
    from p2v_fast.weights.models import load_models

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    models = load_models("tiny", device=device, dtype=dtype)
    backend = TorchBackend(models)
    backend.optimize(compile=compile)
    backend.warm_up((8, 8), cap)
    cfg = _cfg("detached", batch_frames=cap)
    ctx = make_context(cfg, models, n, backend=backend)
    out = list(wavefront(ctx, iter(_on(copy.deepcopy(random_frames(n)), device)), max_in_flight=cap))
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return torch.cat([st.latent for st in out]).cpu(), graphs


def _check_compiled_equals_eager(device: torch.device, dtype: torch.dtype = torch.float32, tol: float = 1e-3) -> None:
    from p2v_fast.nets.backends import compile_bucket

    eager, _ = _edit(device, compile=False, dtype=dtype)
    compiled, graphs = _edit(device, compile=True, dtype=dtype)
    # One graph per batch bucket a call of up to 4 frames uses (2, 4, 8 samples): the wavefront's
    # 1..4-frame ticks and the anchor-only first tick reuse them instead of recompiling.
    assert 1 <= graphs <= len({compile_bucket(2 * f) for f in range(1, 5)}), graphs
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)


@pytest.mark.cuda
def test_compiled_edit_equals_eager_on_cuda(tiny_dir, no_tf32) -> None:
    """``--compile`` on CUDA: mode reduce-overhead (CUDA graphs), whose outputs the next replay
    overwrites; the features the edit keeps are cloned. fp32 without TF32, to 1e-3."""
    _check_compiled_equals_eager(torch.device("cuda"))


@pytest.mark.cuda
def test_compiled_fp16_edit_equals_eager_on_cuda(tiny_dir) -> None:
    """The same in fp16, the precision the GPU path runs in (CUDA graphs' output buffers hold
    fp16 features: a kept view would be overwritten by the next replay). Inductor fuses and
    reorders fp16 arithmetic, so to 2e-2 over 4 steps."""
    _check_compiled_equals_eager(torch.device("cuda"), torch.float16, tol=2e-2)


@pytest.mark.slow  # torch.compile (inductor) takes minutes on 2 CPU cores
def test_compiled_edit_equals_eager_on_cpu(tiny_dir, one_torch_thread) -> None:
    """The same code on the CPU (inductor, no CUDA graphs)."""
    _check_compiled_equals_eager(torch.device("cpu"))


@pytest.mark.slow  # torch.compile (inductor) takes minutes on 2 CPU cores
def test_bench_compile_warms_up_before_timing(tiny_dir, one_torch_thread) -> None:
    """`p2v bench --compile`: the buckets are compiled before the first timed run and reported."""
    from benchmarks.bench import BenchOptions, run_bench

    data = run_bench(BenchOptions(model="tiny", size=64, steps=2, frames=3, compile=True, schedules=("wavefront",),
                                  latent_updates=("detached",), repeats=1, warmup=1, threads=1))
    run = data["runs"][0]
    assert run["compiled"]["buckets"] == 3 and run["compiled"]["warm_up_seconds"] > 0  # 2, 4 and 8 samples
    assert run["edits"][0]["unet_per_frame"]["counts_match_algorithm"]
    torch._dynamo.reset()
