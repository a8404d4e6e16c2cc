"""Text conditioning: CLIP text embeddings of the prompts, and the source prompt."""

from __future__ import annotations

import numpy as np
import torch

from p2v_fast.errors import InputError
from p2v_fast.weights.models import first_call


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
    with first_call(models, "text_encoder"):  # [0]: the last hidden states, after the final layer norm
        return models.text_encoder(ids)[0].to(models.dtype)


def dropped_part(models, text: str) -> str | None:
    """The part of ``text`` that CLIP's tokenizer cuts off (past its ``model_max_length``, 77
    tokens with the start and end tokens), decoded as diffusers shows it; None if it all fits."""
    tok = models.tokenizer
    limit = int(tok.model_max_length)
    ids = tok([text], padding="longest", return_tensors="pt", verbose=False).input_ids  # untruncated
    if ids.shape[-1] <= limit:
        return None
    return str(tok.batch_decode(ids[:, limit - 1 : -1])[0])


def warn_if_truncated(models, text: str, what: str, log, seen: set[tuple[str, str]] | None = None) -> None:
    """One ``warning:`` line through ``log`` if ``text`` (the ``what`` prompt) is cut at CLIP's
    token limit, showing the dropped part; once per (what, text) when ``seen`` is given."""
    dropped = dropped_part(models, text) if text else None
    if dropped is None or (seen is not None and (what, text) in seen):
        return
    if seen is not None:
        seen.add((what, text))
    limit = models.tokenizer.model_max_length
    log(f"warning: the {what} is longer than CLIP's {limit} tokens; this part is dropped: {dropped!r}")


def check_prompt(prompt: str, what: str = "prompt") -> str:
    """The prompt stripped; InputError if it is empty."""
    text = (prompt or "").strip()
    if not text:
        raise InputError(f"the {what} is empty; describe the edit, e.g. \"a crochet swan on the lake\"")
    return text


def source_prompt_for(models, first_frame: np.ndarray, given: str | None, captioner: str | None = None) -> str:
    """The inversion prompt: ``given`` if set, else a caption of the first frame by ``captioner``
    (:meth:`~p2v_fast.weights.models.Models.load_captioner`)."""
    if given is not None:
        return given.strip()
    from p2v_fast.weights.caption import caption_frame

    return caption_frame(models, first_frame, captioner=captioner)
