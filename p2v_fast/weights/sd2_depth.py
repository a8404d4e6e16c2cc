"""The published architecture of ``stabilityai/stable-diffusion-2-depth``, as configs in code.

Each network's config as the model's folder states it: the UNet (866 M parameters, 5 input
channels = 4 latent + 1 depth), the KL autoencoder (84 M), the OpenCLIP ViT-H/14 text tower (340 M),
DPT-Hybrid MiDaS (123 M) and the DDIM scheduler. The benchmark builds these at full size with random
weights (:mod:`benchmarks.arch`); the tiny test set (:mod:`p2v_fast.weights.tiny`) is these configs
with the widths and layer counts shrunk, so it has the real architecture by construction.
"""

from __future__ import annotations

from typing import Any

#: stabilityai/stable-diffusion-2-depth unet/config.json.
SD2_DEPTH_UNET: dict[str, Any] = dict(
    sample_size=96,
    in_channels=5,  # 4 latent + 1 depth
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),  # read by diffusers as heads per block (64 channels each)
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=False,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    dual_cross_attention=False,
)

#: The Stable Diffusion (v1/v2) KL autoencoder, vae/config.json.
SD_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)

#: OpenCLIP ViT-H/14 text tower as SD2 uses it (23 of its 24 layers; text_encoder/config.json).
OPENCLIP_VIT_H_TEXT: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
)

#: Intel/dpt-hybrid-midas (SD2-depth's depth_estimator): ViT-B/16 on a BiT-R50 stem, 384x384.
DPT_IMAGE_SIZE = 384
DPT_HYBRID_MIDAS: dict[str, Any] = dict(
    is_hybrid=True,
    image_size=DPT_IMAGE_SIZE,
    patch_size=16,
    num_channels=3,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    qkv_bias=True,
    backbone_out_indices=[2, 5, 8, 11],
    readout_type="project",
    reassemble_factors=[1, 1, 1, 0.5],
    neck_hidden_sizes=[256, 512, 768, 768],
    fusion_hidden_size=256,
    head_in_index=-1,
    use_batch_norm_in_fusion_residual=False,
    use_auxiliary_head=False,
    backbone_featmap_shape=[1, 1024, 24, 24],
    neck_ignore_stages=[0, 1],
    backbone_config={
        "layer_type": "bottleneck",
        "depths": [3, 4, 9],
        "hidden_sizes": [256, 512, 1024, 2048],
        "embedding_size": 64,
        "out_features": ["stage1", "stage2", "stage3"],
        "global_padding": "same",
        "embedding_dynamic_padding": True,
        "num_groups": 32,
    },
)

#: SD2's scheduler settings (stabilityai/stable-diffusion-2-depth/scheduler).
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


# The files of stabilityai/stable-diffusion-2-depth that hold no weights, as they read: what a
# real folder makes the loader go through (tests/test_model_folders.py writes them over tiny weights).

#: model_index.json: the pipeline, and the class of each component.
MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionDepth2ImgPipeline",
    "_diffusers_version": "0.8.0.dev0",
    "depth_estimator": ["transformers", "DPTForDepthEstimation"],
    "feature_extractor": ["transformers", "DPTImageProcessor"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

#: scheduler/scheduler_config.json: a PNDM scheduler (p2v runs DDIM from its config).
SCHEDULER_FILE: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0.dev0",
    **SCHEDULER_CONFIG,
    "skip_prk_steps": True,
    "trained_betas": None,
}

#: feature_extractor/preprocessor_config.json: DPT's preprocessing, bilinear (resample 2) to
#: 384 x 384, scaled to [0, 1], then normalised with mean and std 0.5 to [-1, 1].
DPT_PREPROCESSOR: dict[str, Any] = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "ensure_multiple_of": 1,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "DPTImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "keep_aspect_ratio": False,
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": DPT_IMAGE_SIZE, "width": DPT_IMAGE_SIZE},
}


def _token(content: str, typed: bool) -> dict[str, Any]:
    token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if typed else token


#: tokenizer/tokenizer_config.json (CLIP's BPE files, vocab.json and merges.txt, beside it). Its pad
#: token is "<|endoftext|>"; special_tokens_map.json's, "!", is the one the tokenizer uses.
TOKENIZER_CONFIG: dict[str, Any] = {
    "add_prefix_space": False,
    "bos_token": _token("<|startoftext|>", True),
    "do_lower_case": True,
    "eos_token": _token("<|endoftext|>", True),
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": _token("<|endoftext|>", True),
}

#: tokenizer/special_tokens_map.json: pads with "!" (id 0), as OpenCLIP's tokenizer pads with zeros.
SPECIAL_TOKENS_MAP: dict[str, Any] = {
    "bos_token": _token("<|startoftext|>", False),
    "eos_token": _token("<|endoftext|>", False),
    "pad_token": "!",
    "unk_token": _token("<|endoftext|>", False),
}

#: text_encoder/config.json's token ids: CLIP's legacy defaults, not the tokenizer's ids.
TEXT_ENCODER_TOKEN_IDS: dict[str, int] = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}

#: Parameters of each network built from the configs above (tests/test_estimate.py builds them on the
#: meta device and counts): what `p2v edit --dry-run` weighs a hub model by, without downloading it.
PARAMETERS: dict[str, int] = {
    "unet": 865_913_604,
    "vae": 83_653_863,
    "text_encoder": 340_387_840,
    "depth_estimator": 122_377_985,
}
