"""Text conditioning: CLIP text embeddings of the prompts, and the source prompt."""

from __future__ import annotations

import numpy as np
import torch

from p2v_fast.errors import InputError


@torch.no_grad()
def encode_prompt(models, text: str) -> torch.Tensor:
    """CLIP text embedding [1, 77, D] of ``text`` (padded/truncated to the tokenizer's length)."""
    tok = models.tokenizer(
        [text],
        padding="max_length",
        max_length=models.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = tok.input_ids.to(models.device)
    return models.text_encoder(ids)[0].to(models.dtype)


def check_prompt(prompt: str, what: str = "prompt") -> str:
    """The prompt stripped; InputError if it is empty."""
    text = (prompt or "").strip()
    if not text:
        raise InputError(f"the {what} is empty; describe the edit, e.g. \"a crochet swan on the lake\"")
    return text


def source_prompt_for(models, first_frame: np.ndarray, given: str | None) -> str:
    """The inversion prompt: ``given`` if set, else a BLIP caption of the first frame."""
    if given is not None:
        return given.strip()
    from p2v_fast.caption import caption_frame

    return caption_frame(models, first_frame)
