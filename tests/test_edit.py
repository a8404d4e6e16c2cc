"""The Pix2Video mechanism shown in ways that hold for any weights (a random model's output is
noise, so these check structure, not looks):

- a clip of identical frames gives identical edited frames with ``--refs anchor+prev``: every
  frame then sees, at each step and CFG branch, references equal to its own features, so any
  misalignment (another step, the other branch) would tell frames apart (a control shows it does);
- with the guided update on, consecutive frames' x0-hat differences shrink against ``off`` at
  the same seed;
- the cross-frame layers receive exactly [anchor, previous] of the same step and CFG branch
  (recorded from what the 9 layers' Q, K and V projections are given).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from p2v_fast.config import EditConfig
from p2v_fast.media import reader, samples, writer
from p2v_fast.method.edit import FeatureStore, run_schedule
from p2v_fast.nets.attention import injected_layer_names
from tests.helpers import make_context, p2v, random_frames

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models64(tiny_dir):
    """The tiny set in float64 (float reassociation ~1e-16, so equalities are tested tightly)."""
    from p2v_fast.weights.models import load_models

    return load_models("tiny", dtype=torch.float64)


def _edit(models, cfg: EditConfig, frames, store: FeatureStore | None = None):
    ctx = make_context(cfg, models, len(frames))
    if store is not None:
        ctx.store = store
    out = list(run_schedule(ctx, iter(copy.deepcopy(frames))))
    return torch.cat([st.latent for st in out]), ctx


# ------------------------------------------------------------------------------ identical frames


def test_identical_frames_give_identical_edited_frames_end_to_end(tmp_path, tiny_dir) -> None:
    """`p2v edit` on a folder of 4 copies of one image: the 4 edited frames are the same."""
    folder = tmp_path / "same"
    frame = samples.sample_frame(3, (96, 64))
    for i in range(4):
        writer.save_png(folder / f"{i}.png", frame)
    out = tmp_path / "same.mp4"
    r = p2v("edit", str(folder), "a crochet swan", "-o", str(out), "--model", "tiny",
            "--size", "64", "--steps", "6", "--source-prompt", "a clip", "--refs",
            "anchor+prev", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    frames = [f.astype(int) for f in reader.read_frames(out)]
    assert len(frames) == 4 and frames[0].std() > 5  # not a blank picture
    assert max(int(np.abs(f - frames[0]).max()) for f in frames) <= 1  # H.264 may round, nothing more


class _OtherBranchStore(FeatureStore):
    """A broken store: each frame's references come from the other CFG branch."""

    def refs_for(self, frame: int, step: int):
        refs = super().refs_for(frame, step)
        return None if refs is None else [r.flip(0) for r in refs]


class _OtherStepStore(FeatureStore):
    """A broken store: from step 1 on, the anchor's half of the references is from the step before."""

    def refs_for(self, frame: int, step: int):
        refs = super().refs_for(frame, step)
        if refs is None or step == 0:
            return refs
        return [torch.cat([a, r[:, a.shape[1]:]], dim=1) for a, r in zip(self.anchor[step - 1], refs, strict=True)]


@pytest.mark.parametrize("schedule", ["sequential", "wavefront"])
@pytest.mark.parametrize("mode", ["autograd", "detached", "off"])
def test_identical_frames_stay_identical_and_misaligned_references_would_show(models64, schedule, mode) -> None:
    cfg = EditConfig(prompt="a swan", model="tiny", steps=4, latent_update=mode, schedule=schedule)
    one = random_frames(1)[0]
    frames = [copy.deepcopy(one) for _ in range(4)]
    for i, st in enumerate(frames):
        st.index = i
    latents, _ = _edit(models64, cfg, frames)
    spread = float((latents - latents[:1]).abs().max())
    assert spread <= 1e-9 * float(latents.abs().max()), spread
    for broken in (_OtherBranchStore(cfg, 4), _OtherStepStore(cfg, 4)):
        bad, _ = _edit(models64, cfg, frames, broken)
        assert float((bad - bad[:1]).abs().max()) > 1e-3 * float(bad.abs().max())  # the test can fail


