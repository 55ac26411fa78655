"""`pretrain data train-tokenizer`: a byte-level BPE trained on raw inputs (local files or
`hf://` Hub inputs, read like `pretrain data prepare` reads them) and written atomically."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

from pretrain.data.prepare import hub, inputs
from pretrain.data.prepare.settings import DEFAULT_CACHE_BYTES
from pretrain.data.tokenizer import TokenizerInfo, load_tokenizer, train_bpe
from pretrain.errors import UserError, writing
from pretrain.files import write_atomic


def train_tokenizer(
    patterns: list[str],
    vocab_size: int,
    output: str | os.PathLike,
    text_field: str = "text",
    cache_dir: str | os.PathLike | None = None,
    cache_max: int | None = None,
) -> TokenizerInfo:
    """Train a byte-level BPE on the documents of the inputs and write it to `output`. Hub inputs
    (`hf://...`) are fetched one file at a time into `cache_dir` (default: beside `output`)."""
    if Path(output).is_dir():
        raise UserError(
            f"--output {output} is a folder; give the file to write, e.g. {Path(output) / 'tokenizer.json'}"
        )
    left_out: list[str] = []
    count = 0

    def counted(texts: Iterator[str]) -> Iterator[str]:
        nonlocal count
        for text in texts:
            count += 1
            yield text

    cache = Path(cache_dir) if cache_dir else Path(output).parent
    folder = cache / f".{Path(output).name}.hub-cache"  # a killed run's leftovers go with the next run
    max_bytes = cache_max or DEFAULT_CACHE_BYTES
    texts = hub.documents(hub.expand(patterns), inputs.Fields(text_field), left_out, folder, max_bytes)
    tok = train_bpe(counted(texts), vocab_size)
    skipped = f"{len(left_out)} record(s) left out, e.g. {left_out[0]}" if left_out else "no record left out"
    if count == 0:
        raise UserError(
            f"--input {' '.join(patterns)}: no document to train on ({skipped}); check --text-field"
        )
    if left_out:
        print(f"train-tokenizer: trained on {count:,} documents; {skipped}", file=sys.stderr)
    output = Path(output)
    with writing(output, "--output"):
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, tok.to_str().encode())
    return load_tokenizer(output)
