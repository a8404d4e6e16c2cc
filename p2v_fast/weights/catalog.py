"""Every download p2v makes: what it is, where it comes from, what needs it, its size on disk.

docs/models.md shows this table. Sizes are those of the files fetched (``patterns``: what
diffusers and transformers load, the fp32 safetensors, configs and tokenizer files; not the
repos' duplicate .bin, .ckpt, .fp16, TensorFlow or Flax copies), in decimal units as the hub
shows them. Pure data: importing it loads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2v_fast.config import DEFAULT_CAPTIONER, DEFAULT_CLIP_MODEL, DEFAULT_MODEL
from p2v_fast.text import size_text

#: The groups `p2v download` takes (``all``: every entry).
GROUPS = ("edit", "caption", "eval", "all")

#: Configs, tokenizer and processor files of a transformers model (small).
_TRANSFORMERS_FILES = ("*.json", "*.txt", "*.model")


@dataclass(frozen=True)
class Download:
    """One download: ``source`` is a hub id (fetched into the hub cache with ``patterns``) or a URL."""

    group: str  # the `p2v download` group that fetches it
    name: str
    source: str
    needed_by: str
    size: int  # bytes on disk of the files fetched
    patterns: tuple[str, ...] = ()

    @property
    def is_hub(self) -> bool:
        return "://" not in self.source

    def label(self) -> str:
        """``'owner/name' (What, 1.2 GB)``: what a message names."""
        return f"'{self.source}' ({self.name}, {size_text(self.size)})"


SD2_DEPTH = Download(
    "edit", "Stable Diffusion 2 depth", DEFAULT_MODEL,
    "p2v edit, invert, export, ablate, ui with the default --model", 5_650_000_000,
    ("model_index.json", "*/config.json", "scheduler/scheduler_config.json",
     "feature_extractor/preprocessor_config.json", "tokenizer/*", "unet/diffusion_pytorch_model.safetensors",
     "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "depth_estimator/model.safetensors"),
)
BLIP_BASE = Download(
    "caption", "BLIP base captioner", DEFAULT_CAPTIONER,
    "the source prompt when --source-prompt is not given (--captioner)", 990_000_000,
    (*_TRANSFORMERS_FILES, "model.safetensors"),
)
CLIP_L14 = Download(
    "eval", "CLIP ViT-L/14", DEFAULT_CLIP_MODEL, "p2v eval and p2v ablate (--clip-model)", 1_710_000_000,
    (*_TRANSFORMERS_FILES, "model.safetensors"),
)
RAFT_LARGE = Download(
    "eval", "RAFT-large optical flow", "https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth",
    "--flow raft (also needs torchvision: pip install 'p2v-fast[eval]')", 20_100_000,
)
CATALOG = (SD2_DEPTH, BLIP_BASE, CLIP_L14, RAFT_LARGE)


def known(source: str) -> Download | None:
    """The catalog entry for a hub id or URL, or None (a model the user named)."""
    return next((d for d in CATALOG if d.source == source), None)


def label(source: str) -> str:
    """How a message names ``source``: with its size when the catalog knows it."""
    entry = known(source)
    return entry.label() if entry is not None else f"'{source}'"


def fetch_hint(source: str) -> str:
    """'run `p2v download GROUP` on a connected machine' for a catalog entry, else the hub id's own."""
    entry = known(source)
    return f"run `p2v download {entry.group}` on a connected machine" if entry else "download it on a connected machine"


def group_entries(group: str) -> tuple[Download, ...]:
    """The entries `p2v download GROUP` fetches."""
    return CATALOG if group == "all" else tuple(d for d in CATALOG if d.group == group)