@pytest.mark.parametrize("schedule", ["sequential", "wavefront"])
def test_inject_all_keeps_identical_frames_identical_and_edits_otherwise_than_the_decoder(models64, schedule) -> None:
    """--inject all (the paper's Table 3): the method's invariant holds with references in every
    self-attention layer, and the encoder's references change the edit of differing frames."""
    cfg = EditConfig(prompt="a swan", model="tiny", steps=4, schedule=schedule, inject="all")
    one = random_frames(1)[0]
    frames = [copy.deepcopy(one) for _ in range(3)]
    for i, st in enumerate(frames):
        st.index = i
    latents, _ = _edit(models64, cfg, frames)
    assert float((latents - latents[:1]).abs().max()) <= 1e-9 * float(latents.abs().max())
    differing = random_frames(3, seed=3)
    every, _ = _edit(models64, cfg, differing)
    decoder, _ = _edit(models64, cfg.replace(inject="decoder"), differing)
    assert torch.allclose(every[:1], decoder[:1], atol=1e-9)  # the anchor attends to itself either way
    assert float((every[1:] - decoder[1:]).abs().max()) > 1e-4 * float(decoder.abs().max())


# ------------------------------------------------------------------------------ the guided update


def _x0_differences(models, mode: str, n: int = 4, steps: int = 6) -> list[float]:
    """Mean over consecutive frame pairs of mean((x0_hat^i - x0_hat^{i-1})^2), per step."""
    cfg = EditConfig(prompt="a swan", model="tiny", steps=steps, latent_update=mode)
    ctx = make_context(cfg, models, n)
    seen: dict[tuple[int, int], torch.Tensor] = {}
    put = ctx.store.put

    def recording_put(frame, step, feats, x0):
        seen[(frame, step)] = x0.detach().clone()
        put(frame, step, feats, x0)

    ctx.store.put = recording_put  # type: ignore[method-assign]
    list(run_schedule(ctx, iter(random_frames(n, seed=7))))
    return [float(np.mean([float((seen[(i, s)] - seen[(i - 1, s)]).pow(2).mean()) for i in range(1, n)]))
            for s in range(steps)]


@pytest.mark.parametrize("mode", ["autograd", "detached"])
def test_the_update_shrinks_consecutive_x0_differences_against_off(tiny_models, mode) -> None:
    off = _x0_differences(tiny_models, "off")
    on = _x0_differences(tiny_models, mode)
    assert on[0] == pytest.approx(off[0], rel=1e-5)  # step 0 is before any update
    assert all(a < b for a, b in zip(on[1:], off[1:], strict=True)), (on, off)
    assert on[-1] < 0.9 * off[-1], (on, off)


# ------------------------------------------------------------------------------ what the layers receive


class _Recorder:
    """Records, per UNet call, which (frame, step, branch) each sample is, and what the 9
    injected layers' Q, K and V projections are given."""

    def __init__(self, ctx, frames) -> None:
        self.calls: list[list[tuple[int, int, int]]] = []
        # projection ("q", "k", "v") -> layer -> one input [B, tokens, C] per call
        self.inputs: dict[str, dict[int, list[torch.Tensor]]] = {"q": {}, "k": {}, "v": {}}
        wrapper = ctx.backend.unet_module
        depths = [st.depth[0, 0] for st in frames]
        timesteps = ctx.schedule.timesteps.tolist()
        emb = ctx.embeddings

        def on_call(module, args, kwargs):
            sample, t, ehs = args[0], args[1], args[2]
            ids = []
            for b in range(sample.shape[0]):
                frame = next(i for i, d in enumerate(depths) if torch.equal(sample[b, 4].detach(), d))
                branch = next(j for j in range(2) if torch.equal(ehs[b].to(emb.dtype), emb[j]))
                ids.append((frame, timesteps.index(int(t[b])), branch))
            self.calls.append(ids)

        self.handles = [wrapper.register_forward_pre_hook(on_call, with_kwargs=True)]
        unet = wrapper.unet
        for k, name in enumerate(injected_layer_names(unet)):
            attn = unet.get_submodule(name)
            for proj in ("q", "k", "v"):
                self.handles.append(getattr(attn, f"to_{proj}").register_forward_hook(
                    lambda m, inp, out, k=k, proj=proj: self.inputs[proj].setdefault(k, []).append(
                        inp[0].detach().clone())))

    def per_sample(self):
        """{(frame, step, branch): [(q, k_in, v_in) per layer]} (each key must occur once)."""
        out: dict[tuple[int, int, int], list] = {}
        for c, ids in enumerate(self.calls):
            for b, key in enumerate(ids):
                assert key not in out, f"{key} ran twice"
                q, k_in, v_in = self.inputs["q"], self.inputs["k"], self.inputs["v"]
                out[key] = [(q[k][c][b], k_in[k][c][b], v_in[k][c][b]) for k in sorted(q)]
        return out


