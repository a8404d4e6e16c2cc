"""What fits: nested peak windows, the call budget, and edits whose UNet calls are split or
retried after running out of memory (the result must not change)."""

from __future__ import annotations

import copy

import pytest
import torch

from p2v_fast.config import EditConfig
from p2v_fast.method.edit import sequential, wavefront
from p2v_fast.nets import memory
from p2v_fast.nets.backends import TorchBackend
from p2v_fast.nets.memory import SAFETY, CallBudget
from p2v_fast.text import parse_bytes
from tests.helpers import make_context, random_frames

CPU = torch.device("cpu")
MB = 2**20
needs_hwm = pytest.mark.skipif(not memory.peaks_measurable(CPU), reason="no resettable VmHWM (not Linux?)")


def _touch(n_bytes: int) -> None:
    x = torch.ones(n_bytes // 4)  # written, so resident
    assert float(x[-1]) == 1.0
    del x


@needs_hwm
def test_nested_windows_keep_the_outer_peak() -> None:
    outer = memory.open_window(CPU)
    base = memory.resident_bytes()
    inner = memory.open_window(CPU)
    _touch(256 * MB)
    assert memory.close_window(CPU, inner) >= base + 200 * MB
    after = memory.open_window(CPU)  # resets the process's mark
    assert memory.close_window(CPU, after) < base + 200 * MB
    assert memory.close_window(CPU, outer) >= base + 200 * MB


@needs_hwm
def test_budget_measures_bytes_per_frame_as_two_frames_minus_one() -> None:
    """A fixed cost (64 MB here, a workspace on a GPU) is not charged to the frame."""
    budget = CallBudget(CPU, measurable=True, headroom_fn=lambda: 10**12)
    kind = (True, False)
    assert budget.frames_per_call(kind, 5) == 1  # unmeasured kind: one frame first
    with budget.measure(kind, 1):
        _touch(64 * MB + 128 * MB)
    assert budget.frames_per_call(kind, 5) == 2  # then two
    with budget.measure(kind, 2):
        _touch(64 * MB + 2 * 128 * MB)
    assert 100 * MB <= budget.bytes_per_frame[kind] <= 160 * MB
    assert budget.frames_per_call(kind, 5) == 5
    assert budget.splits == 2  # the two measuring calls each left frames for another call


@needs_hwm
def test_calibrate_runs_one_and_two_frames() -> None:
    budget = CallBudget(CPU, measurable=True, headroom_fn=lambda: 10**12)
    calls: list[int] = []

    def call(frames: int) -> None:
        calls.append(frames)
        _touch(64 * MB + frames * 128 * MB)

    budget.calibrate("k", call, available=1)  # one frame: nothing to compare, nothing run
    assert calls == []
    budget.calibrate("k", call, available=3)
    assert calls == [1, 2] and 100 * MB <= budget.bytes_per_frame["k"] <= 160 * MB
    budget.calibrate("k", call, available=3)  # measured: not again
    assert calls == [1, 2]


def test_noise_charges_the_whole_peak() -> None:
    """A 2-frame peak no larger than the 1-frame one (RSS noise) is charged to its two frames."""
    budget = CallBudget(CPU, measurable=True, headroom_fn=lambda: 10**12)
    budget.one_frame_peak["k"] = 10**9
    with budget.measure("k", 2):
        pass
    assert 0 <= budget.bytes_per_frame["k"] < 10**9


def test_budget_takes_what_fits() -> None:
    kind = (False, True)
    budget = CallBudget(CPU, measurable=True, headroom_fn=lambda: int(3 * 100 * MB / SAFETY) + 1)
    budget.bytes_per_frame[kind] = 100 * MB
    assert budget.frames_per_call(kind, 8) == 3 and budget.splits == 1
    assert budget.frames_per_call(kind, 2) == 2
    budget.headroom_fn = lambda: 0
    assert budget.frames_per_call(kind, 8) == 1  # never less than one frame
    budget.out_of_memory((True, True), 6)
    assert budget.ceiling[(True, True)] == 3 and budget.ooms == 1


def test_unmeasurable_budget_does_not_split() -> None:
    budget = CallBudget(torch.device("cuda"), measurable=False)
    assert budget.frames_per_call((True, False), 16) == 16


@pytest.fixture(scope="module")
def models64(tiny_dir):
    from p2v_fast.weights.models import load_models

    return load_models("tiny", dtype=torch.float64)


class _SmallDevice(TorchBackend):
    """A torch backend that runs out of memory on calls of more than ``most`` frames."""

    def __init__(self, models, most: int) -> None:
        super().__init__(models)
        self.most, self.refused, self.largest = most, 0, 0

    def unet_forward(self, sample, timestep, encoder_hidden_states, refs=None, self_ref=None):
        if sample.shape[0] > 2 * self.most:
            self.refused += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.largest = max(self.largest, sample.shape[0] // 2)
        return super().unet_forward(sample, timestep, encoder_hidden_states, refs, self_ref)


def _edit(models, cfg, n, schedule, backend=None, budget=None):
    ctx = make_context(cfg, models, n, backend=backend)
    if budget is not None:
        ctx.budget = budget
    frames = copy.deepcopy(random_frames(n))
    run = sequential if schedule == "sequential" else wavefront
    return torch.cat([st.latent for st in run(ctx, iter(frames))]), ctx


@pytest.mark.parametrize("mode", ["autograd", "detached"])
def test_split_calls_give_the_same_edit(models64, mode) -> None:
    cfg = EditConfig(prompt="a swan", model="tiny", steps=6, latent_update=mode)
    seq, _ = _edit(models64, cfg, 5, "sequential")
    budget = CallBudget(CPU, measurable=False)
    budget.ceiling = {("edit", g): 2 for g in (False, True)}
    wav, ctx = _edit(models64, cfg, 5, "wavefront", budget=budget)
    torch.testing.assert_close(wav, seq, rtol=1e-9, atol=1e-9)
    assert budget.splits > 0
    assert ctx.store.feats == {} and ctx.store.x0 == {}


@pytest.mark.parametrize("mode", ["autograd", "off"])
def test_out_of_memory_is_retried_smaller(models64, mode) -> None:
    cfg = EditConfig(prompt="a swan", model="tiny", steps=6, latent_update=mode)
    seq, _ = _edit(models64, cfg, 5, "sequential")
    small = _SmallDevice(models64, most=1)
    budget = CallBudget(CPU, measurable=False)
    wav, ctx = _edit(models64, cfg, 5, "wavefront", backend=small, budget=budget)
    torch.testing.assert_close(wav, seq, rtol=1e-9, atol=1e-9)
    assert small.refused > 0 and budget.ooms == small.refused and small.largest == 1
    assert ctx.store.feats == {} and ctx.store.x0 == {}


def test_a_one_frame_call_that_runs_out_is_an_error(models64) -> None:
    cfg = EditConfig(prompt="a swan", model="tiny", steps=2, latent_update="off")
    with pytest.raises(torch.OutOfMemoryError):
        _edit(models64, cfg, 2, "wavefront", backend=_SmallDevice(models64, most=0),
              budget=CallBudget(CPU, measurable=False))


# ------------------------------------------------------------------------------ limits and budgets

GB = 2**30


def test_cuda_room_respects_the_per_process_fraction_and_the_budget() -> None:
    """80 GB card, 60 GB free: with set_per_process_memory_fraction(0.25) only 20 GB may be
    reserved (10 GB are), so 10 GB more plus the default pool's 2 GB of free blocks; a 12 GB
    --max-memory with 9 GB held leaves 3 GB."""
    room = memory.cuda_room(free=60 * GB, total=80 * GB, fraction=1.0, reserved=10 * GB, allocated=8 * GB,
                            pool_free=2 * GB)
    assert room == 62 * GB
    assert memory.cuda_room(60 * GB, 80 * GB, 0.25, 10 * GB, 8 * GB, 2 * GB) == 12 * GB
    assert memory.cuda_room(60 * GB, 80 * GB, 1.0, 10 * GB, 9 * GB, 2 * GB, max_memory=12 * GB) == 3 * GB
    assert memory.cuda_room(60 * GB, 80 * GB, 0.1, 10 * GB, 8 * GB, 0) == 0  # over the fraction already


def test_a_cuda_graph_pools_free_blocks_are_not_headroom() -> None:
    segments = [{"total_size": 4 * GB, "allocated_size": 1 * GB, "segment_pool_id": (0, 0)},
                {"total_size": 6 * GB, "allocated_size": 0, "segment_pool_id": (1, 0)},  # a graph's private pool
                {"total_size": 2 * GB, "allocated_size": 2 * GB, "segment_pool_id": (0, 0)}]
    assert memory.default_pool_free(segments) == 3 * GB


def test_cpu_headroom_respects_the_budget(monkeypatch) -> None:
    monkeypatch.setattr(memory, "resident_bytes", lambda: 3 * GB)
    assert memory.headroom(CPU, max_memory=5 * GB) == min(2 * GB, memory.headroom(CPU))
    assert memory.headroom(CPU, max_memory=2 * GB) == 0


@pytest.mark.parametrize(("text", "n"), [("12GB", 12 * GB), ("12 GiB", 12 * GB), ("800M", 800 * MB),
                                         ("1.5g", int(1.5 * GB)), ("4194304", 4 * MB)])
def test_max_memory_values(text, n) -> None:
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["12 apples", "", "-1GB", "10k"])
def test_bad_max_memory_values(text) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_the_edit_budget_takes_max_memory_and_splits_differentiable_calls(monkeypatch) -> None:
    """--max-memory reaches the edit's budget: with 1.4 GiB per differentiable frame (SD2 at
    512x512 fp16, measured as usual) and 12 GiB, of which 5 are held, calls take
    floor(0.6 x 7 / 1.4) = 3 frames, whatever the machine has."""
    from types import SimpleNamespace

    import psutil

    from p2v_fast.method.edit import edit_budget

    monkeypatch.setattr(memory, "resident_bytes", lambda: 5 * GB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1000 * GB))
    budget = edit_budget(EditConfig(prompt="a swan", model="tiny", max_memory=12 * GB), SimpleNamespace(device=CPU))
    budget.measurable = True
    budget.bytes_per_frame[("edit", True)] = 1.4 * GB
    assert budget.frames_per_call(("edit", True), 16) == 3
    unbounded = edit_budget(EditConfig(prompt="a swan", model="tiny"), SimpleNamespace(device=CPU))
    unbounded.measurable = True
    unbounded.bytes_per_frame[("edit", True)] = 1.4 * GB
    assert unbounded.frames_per_call(("edit", True), 16) == 16


