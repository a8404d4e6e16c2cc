"""The wavefront's bookkeeping, apart from the arithmetic: which frames are admitted and ready at
each tick, which UNet calls a tick's frames make, and what the :class:`FeatureStore` keeps. Pure
Python over anything with ``index`` and ``step`` (the edit's :class:`~p2v_fast.method.edit.FrameState`,
or a plan's stand-ins) and, for the store, anything with ``numel()`` and ``element_size()``: torch is
imported only where the store concatenates references, so a plan (:mod:`p2v_fast.method.estimate`)
counts an edit's calls and stored bytes without importing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from p2v_fast.config import EditConfig

if TYPE_CHECKING:
    import torch

    Features = list[torch.Tensor]  # 9 tensors [2, N_k, C_k]: (uncond, cond) of one frame at one step


class Stepped(Protocol):
    """A frame in flight: its index in the clip and the step it is at (0 = noisiest)."""

    index: int
    step: int


S = TypeVar("S", bound=Stepped)

#: Frames in flight when --batch-frames is not given. Chosen from p2v_fast.method.plan's simulation
#: (docs/performance.md, "The wavefront schedule"): at 50 steps, 16 frames take a 60-frame edit in 211
#: ticks (4 frames: 753, 50: 109), the compiled UNet's largest batch bucket; stored features
#: peak at ~T steps' worth whatever the cap.
DEFAULT_WAVEFRONT_FRAMES = 16


def wavefront_ticks(initial: Iterator[S], steps: int, cap: int, advance: Callable[[list[S]], None]) -> Iterator[S]:
    """The wavefront's admission and readiness (DESIGN.md sec. 3), apart from what a tick does:
    each tick ``advance`` moves every ready frame one step. The next frame is admitted once its
    predecessor has finished step 0 and fewer than ``cap`` frames are in flight; a frame is
    ready when its predecessor has done the step it is at. Yields finished frames, in order."""
    pending = iter(initial)
    in_flight: list[S] = []
    exhausted = False
    while True:
        while not exhausted and len(in_flight) < cap and (not in_flight or in_flight[-1].step >= 1):
            nxt = next(pending, None)
            if nxt is None:
                exhausted = True
            else:
                in_flight.append(nxt)
        if not in_flight:
            return
        # Ready: the predecessor has done this step (in_flight[0]'s predecessor has finished).
        advance([st for k, st in enumerate(in_flight) if k == 0 or in_flight[k - 1].step > st.step])
        while in_flight and in_flight[0].step >= steps:
            yield in_flight.pop(0)


def is_guided(cfg: EditConfig, st: Stepped) -> bool:
    """Whether ``st``'s next step has the guided latent update (frames after the anchor, first steps)."""
    return st.index > 0 and st.step < cfg.guided_steps


def call_groups(frames: list[S], cfg: EditConfig) -> list[tuple[bool, list[S]]]:
    """``frames`` by kind of UNet call, in order of first appearance: (needs a differentiable
    call, its frames). Differentiable calls are the ``autograd`` mode's guided steps."""
    groups: dict[bool, list[S]] = {}
    for st in frames:
        needs_grad = is_guided(cfg, st) and cfg.latent_update == "autograd"
        groups.setdefault(needs_grad, []).append(st)
    return list(groups.items())


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes the storages under ``tensors`` hold, each storage counted once: what keeping
    ``tensors`` alive costs (a view keeps its whole base, e.g. a batched call's output)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


class FeatureStore:
    """Anchor features for every step; other frames' features and x0-hat until the next frame
    has used them (popped on read), so memory is constant in the length of the clip. The bytes
    held are counted as entries come and go (``nbytes``), never by walking the store."""

    def __init__(self, cfg: EditConfig, n_frames: int) -> None:
        self.refs = cfg.refs
        self.n_frames = n_frames
        self.keep_anchor = cfg.refs in ("anchor+prev", "anchor") and n_frames > 1
        self.keep_prev = cfg.refs in ("anchor+prev", "prev")
        self.x0_steps = cfg.guided_steps
        self.anchor: dict[int, Features] = {}
        self.feats: dict[tuple[int, int], Features] = {}
        self.x0: dict[tuple[int, int], torch.Tensor] = {}
        self._bytes = 0
        self.peak_bytes = 0

    def wants_features(self, frame: int) -> bool:
        return (frame == 0 and self.keep_anchor) or (self.keep_prev and frame + 1 < self.n_frames)

    def put(self, frame: int, step: int, feats: Features, x0: torch.Tensor) -> None:
        if frame == 0 and self.keep_anchor:
            self.anchor[step] = feats
            self._bytes += _nbytes(feats)
        elif self.keep_prev and frame + 1 < self.n_frames:
            self.feats[(frame, step)] = feats
            self._bytes += _nbytes(feats)
        if step < self.x0_steps and frame + 1 < self.n_frames:
            self.x0[(frame, step)] = x0
            self._bytes += _nbytes([x0])
        self.peak_bytes = max(self.peak_bytes, self._bytes)

    def refs_for(self, frame: int, step: int) -> Features | None:
        """ref_k [2, 2N_k, C_k] for frame > 0: anchor || previous (or a mode's stand-in).
        Reading keeps the entries; :meth:`used` drops them once the step is done."""
        if frame == 0 or self.refs == "none":
            return None
        prev: Features | None = None
        if self.keep_prev:
            if frame == 1 and self.keep_anchor:
                prev = self.anchor[step]
            else:
                prev = self.feats[(frame - 1, step)]
        anchor = self.anchor[step] if self.keep_anchor else prev
        prev = anchor if prev is None else prev
        assert anchor is not None and prev is not None
        # Attention over [a, a] equals attention over a, so the single-reference ablations keep
        # the engine's 2N-token layout.
        import torch

        return [torch.cat([a, p], dim=1) for a, p in zip(anchor, prev, strict=True)]

    def x0_prev(self, frame: int, step: int) -> torch.Tensor:
        return self.x0[(frame - 1, step)]

    def used(self, frame: int, step: int) -> None:
        """``frame`` has finished ``step``: the previous frame's entries of that step are not
        needed again."""
        feats = self.feats.pop((frame - 1, step), None)
        if feats is not None:
            self._bytes -= _nbytes(feats)
        x0 = self.x0.pop((frame - 1, step), None)
        if x0 is not None:
            self._bytes -= _nbytes([x0])

    def nbytes(self) -> int:
        """Bytes held now: features (every branch) and x0-hat estimates."""
        return self._bytes

    def tensors(self) -> Iterator[torch.Tensor]:
        for feats in (*self.anchor.values(), *self.feats.values()):
            yield from feats
        yield from self.x0.values()

    def storage_bytes(self) -> int:
        """Bytes the store keeps alive, by storage (each counted once): equal to :meth:`nbytes`
        when every entry holds only its own bytes (:func:`commit` copies rows out of a call's
        batched outputs), larger when an entry is a view that keeps a whole batch alive."""
        return storage_bytes(self.tensors())


