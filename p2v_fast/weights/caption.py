"""Source-prompt captioning of a frame with BLIP (the paper's fallback for a missing prompt)."""

from __future__ import annotations

import numpy as np
import torch

from p2v_fast.errors import InputError
from p2v_fast.weights.models import Models


@torch.no_grad()
def caption_frame(models: Models, frame: np.ndarray, max_new_tokens: int = 30, captioner: str | None = None) -> str:
    """Caption one uint8 RGB frame ``[H, W, 3]`` with greedy BLIP decoding (``captioner``: see
    :meth:`Models.load_captioner`).

    Returns the decoded text with special tokens removed and whitespace stripped. With the
    tiny random-weight captioner this is nonsense and may be empty; it is returned as is.
    """
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InputError(f"caption expects one uint8 RGB frame [H,W,3], got {arr.dtype} {tuple(arr.shape)}")
    model, processor = models.load_captioner(captioner)
    inputs = processor(images=arr, return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device=model.device, dtype=model.dtype)
    ids = model.generate(
        pixel_values=pixel_values,
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        num_beams=1,
    )
    return processor.decode(ids[0], skip_special_tokens=True).strip()