@pytest.mark.parametrize("schedule", ["sequential", "wavefront"])
@pytest.mark.parametrize("refs", ["anchor+prev", "anchor", "prev"])
def test_cross_frame_layers_receive_anchor_and_previous_of_the_same_step_and_branch(tiny_models, schedule,
                                                                                   refs) -> None:
    n, steps = 4, 4
    cfg = EditConfig(prompt="a swan", model="tiny", steps=steps, latent_update="autograd", schedule=schedule,
                     refs=refs)
    frames = random_frames(n, seed=3)
    ctx = make_context(cfg, tiny_models, n)
    rec = _Recorder(ctx, frames)
    try:
        list(run_schedule(ctx, iter(copy.deepcopy(frames))))
    finally:
        for h in rec.handles:
            h.remove()
    seen = rec.per_sample()
    assert set(seen) == {(f, s, b) for f in range(n) for s in range(steps) for b in range(2)}
    for (f, s, b), layers in seen.items():
        for k, (q, k_in, v_in) in enumerate(layers):
            torch.testing.assert_close(k_in, v_in, rtol=0, atol=0)  # K and V from the same tokens
            own = q
            if f == 0:  # the anchor attends to itself (alone, or [h, h] in a shared call)
                assert torch.equal(k_in, own) or torch.equal(k_in, torch.cat([own, own])), (s, b, k)
                continue
            anchor, prev = seen[(0, s, b)][k][0], seen[(f - 1, s, b)][k][0]
            first, second = {"anchor+prev": (anchor, prev), "anchor": (anchor, anchor), "prev": (prev, prev)}[refs]
            assert torch.equal(k_in, torch.cat([first, second])), (f, s, b, k)
            # the frame's own tokens are not among the keys
            assert not any(torch.equal(own, part) for part in k_in.split(own.shape[0]))


# ------------------------------------------------------------------------------ what is kept


@pytest.mark.parametrize("mode", ["detached", "autograd"])
def test_the_store_keeps_only_its_own_bytes(tiny_models, mode) -> None:
    """Batched calls of 3-4 frames: what the store (and every frame's latent) keeps holds only
    its own bytes, by storage. A row kept as a view of the call's output keeps the whole batch
    tensor alive (at 512x512 fp16, cap 16: ~26 GB where the store counts 2.75 GB)."""
    from p2v_fast.method.edit import wavefront
    from p2v_fast.method.wavefront import storage_bytes
    from p2v_fast.nets.memory import CallBudget

    cfg = EditConfig(prompt="a swan", model="tiny", steps=4, latent_update=mode)
    ctx = make_context(cfg, tiny_models, 6)
    ctx.budget = CallBudget(torch.device("cpu"), measurable=False)
    in_flight: list = []
    checked = []

    def on_step(n: int) -> None:
        held = ctx.store.nbytes()
        assert ctx.store.storage_bytes() == held > 0
        latents = [st.latent for st in in_flight if st.step > 0]
        assert storage_bytes(latents) == sum(t.numel() * t.element_size() for t in latents)
        checked.append(n)

    frames = random_frames(6)
    out = list(wavefront(ctx, (in_flight.append(st) or st for st in frames), on_step=on_step, max_in_flight=4))
    assert len(out) == 6 and max(checked) >= 3  # calls of several frames were checked


def test_the_plan_store_keeps_only_its_own_bytes_at_sd2_sizes() -> None:
    """The plan's store at SD2's 512x512 fp16 sizes (32 frames, cap 16): what its tensors keep
    alive by storage is what it counts (with views into the calls' outputs: ~26 GB)."""
    from benchmarks.plan import architecture_shapes
    from p2v_fast.method.plan import simulate_wavefront

    cfg = EditConfig(steps=50, latent_update="detached", size=512)
    plan = simulate_wavefront(cfg, 32, architecture_shapes("sd2-depth", None, (64, 64)), torch.float16, (64, 64),
                              cap=16, storage=True)
    assert plan.peak_storage_bytes == plan.peak_feature_bytes
    assert abs(plan.peak_feature_bytes - 2.754e9) < 0.01e9
