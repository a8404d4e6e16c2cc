"""Cross-frame attention: identity when ref = [own, own], layer selection, feature shapes."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from p2v_fast.nets.attention import UNetWithFeatures, feature_shapes, injected_layer_names
from p2v_fast.weights.tiny import TEXT_HIDDEN, UNET_CONFIG


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def _inputs(b: int = 2, h: int = 8, w: int = 12):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(b, 5, h, w, generator=g)
    t = torch.tensor([901, 41][:b])
    ehs = torch.randn(b, 77, TEXT_HIDDEN, generator=g)
    return sample, t, ehs


def test_injected_layers_are_the_9_decoder_self_attentions() -> None:
    unet = _unet()
    names = injected_layer_names(unet)
    all_attn1 = [n for n, _ in unet.named_modules() if n.endswith("attn1")]
    assert len(all_attn1) == 16
    assert len(names) == 9
    assert all(n.startswith(("up_blocks.1.", "up_blocks.2.", "up_blocks.3.")) for n in names)
    assert [n.split(".")[1] for n in names] == ["1"] * 3 + ["2"] * 3 + ["3"] * 3


@torch.no_grad()
def test_anchor_variant_equals_the_plain_unet_and_features_have_documented_shapes() -> None:
    unet = _unet()
    sample, t, ehs = _inputs(h=8, w=12)
    expected = unet(sample, t, ehs).sample
    wrapper = UNetWithFeatures(unet)
    noise, *feats = wrapper(sample, t, ehs)
    torch.testing.assert_close(noise, expected, rtol=1e-5, atol=1e-5)
    shapes = feature_shapes(unet, (8, 12))
    assert [tuple(f.shape) for f in feats] == [(2, n, c) for n, c in shapes]
    # up_blocks.1 at 1/4 of the latent, .2 at 1/2, .3 at full size
    assert [n for n, _ in shapes] == [2 * 3] * 3 + [4 * 6] * 3 + [8 * 12] * 3


@torch.no_grad()
def test_ref_own_own_equals_plain_self_attention() -> None:
    unet = _unet()
    wrapper = UNetWithFeatures(unet)
    sample, t, ehs = _inputs()
    noise, *feats = wrapper(sample, t, ehs)
    refs = [torch.cat([f, f], dim=1) for f in feats]
    noise_x, *feats_x = wrapper(sample, t, ehs, *refs)
    torch.testing.assert_close(noise_x, noise, rtol=1e-5, atol=1e-5)
    for a, b in zip(feats, feats_x, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_only_the_9_decoder_layers_change_behaviour() -> None:
    unet = _unet()
    wrapper = UNetWithFeatures(unet)
    sample, t, ehs = _inputs()
    wrapper(sample, t, ehs)
    other = torch.randn_like(sample)
    _, *other_feats = wrapper(other, t, ehs)
    refs = [torch.cat([f, f], dim=1) for f in other_feats]

    # Record every attn1 output with hooks, with and without foreign references.
    outputs: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: outputs.setdefault(n, []).append(out))
        for n, m in unet.named_modules()
        if n.endswith("attn1")
    ]
    noise_plain, *_ = wrapper(sample, t, ehs)
    noise_ref, *_ = wrapper(sample, t, ehs, *refs)
    for h in hooks:
        h.remove()
    assert not torch.allclose(noise_plain, noise_ref)
    injected = set(injected_layer_names(unet))
    first_changed = None
    for name, (plain, ref) in outputs.items():
        if name.startswith(("down_blocks", "mid_block")):
            # encoder and mid block run before any injected layer: untouched
            torch.testing.assert_close(plain, ref)
        if not torch.allclose(plain, ref) and first_changed is None:
            first_changed = name
    assert first_changed in injected
    assert first_changed == "up_blocks.1.attentions.0.transformer_blocks.0.attn1"


def test_wrapper_rejects_wrong_number_of_refs() -> None:
    wrapper = UNetWithFeatures(_unet())
    sample, t, ehs = _inputs()
    try:
        wrapper(sample, t, ehs, torch.zeros(1))
    except ValueError as exc:
        assert "9" in str(exc)
    else:
        raise AssertionError("expected ValueError")


@torch.no_grad()
def test_self_ref_mixes_anchor_and_cross_frame_samples_in_one_call() -> None:
    """One call with a per-sample selector equals the two calls it replaces: selected samples
    get plain self-attention (their ref rows are ignored), the others attend to their refs."""
    wrapper = UNetWithFeatures(_unet())
    sample, t, ehs = _inputs(b=2)
    other = torch.randn_like(sample)
    _, *other_feats = wrapper(other, t, ehs)
    refs = [torch.cat([f, f.flip(0)], dim=1) for f in other_feats]  # [2, 2N, C]
    plain, *plain_feats = wrapper(sample, t, ehs)
    cross, *cross_feats = wrapper(sample, t, ehs, *refs)
    assert not torch.allclose(plain[0], cross[0])
    garbage = [r.clone() for r in refs]
    for r in garbage:
        r[0] = 1e3  # sample 0 is selected: whatever its rows hold must not matter
    mixed, *mixed_feats = wrapper(sample, t, ehs, *garbage, self_ref=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(mixed[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], cross[1], rtol=1e-5, atol=1e-5)
    for m, p, c in zip(mixed_feats, plain_feats, cross_feats, strict=True):
        torch.testing.assert_close(m[0], p[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m[1], c[1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_two_wrappers_of_one_unet_each_get_their_own_features() -> None:
    """A second wrapper (e.g. a second backend over the same models) installs its processors on
    the shared UNet; the first one must still work when called after it."""
    unet = _unet()
    first = UNetWithFeatures(unet)
    sample, t, ehs = _inputs()
    want, *want_feats = first(sample, t, ehs)
    second = UNetWithFeatures(unet)
    second(sample, t, ehs)
    got, *got_feats = first(sample, t, ehs)
    torch.testing.assert_close(got, want)
    assert len(got_feats) == len(want_feats) == 9


def test_the_attention_kernel_is_chosen_on_cuda_not_inherited() -> None:
    """On CUDA the UNet's calls run with flash, then memory-efficient, then math attention
    enabled, and cuDNN attention (torch's default on H100/H200) off; torch's flags come back
    after. On the CPU nothing is changed."""
    from p2v_fast.nets.attention import attention_kernels

    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
    with attention_kernels(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before
    with attention_kernels(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before[0]


@pytest.mark.cuda
def test_fp16_cross_frame_calls_run_flash_attention_on_cuda(tiny_dir) -> None:
    """What the bench reports on a GPU: fp16 cross-frame calls and their backward run
    FlashAttention, never cuDNN's."""
    from benchmarks.bench import attention_kernels_used
    from p2v_fast.weights.models import load_models

    used = attention_kernels_used(load_models("tiny", device=torch.device("cuda"), dtype=torch.float16), (8, 8))
    assert any("flash" in k for k in used["forward"]) and not any("cudnn" in k for k in used["forward"])
    assert any("flash" in k and "backward" in k for k in used["backward"]), used


# ------------------------------------------------------------------------------ --inject all (Table 3)


@torch.no_grad()
def test_inject_all_takes_every_self_attention_with_shapes_that_match_its_features() -> None:
    unet = _unet()
    names = injected_layer_names(unet, "all")
    assert names == [n for n, _ in unet.named_modules() if n.endswith("attn1")] and len(names) == 16
    assert set(injected_layer_names(unet)) < set(names)
    sample, t, ehs = _inputs(h=8, w=12)
    expected = unet(sample, t, ehs).sample
    wrapper = UNetWithFeatures(unet, "all")
    noise, *feats = wrapper(sample, t, ehs)
    torch.testing.assert_close(noise, expected, rtol=1e-5, atol=1e-5)  # no refs: plain self-attention
    assert [tuple(f.shape) for f in feats] == [(2, n, c) for n, c in feature_shapes(unet, (8, 12), "all")]
    # own/own references everywhere: still the plain UNet; another frame's: every layer takes part
    same, *_ = wrapper(sample, t, ehs, *[torch.cat([f, f], dim=1) for f in feats])
    torch.testing.assert_close(same, expected, rtol=1e-5, atol=1e-5)
    other = [torch.cat([f.flip(0), f.flip(0)], dim=1) for f in feats]
    enc_only = [r if n.startswith("down_blocks") else torch.cat([f, f], dim=1)
                for r, f, n in zip(other, feats, names, strict=True)]
    moved, *_ = wrapper(sample, t, ehs, *enc_only)
    assert not torch.allclose(moved, expected, atol=1e-4)  # encoder layers inject too


@torch.no_grad()
def test_a_decoder_wrapper_after_an_all_layer_one_gives_back_the_encoder_layers() -> None:
    """One UNet shared by an all-layer and a decoder-only wrapper (p2v ablate, the scene benchmark):
    the decoder-only one must not leave the other's processors on the encoder."""
    unet = _unet()
    sample, t, ehs = _inputs()
    decoder = UNetWithFeatures(unet)
    _noise, *feats = decoder(sample, t, ehs)
    refs = [torch.cat([f.flip(0), f.flip(0)], dim=1) for f in feats]
    before, *_ = decoder(sample, t, ehs, *refs)
    everywhere = UNetWithFeatures(unet, "all")
    everywhere(sample, t, ehs)
    after, *feats_after = decoder(sample, t, ehs, *refs)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    encoder = dict(unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]
    assert type(encoder.processor).__name__ != "CrossFrameAttnProcessor"
    assert len(feats_after) == 9


def test_inject_all_is_for_the_torch_backend() -> None:
    from p2v_fast.config import EditConfig
    from p2v_fast.errors import InputError

    EditConfig(prompt="x", inject="all", backend="torch")
    with pytest.raises(InputError, match="--inject all runs on --backend torch"):
        EditConfig(prompt="x", inject="all", backend="onnxruntime")
    with pytest.raises(InputError, match="--inject"):
        EditConfig(prompt="x", inject="encoder")
