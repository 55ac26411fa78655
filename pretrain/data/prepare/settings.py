"""Preparation settings that decide a dataset's bytes (recorded in its manifest).

Kept apart from `prepare` so that the CLI can show the defaults without importing anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """Everything besides the inputs, the tokenizer and the dtype that decides the output."""

    text_field: str = "text"
    val_fraction: float = 0.001  # share of documents (by text hash) in the validation split
    shard_tokens: int = 2**28  # a shard is cut before the document that would overflow this
    bos: bool = False  # also start every document with BOS (EOS always ends it)
    exclude: tuple[str, ...] = ()  # "dotted.key=value" rules: leave matching records out
