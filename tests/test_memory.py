"""What fits: nested peak windows, the call budget, and edits whose UNet calls are split or
retried after running out of memory (the result must not change)."""

from __future__ import annotations

import copy

import pytest
import torch

from p2v_fast import memory
from p2v_fast.backends import TorchBackend
from p2v_fast.config import EditConfig
from p2v_fast.edit import sequential, wavefront
from p2v_fast.memory import SAFETY, CallBudget
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
    from p2v_fast.models import load_models

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
