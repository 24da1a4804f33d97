"""An offline CLIP BPE tokenizer whose vocabulary is the world's: every world word is one token.

The vocabulary follows CLIP's layout: the 256 byte-level characters, the same with the end-of-word marker ``</w>``,
then one entry per learned merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (the highest id, which CLIP text
models use to find the pooled token). The merges are learned by plain BPE on the word list (each word once, most
frequent pair first, ties broken lexicographically), run until every word is a single symbol; BPE encoding replays
training merges in rank order, so each listed word encodes to exactly one token and any other word still
tokenizes (down to single characters).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

from lora2.world.generator import world_words

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# DreamBooth-style rare identifiers (three-letter strings with no meaning in the world).
IDENTIFIER_TOKENS: tuple[str, ...] = (
    "sks",
    "zwx",
    "qlo",
    "vrt",
    "bnq",
    "xjy",
    "pqd",
    "kzv",
    "wuh",
    "olg",
    "fmt",
    "ycz",
    "hjb",
    "dxq",
    "gvp",
    "tqx",
    "jrw",
    "uzk",
    "mvb",
    "rkf",
    "cwj",
    "nyx",
    "ezq",
    "lpv",
)


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2 byte-level alphabet: the 256 printable stand-ins for bytes 0..255, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Plain BPE over ``words`` (each counted once) until every word is one symbol; returns merges in rank order."""
    segmented = [tuple(w[:-1]) + (w[-1] + END_OF_WORD,) for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for seg in segmented if len(seg) > 1 for p in zip(seg[:-1], seg[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_segmented = []
        for seg in segmented:
            out: list[str] = []
            i = 0
            while i < len(seg):
                if i < len(seg) - 1 and (seg[i], seg[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            new_segmented.append(tuple(out))
        segmented = new_segmented


def vocabulary_words() -> list[str]:
    """The words that must be single tokens: the world's words plus the identifier tokens."""
    return sorted(set(world_words()) | set(IDENTIFIER_TOKENS))


def build_tokenizer(path: Path, extra_words: Iterable[str] = (), pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Write a word-level CLIP tokenizer for the world to ``path`` and return it loaded from there.

    Args:
        path: output directory (created); holds vocab.json, merges.txt and the save_pretrained files, so
            ``CLIPTokenizer.from_pretrained(path)`` works offline.
        extra_words: more lower-case words to make single tokens.
        pad_token: SDXL's first tokenizer pads with ``<|endoftext|>``, its second with ``"!"``.
    """
    path = Path(path)
    words = sorted(set(vocabulary_words()) | {w.lower() for w in extra_words})
    bad = [w for w in words if not w.isalpha() or not w.isascii()]
    if bad:
        raise ValueError(f"tokenizer words must be ASCII letters only, got {bad}")
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + END_OF_WORD for c in alphabet]
    merges = _learn_merges(words)
    known = set(tokens)
    for a, b in merges:
        if a + b not in known:
            tokens.append(a + b)
            known.add(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / stale).unlink(missing_ok=True)
    # from_pretrained reads vocab.json + merges.txt in both transformers 4 and 5 (whose constructors differ).
    tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=77, pad_token=pad_token)
    tokenizer.save_pretrained(path)
    logger.info("world tokenizer: %d words, %d merges, vocab %d -> %s", len(words), len(merges), len(vocab), path)
    return CLIPTokenizer.from_pretrained(path)
