"""Tiny random-weight models with the real SD2-depth architectures, built offline.

No weights can be downloaded in tests or CI, so this module builds a complete
``StableDiffusionDepth2ImgPipeline`` (UNet, VAE, CLIP text encoder + tokenizer, DPT-Hybrid
depth estimator + its image processor) and a BLIP captioner from configs in code, with every
component seeded, and saves it once in diffusers format under ``<cache>/models/tiny-v1``.

The UNet has the exact SD2 block layout (in_channels 5 = 4 latent + 1 depth, linear
projections, 16 self-attention ``attn1`` layers of which 9 are in ``up_blocks.1-3``), so every
code path that depends on the layer layout (the cross-frame attention, ONNX export, the
engine specs) is exercised with the same names and counts as the real model; only the widths
are small. Every config here is :mod:`p2v_fast.weights.sd2_depth`'s real one with the widths and
layer counts shrunk (:func:`_shrunk`), so the architecture is the real one by construction. Bump
:data:`TINY_VERSION` whenever a config here changes so stale caches are not reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from p2v_fast.files import cache_root
from p2v_fast.weights.hub import image_processor_class, quiet_loading
from p2v_fast.weights.sd2_depth import (
    DPT_HYBRID_MIDAS,
    OPENCLIP_VIT_H_TEXT,
    SCHEDULER_CONFIG,
    SD2_DEPTH_UNET,
    SD_VAE,
)

TINY_VERSION = "tiny-v1"

#: Seeds, one per component, so each is reproducible on its own.
SEEDS = {"unet": 0, "vae": 1, "text_encoder": 2, "depth_estimator": 3, "captioner": 4}

TEXT_HIDDEN = 32
MAX_TOKENS = 77

def _shrunk(full: dict[str, Any], **small: Any) -> dict[str, Any]:
    """``full`` (a real SD2-depth config) with the widths and layer counts in ``small``; every
    other key, and so the architecture, is the real one's."""
    unknown = set(small) - set(full)
    assert not unknown, f"not keys of the full-size config: {sorted(unknown)}"
    return {**full, **small}


#: SD2-depth's UNet (same blocks, linear projections, 5 input channels), 32-64 channels wide:
#: 2, 2, 4, 4 heads (diffusers reads `attention_head_dim` as heads per block, as SD2 sets it)
#: -> 16 channels per head everywhere.
UNET_CONFIG: dict[str, Any] = _shrunk(
    SD2_DEPTH_UNET,
    sample_size=32,
    block_out_channels=(32, 32, 64, 64),
    norm_num_groups=8,
    attention_head_dim=(2, 2, 4, 4),
    cross_attention_dim=TEXT_HIDDEN,
)

#: SD's KL autoencoder, 16-32 channels wide, one layer per block (4 entries -> 3 downsamples ->
#: scale factor 8, as the real one).
VAE_CONFIG: dict[str, Any] = _shrunk(
    SD_VAE,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)

#: The OpenCLIP ViT-H text tower, 32 wide and 2 layers deep; the vocabulary is the offline
#: tokenizer's (set when the model is built).
TEXT_CONFIG: dict[str, Any] = {k: v for k, v in _shrunk(
    OPENCLIP_VIT_H_TEXT,
    hidden_size=TEXT_HIDDEN,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    projection_dim=TEXT_HIDDEN,
).items() if k != "vocab_size"}

DPT_IMAGE_SIZE = 32

#: DPT-Hybrid MiDaS (ViT on a BiT stem), 32 wide, 4 layers, one bottleneck per stage, at 32x32.
DPT_CONFIG: dict[str, Any] = _shrunk(
    DPT_HYBRID_MIDAS,
    image_size=DPT_IMAGE_SIZE,
    hidden_size=32,
    num_hidden_layers=4,
    backbone_out_indices=[0, 1, 2, 3],
    num_attention_heads=4,
    intermediate_size=37,
    neck_hidden_sizes=[16, 16, 32, 32],
    fusion_hidden_size=16,
    backbone_featmap_shape=[1, 32, 2, 2],
    backbone_config={
        **DPT_HYBRID_MIDAS["backbone_config"],
        "depths": [1, 1, 1],
        "hidden_sizes": [16, 16, 32, 32],
        "embedding_size": 16,
        "num_groups": 2,
    },
)

