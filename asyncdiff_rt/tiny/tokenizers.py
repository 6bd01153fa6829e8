"""Tokenizers built in memory, with no files: a byte-level CLIP BPE and a T5 Unigram.

Both tokenize arbitrary text (every byte / character has an entry), map a handful of common prompt words to
single tokens (so prompts of a few words fit in a short context), and survive ``save_pretrained`` /
``from_pretrained`` like any other transformers tokenizer.
"""

from __future__ import annotations

import string
from functools import cache

from transformers import CLIPTokenizer, T5TokenizerFast

# Common prompt words: each becomes one token in both tokenizers.
WORDS = (
    "a an the of in on at with and or to for by from is are photo photograph picture painting drawing portrait "
    "image cat dog horse bird fish astronaut man woman person child people city street house car tree forest "
    "mountain river lake sea ocean beach sky sun moon star cloud rain snow night day light dark red green blue "
    "yellow black white orange purple pink brown gold silver old young small big beautiful high detailed "
    "quality realistic style art digital oil 4k 8k hd cinematic landscape space planet flower garden room "
    "riding sitting standing walking running flying wearing holding looking under over near glass water fire "
    "castle robot dragon bear rabbit fox lion tiger elephant monkey"
).split()

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 64


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-unicode table (what ``pre_tokenizers.ByteLevel`` emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@cache
def _clip_vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in WORDS:
        # Left-to-right merges: "p h o t o</w>" -> "ph" -> "pho" -> ... -> "photo</w>". Every intermediate
        # token is in the vocabulary, so whatever order BPE applies them in, the result is a known token.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            pair = (cur, nxt)
            cur = cur + nxt
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            vocab.setdefault(cur, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    return tuple(vocab.items()), tuple(merges)


def clip_vocab_size() -> int:
    return len(_clip_vocab_and_merges()[0])


def make_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer (transformers 5 ``CLIPTokenizer(vocab=dict, merges=list)``)."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


@cache
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    # T5 layout: <pad>=0, </s>=1, <unk>=2, then pieces. Scores: whole words beat characters.
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    printable = [c for c in string.printable if not c.isspace()]
    for c in printable:
        for p in (c, "▁" + c):
            if p not in seen:
                seen.add(p)
                pieces.append((p, -10.0))
    for w in WORDS:
        p = "▁" + w
        if p not in seen:
            seen.add(p)
            pieces.append((p, -1.0))
    return tuple(pieces)


def t5_vocab_size() -> int:
    return len(_t5_vocab())


def make_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """A Unigram T5 tokenizer (``T5TokenizerFast`` is ``T5Tokenizer`` in transformers 5), no sentinel ids."""
    return T5TokenizerFast(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=model_max_length)
