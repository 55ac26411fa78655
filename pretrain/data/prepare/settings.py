"""Preparation settings that decide a dataset's bytes (recorded in its manifest), and the options of
one preparation (`PrepareOptions`).

Kept apart from `prepare` so that the CLI can show the defaults without importing anything heavy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_CACHE_BYTES = 20 * 10**9  # --cache-max 20GB


@dataclass(frozen=True)
class Settings:
    """Everything besides the inputs, the tokenizer and the dtype that decides the output."""

    text_field: str = "text"
    val_fraction: float = 0.001  # share of documents (by text hash) in the validation split
    shard_tokens: int = 2**28  # a shard is cut before the document that would overflow this
    bos: bool = False  # also start every document with BOS (EOS always ends it)
    exclude: tuple[str, ...] = ()  # "dotted.key=value" rules: leave matching records out


@dataclass(frozen=True)
class PrepareOptions:
    """How one preparation runs, besides its inputs, tokenizer, output and `Settings` (the command
    line's options of the same names)."""

    num_proc: int | None = None  # worker processes (None: all CPUs)
    strict: bool = False  # stop at the first skipped record instead of counting it
    overwrite: bool = False  # replace what an earlier preparation wrote in the output
    dtype: str = "auto"  # token dtype ("auto": the smallest that holds the vocabulary)
    eos_token: str | None = None  # the tokenizer's EOS token, when it does not say
    bos_token: str | None = None  # the tokenizer's BOS token, when it does not say
    show_progress: bool = True  # a progress bar and the closing summary
    commit_seconds: float = 1.0  # progress is committed at most this often (0: after every unit)
    cache_dir: str | os.PathLike | None = None  # where Hub files wait (None: in the output's progress folder)
    cache_max: int = DEFAULT_CACHE_BYTES  # the most the Hub file cache holds at once
