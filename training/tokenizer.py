"""Tokenizers for the scene grammar, built offline.

:func:`build_scene_clip_tokenizer` writes a real CLIP BPE tokenizer (``vocab.json`` +
``merges.txt``): CLIP's byte-level alphabet (every byte, alone and as a word end, so any text
still tokenizes) plus merges that make every word of :data:`p2v_fast.media.scenes.GRAMMAR_WORDS`
one whole token. :func:`build_scene_bert_vocab` writes BLIP's BERT ``vocab.txt``: the grammar
words plus single letters and ``##`` letter pieces (so unknown lowercase words still spell out).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from p2v_fast.media.scenes import GRAMMAR_WORDS
from p2v_fast.weights.tiny import bytes_to_unicode

MAX_TOKENS = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one (already byte-mapped) word: lowest-ranked pair first, until none applies."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, _ = min(pairs)
        if rank == 1 << 30:
            break
        a, b = next((parts[i], parts[i + 1]) for r, i in pairs if r == rank)
        out: list[str] = []
        i = 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


def scene_merges(words: tuple[str, ...] = GRAMMAR_WORDS) -> list[tuple[str, str]]:
    """Merges (in rank order) under which each word is a single BPE token."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def add(pair: tuple[str, str]) -> None:
        if pair not in ranks:
            ranks[pair] = len(merges)
            merges.append(pair)

    for w in words:  # a left-to-right chain per word
        parts = [*w[:-1], w[-1] + "</w>"]
        acc = parts[0]
        for p in parts[1:]:
            add((acc, p))
            acc += p
    for _ in range(20):  # repair words a foreign merge broke: join what is left, left to right
        broken = [(w, _bpe(w, ranks)) for w in words if len(_bpe(w, ranks)) > 1]
        if not broken:
            return merges
        for _w, parts in broken:
            acc = parts[0]
            for p in parts[1:]:
                add((acc, p))
                acc += p
    raise RuntimeError("could not find merges that keep every grammar word whole")


def scene_clip_vocab(words: tuple[str, ...] = GRAMMAR_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = scene_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def build_scene_clip_tokenizer(out_dir: str | Path) -> Any:
    """Write ``vocab.json``, ``merges.txt`` (+ config) into ``out_dir``; return the loaded CLIPTokenizer."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = scene_clip_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": MAX_TOKENS, "tokenizer_class": "CLIPTokenizer"}), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(out))


def scene_bert_words() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punct = list(".,!?'-")
    words = [w for w in GRAMMAR_WORDS if w not in letters]
    return [*BERT_SPECIALS, *words, *letters, *punct, *(f"##{c}" for c in letters)]


def build_scene_bert_vocab(out_dir: str | Path) -> Any:
    """Write BLIP's BERT ``vocab.txt`` into ``out_dir``; return the BertTokenizer (bos = ``[DEC]``)."""
    from transformers import BertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(scene_bert_words()) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok
