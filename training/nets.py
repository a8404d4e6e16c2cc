"""Configs of the ``mini`` networks (the real SD2-depth classes, narrow) and their builders."""

from __future__ import annotations

from typing import Any

#: AutoencoderKL, 4 levels (scale factor 8), DESIGN §5's measured widths.
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
    scaling_factor=1.0,  # replaced by 1/std of the encoded training set after training
)

TEXT_HIDDEN = 64

#: CLIPTextModel (vocab_size, bos/eos/pad ids come from the tokenizer).
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=TEXT_HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=TEXT_HIDDEN,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

#: UNet2DConditionModel with SD2-depth's block layout: 5 input channels, CrossAttn down x3 +
#: Down, Up + CrossAttnUp x3, two layers per down block so up_blocks.1-3 hold 3 transformer
#: blocks each: the 9 decoder self-attention layers the project injects into, as in SD2.
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=5,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    norm_num_groups=16,
    # SD2's convention: diffusers reads attention_head_dim as heads per block -> 16 channels a head
    attention_head_dim=(2, 4, 4, 4),
    cross_attention_dim=TEXT_HIDDEN,
    use_linear_projection=True,
    upcast_attention=False,
)


#: Small configs for the test that the loops run (tests/test_mini.py).
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "vae": dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4),
    "text": dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, projection_dim=16),
    "unet": dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, attention_head_dim=(1, 1, 2, 2),
                 cross_attention_dim=16),
}


def build_vae(tiny: bool = False):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**VAE_CONFIG, **(TINY_OVERRIDES["vae"] if tiny else {})})


def build_text_encoder(tokenizer, tiny: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {**TEXT_CONFIG, **(TINY_OVERRIDES["text"] if tiny else {})}
    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                        **cfg))


def build_unet(tiny: bool = False):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**UNET_CONFIG, **(TINY_OVERRIDES["unet"] if tiny else {})})


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
