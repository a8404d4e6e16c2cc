"""What a wavefront edit costs before it runs: ticks, UNet calls and peak stored features.

:func:`simulate_wavefront` runs the edit loop's own code (:func:`p2v_fast.method.wavefront.wavefront_ticks`
for admission and readiness, :func:`~p2v_fast.method.wavefront.call_groups` for the calls of a tick,
:class:`~p2v_fast.method.wavefront.FeatureStore` and :func:`~p2v_fast.method.edit.commit` for what is kept) with
shape-only tensors on the ``meta`` device in place of the UNet's outputs: no arithmetic and no
memory, so a 120-frame, 50-step plan at SD2's 512x512 sizes takes a fraction of a second and
its peak is the byte count the real store would reach. The one thing it leaves out is memory
splitting (:class:`~p2v_fast.nets.memory.CallBudget`): ``calls`` assumes every group of a tick fits
in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from p2v_fast.config import EditConfig


@dataclass(frozen=True)
class WavefrontPlan:
    """The wavefront's cost for ``frames`` frames at a cap of ``cap`` frames in flight."""

    frames: int
    steps: int
    cap: int
    latent_update: str
    ticks: int
    calls: int  # UNet calls: one per kind of call in a tick (differentiable or not), none split
    frame_steps: int  # frames x steps: the work, whatever the schedule
    largest_call: int  # frames
    peak_feature_bytes: int  # anchor + stored frames' features + x0-hat, as FeatureStore counts them
    anchor_feature_bytes: int  # the anchor's features (every step, both branches)
    feature_step_bytes: int  # one frame's features at one step, both branches
    # what the store's tensors keep alive, by storage (FeatureStore.storage_bytes), at its peak;
    # None unless asked for (it walks the store every tick)
    peak_storage_bytes: int | None = None

    @property
    def mean_frames_per_call(self) -> float:
        return self.frame_steps / max(self.calls, 1)

    @property
    def peak_stored_steps(self) -> float:
        """Stored non-anchor features at the peak, in frame-steps (x0-hat included)."""
        return (self.peak_feature_bytes - self.anchor_feature_bytes) / max(self.feature_step_bytes, 1)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "mean_frames_per_call": self.mean_frames_per_call,
                "peak_stored_steps": self.peak_stored_steps}


def simulate_wavefront(cfg: EditConfig, n_frames: int, shapes: Sequence[tuple[int, int]], dtype: torch.dtype,
                       latent_hw: tuple[int, int], cap: int | None = None,
                       storage: bool = False) -> WavefrontPlan:
    """The wavefront edit of ``n_frames`` frames with ``cfg`` (steps, latent update, refs, cap
    ``cap`` or ``cfg.batch_frames`` or the default), its features ``shapes`` [(N_k, C_k)] in
    ``dtype`` and latents of ``latent_hw`` (h, w). ``storage``: also find the peak of what the
    store keeps alive by storage (meta tensors have storages of their full size), which is how a
    view kept in place of a copy shows."""
    from p2v_fast.method.edit import FrameState, commit
    from p2v_fast.method.wavefront import DEFAULT_WAVEFRONT_FRAMES, FeatureStore, call_groups, wavefront_ticks

    meta = torch.device("meta")
    h, w = latent_hw
    cap = cap or cfg.batch_frames or DEFAULT_WAVEFRONT_FRAMES
    store = FeatureStore(cfg, n_frames)
    ticks = calls = largest = peak_storage = 0

    def tick(ready: list[FrameState]) -> None:
        nonlocal ticks, calls, largest, peak_storage
        ticks += 1
        for _, group in call_groups(ready, cfg):
            calls += 1
            largest = max(largest, len(group))
            f = len(group)
            feats = [torch.empty(2 * f, n, c, device=meta, dtype=dtype) for n, c in shapes]
            latents = torch.empty(f, 4, h, w, device=meta)
            commit(group, store, feats, latents, latents)
        if storage:
            peak_storage = max(peak_storage, store.storage_bytes())

    initial = (FrameState(i, torch.empty(1, 4, h, w, device=meta), torch.empty(1, 1, h, w, device=meta))
               for i in range(n_frames))
    for _ in wavefront_ticks(initial, cfg.steps, cap, tick):
        pass
    step_bytes = sum(2 * n * c for n, c in shapes) * torch.empty((), dtype=dtype).element_size()
    return WavefrontPlan(n_frames, cfg.steps, cap, cfg.latent_update, ticks, calls, n_frames * cfg.steps, largest,
                         store.peak_bytes, len(store.anchor) * step_bytes, step_bytes,
                         peak_storage if storage else None)