BLIP_IMAGE_SIZE = 32

BLIP_WORDS = (
    "a an the of on in with and is are two man woman dog cat car street tree sky water "
    "people person road house field grass red blue green white black small large walking "
    "sitting standing running video frame"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode chars."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet: every byte char, alone and as an end of word, plus specials.

    With an empty merges list BPE spells each word character by character, so this vocab
    covers any input text and the tokenizer never needs the real 49k-entry files.
    """
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def build_clip_tokenizer(workdir: Path):
    """A CLIPTokenizer built from a byte-level vocab file and an empty merges file."""
    from transformers import CLIPTokenizer

    tok_dir = Path(workdir) / "clip_tokenizer_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(_byte_vocab()), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": MAX_TOKENS, "tokenizer_class": "CLIPTokenizer"}),
        encoding="utf-8",
    )
    return CLIPTokenizer.from_pretrained(str(tok_dir))


def _build_bert_tokenizer(workdir: Path):
    from transformers import BertTokenizer

    tok_dir = Path(workdir) / "bert_tokenizer_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    (tok_dir / "vocab.txt").write_text("\n".join(specials + list(BLIP_WORDS)) + "\n", "utf-8")
    tok = BertTokenizer(vocab=str(tok_dir / "vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def build_captioner(workdir: Path):
    """Tiny BLIP captioner and its processor (BERT tokenizer from a hand-written vocab)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor


    tokenizer = _build_bert_tokenizer(workdir)
    vocab_size = len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    config = BlipConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            encoder_hidden_size=32,
            intermediate_size=37,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=ids("[DEC]"),
            eos_token_id=ids("[SEP]"),
            sep_token_id=ids("[SEP]"),
            pad_token_id=ids("[PAD]"),
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=BLIP_IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(SEEDS["captioner"])
    model = BlipForConditionalGeneration(config).eval()
    image_processor = image_processor_class("BlipImageProcessor")(
        size={"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE}
    )
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def dpt_image_processor(size: int):
    """DPT-Hybrid's preprocessing (bicubic resize to size x size, scale, normalise to [-1, 1])."""

    return image_processor_class("DPTImageProcessor")(
        do_resize=True,
        size={"height": size, "width": size},
        keep_aspect_ratio=False,
        resample=3,  # bicubic, as DPT-Hybrid's processor
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def build_pipeline(workdir: Path):
    """Assemble the tiny ``StableDiffusionDepth2ImgPipeline`` (random, seeded weights)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionDepth2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation


    tokenizer = build_clip_tokenizer(workdir)

    torch.manual_seed(SEEDS["unet"])
    unet = UNet2DConditionModel(**UNET_CONFIG)

    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)

    torch.manual_seed(SEEDS["vae"])
    vae = AutoencoderKL(**VAE_CONFIG)

    torch.manual_seed(SEEDS["text_encoder"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_CONFIG,
        )
    )

    torch.manual_seed(SEEDS["depth_estimator"])
    depth_estimator = DPTForDepthEstimation(DPTConfig(**DPT_CONFIG))
    feature_extractor = dpt_image_processor(DPT_IMAGE_SIZE)

    return StableDiffusionDepth2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        depth_estimator=depth_estimator,
        feature_extractor=feature_extractor,
    )


def build_tiny_model_dir(target: Path) -> None:
    """Build the tiny pipeline + captioner and save them into ``target`` (must not exist)."""

    with quiet_loading(), tempfile.TemporaryDirectory(prefix="p2v-tiny-src-") as src:
        pipe = build_pipeline(Path(src))
        pipe.save_pretrained(str(target), safe_serialization=True)
        model, processor = build_captioner(Path(src))
        model.save_pretrained(str(target / "captioner"), safe_serialization=True)
        processor.save_pretrained(str(target / "captioner"))
    files = {str(f.relative_to(target)): _file_record(f) for f in sorted(target.rglob("*")) if f.is_file()}
    (target / "p2v_tiny.json").write_text(
        json.dumps({"version": TINY_VERSION, "seeds": SEEDS, "files": files}, indent=2), encoding="utf-8"
    )


def _file_record(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def tiny_problem(target: Path) -> str | None:
    """What is wrong with a built tiny set (None: whole): every file it recorded at build time
    (``p2v_tiny.json``'s ``files``) has its size and sha256. A set built before the records
    were kept is checked for its ``model_index.json`` only."""
    if not (target / "model_index.json").is_file():
        return "incomplete"
    if not (target / "p2v_tiny.json").exists() and not (target / "p2v_tiny.json").is_symlink():
        return None  # built before the records were kept (or by another version's builder)
    try:
        info = json.loads((target / "p2v_tiny.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"p2v_tiny.json unreadable ({exc.__class__.__name__})"
    files = info.get("files") if isinstance(info, dict) else None
    if files is None:
        return None
    if not isinstance(files, dict):
        return "p2v_tiny.json malformed"
    for name, record in files.items():
        path = target / name
        try:
            if not path.is_file() or path.stat().st_size != record["bytes"] or _file_record(path) != record:
                return f"{name} damaged"
        except (OSError, TypeError, KeyError):
            return f"{name} damaged"
    return None


def tiny_model_dir(cache_dir: Path | None = None) -> Path:
    """Path of the tiny model set, ``<cache>/models/tiny-v1``, building it on first use.

    ``cache_dir`` defaults to :func:`p2v_fast.files.cache_root`. The set is built in a temp
    folder next to the target and renamed into place, so a reader never sees a half-written
    folder; if another process finished first, its copy wins and ours is discarded.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "models" / TINY_VERSION
    problem = tiny_problem(target) if target.exists() or target.is_symlink() else "missing"
    if problem is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}-", dir=target.parent))
    try:
        build = tmp / "m"
        build_tiny_model_dir(build)
        if problem != "missing" and tiny_problem(target) is not None:  # damaged or debris: moved aside, then dropped
            with contextlib.suppress(FileNotFoundError):  # a racer moved it first
                os.rename(target, tmp / "damaged")
        try:
            os.rename(build, target)  # atomic; fails if a racer's finished copy is there
        except OSError:
            if tiny_problem(target) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tiny_clip_config() -> Any:
    from transformers import CLIPConfig

    vocab_size = 2 * 256 + 2  # every byte, alone and as a word end, then 2 specials (p2v_fast.weights.tiny)
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 16,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 16,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def _write_tiny_clip(out_dir: Path, seed: int = 0) -> None:
    import torch
    from transformers import CLIPModel, CLIPProcessor

    cfg = _tiny_clip_config()
    size = cfg.vision_config.image_size

    # Byte-level vocabulary and no merges: every character is a token (offline, no hub).
    tokenizer = build_clip_tokenizer(out_dir / "_tokenizer_src")
    assert len(tokenizer) == cfg.text_config.vocab_size
    # The standard CLIP preprocessing (bicubic shortest-edge resize, centre crop, CLIP mean/std),
    # at the tiny vision tower's input size.
    image_processor = image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    with quiet_loading():  # transformers' "Writing model shards" bar, on a normal run's output
        model.save_pretrained(str(out_dir))
        processor.save_pretrained(str(out_dir))
    shutil.rmtree(out_dir / "_tokenizer_src")


def ensure_tiny_clip(root: Path | None = None) -> Path:
    """Build the tiny random-weight CLIP once under ``<cache>/models/clip-tiny-v2``; return it.

    Built in a temporary folder beside the target and renamed into place, so a reader never
    sees a half-written model and two concurrent builders do not clash.
    """
    models = (root if root is not None else cache_root()) / "models"
    final = models / TINY_CLIP_DIR
    if (final / "config.json").is_file():
        return final
    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_CLIP_DIR}-", dir=models))
    try:
        _write_tiny_clip(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


TINY_CLIP_DIR = "clip-tiny-v2"
