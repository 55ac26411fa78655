"""Tokenizers: train a byte-level BPE on texts, load any `tokenizer.json`, resolve EOS/BOS, fingerprint.

Any file in the Hugging Face `tokenizers` format works (ours, GPT-2's, Llama-2's
`tokenizer.json`). EOS and BOS are found among the usual special-token spellings
(`<|endoftext|>`, `</s>`, ...) unless named explicitly. The fingerprint is a hash of the
tokenizer's canonical JSON, so two files that tokenize identically compare equal even if
formatted differently. Training one from raw inputs (`pretrain data train-tokenizer`) is
`pretrain.data.prepare.train_tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pretrain.errors import UserError

EOS, BOS, PAD = "<|endoftext|>", "<|bos|>", "<|pad|>"
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>")
BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<bos>")
PAD_NAMES = (PAD, "<pad>", "<|finetune_right_pad_id|>")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) with EOS, BOS and PAD special tokens."""
    if vocab_size < 256 + 3:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 259")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


@dataclass(frozen=True)
class TokenizerInfo:
    """A loaded tokenizer and what the shard format needs to know about it."""

    tokenizer: Tokenizer
    path: Path
    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int | None
    fingerprint: str
    source: str | None = None  # the Hub repository (and revision) it was loaded from, if any

    def manifest_entry(self) -> dict:
        entry = {
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "pad_id": self.pad_id,
        }
        return entry | ({"source": self.source} if self.source else {})


def fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _find(tokenizer: Tokenizer, names: Iterable[str]) -> int | None:
    for name in names:
        if (token_id := tokenizer.token_to_id(name)) is not None:
            return token_id
    return None


def find_pad(tokenizer: Tokenizer) -> int | None:
    """The id of the tokenizer's padding token (one of PAD_NAMES), if it has one."""
    return _find(tokenizer, PAD_NAMES)


def load_tokenizer(
    path: str | os.PathLike, eos_token: str | None = None, bos_token: str | None = None
) -> TokenizerInfo:
    """Load a `tokenizer.json`; EOS must resolve, BOS and PAD are optional."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such tokenizer file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises plain Exception for any parse error
        raise UserError(f"{path}: not a tokenizer.json the `tokenizers` library can load: {err}") from None
    eos = _find(tok, [eos_token] if eos_token else EOS_NAMES)
    if eos is None:
        wanted = repr(eos_token) if eos_token else "any of " + ", ".join(EOS_NAMES)
        raise UserError(f"{path}: no end-of-document token ({wanted}); name one with --eos-token")
    bos = _find(tok, [bos_token] if bos_token else BOS_NAMES)
    if bos_token and bos is None:
        raise UserError(f"{path}: no token {bos_token!r} (--bos-token)")
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    return TokenizerInfo(tok, path, vocab_size, eos, bos, find_pad(tok), fingerprint(tok))