def test_compiled_calls_are_sized_by_their_buckets() -> None:
    """A compiled call's memory is its graph's, recorded at warm-up (a call measured later shows
    ~0 bytes per frame). A call whose bucket was recorded fits; a bigger one is costed as the
    largest recorded bucket scaled by samples. Buckets 2..32 samples; 6 GB free."""
    from p2v_fast.nets.backends import compile_bucket

    budget = CallBudget(CPU, measurable=True, headroom_fn=lambda: int(6 * GB / SAFETY), buckets=compile_bucket)
    budget.bucket_bytes = {2: 1 * GB, 8: 4 * GB}  # 1- and 4-frame calls recorded
    kind = ("edit", False)
    assert budget.frames_per_call(kind, 16) == 4  # 16 samples would cost 8 GB, 32: 16 GB
    budget.headroom_fn = lambda: int(9 * GB / SAFETY)
    assert budget.frames_per_call(kind, 16) == 8  # 16 samples: 8 GB fit
    assert budget.frames_per_call(("edit", True), 4) == 1  # differentiable calls run eager: measured as usual


def test_a_check_in_onnx_runtime_is_sliced_to_fit_its_budget() -> None:
    """Issue 26 item 7: SD2-depth's UNet at 896x896 in fp16 holds ~6.3 GB of attention scores per
    sample in ONNX Runtime (~50 GB at batch 8); an 8 GB budget runs it one sample at a time, a
    slice never exceeds the batch, a sample is never split, and the budget never exceeds the cap."""
    per = memory.attention_score_bytes(5, 112 * 112, 2 * 112 * 112, 2)
    assert 6.2e9 < per < 6.4e9 and 49e9 < 8 * per < 51e9
    assert memory.samples_per_slice(per, 8, memory.CHECK_BUDGET) == 1
    assert memory.samples_per_slice(per // 4, 8, memory.CHECK_BUDGET) == 5
    assert memory.samples_per_slice(per, 8, 100 * per) == 8
    assert memory.samples_per_slice(per, 8, 1) == 1
    assert memory.samples_per_slice(0, 8, 1) == 8
    assert 1 <= memory.check_budget(CPU) <= memory.CHECK_BUDGET
    assert memory.check_budget(CPU, cap=1000) == 1000
