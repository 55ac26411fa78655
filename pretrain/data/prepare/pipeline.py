"""`pretrain data prepare`: raw text -> token shards, in parallel, resumable, byte-identical.

Pipeline: the inputs are cut into fixed work units (`inputs.plan`, `units`); a process pool reads and
tokenizes units (`worker`), and the main process appends their documents in unit order to the current
shard of each split (`writer`), committing progress about once a second (`state`), so a rerun after a
kill at any point continues with the next unit. `manifest.json` is written last, and readers accept
only shards it lists, so no partial shard is ever read.

One preparation per output folder: `prepare` holds the folder's lease (`LOCK`, `pretrain.lease`)
while it runs; another is refused naming it, and a killed one's lease on this host is taken over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pretrain import lease
from pretrain.data.prepare import hub, inputs
from pretrain.data.prepare.hub import RemoteFile
from pretrain.data.prepare.inputs import Problem
from pretrain.data.prepare.settings import PrepareOptions, Settings
from pretrain.data.prepare.state import (
    STATE_DIR,
    begin_state,
    check_apart,
    identity_of,
    start_over,
    starting_state,
)
from pretrain.data.prepare.units import Source, UnitSource, recorded_revisions
from pretrain.data.prepare.worker import processed, serial_tokenizers
from pretrain.data.prepare.writer import EXAMPLES, Damaged, DatasetWriter
from pretrain.data.shards import (
    FORMAT,
    MANIFEST,
    TOKENIZER,
    Manifest,
    content_fingerprint,
    dtype_for_vocab,
    load_manifest,
)
from pretrain.data.tokenizer import TokenizerInfo, load_tokenizer
from pretrain.errors import UserError, writing
from pretrain.files import write_atomic, write_json_atomic

SPILL_DIR = "spill"  # in STATE_DIR: long documents' tokens on their way from a worker to a shard
LOCK = ".prepare-owner.json"  # the lease of the one `prepare` writing an output folder
WARNINGS = 10  # skipped records printed while running


def _open_writer(root: Path, state: dict, header: dict, shard_tokens: int) -> DatasetWriter:
    """The output side, continuing `state`; started over (said in one line) when a file the state
    counts on is damaged or missing."""
    try:
        return DatasetWriter(root, state, header, shard_tokens)
    except Damaged as err:
        start_over(root, str(err))
    return DatasetWriter(root, begin_state(root, state["identity"]), header, shard_tokens)


def prepare(
    patterns: Sequence[str],
    tokenizer: str | os.PathLike,
    output: str | os.PathLike,
    settings: Settings | None = None,
    options: PrepareOptions | None = None,
) -> Manifest:
    """Tokenize the inputs matched by `patterns` into a dataset at `output` (see the module docstring).

    `patterns` are local files, folders and globs, or Hub datasets (`hf://OWNER/NAME...`,
    `pretrain.data.prepare.hub`), whose files are fetched into `options.cache_dir` (default: in the
    output's progress folder), at most `options.cache_max` bytes at a time. `tokenizer` is a
    tokenizer.json, a folder holding one, or a Hub repository name. Progress is committed at most every
    `options.commit_seconds` (0: after every unit); a rerun after a kill continues from the last commit.
    """
    options = options or PrepareOptions()
    if options.num_proc is not None and options.num_proc < 1:
        raise UserError(f"--num-proc must be at least 1 (or left out: all CPUs), got {options.num_proc}")
    with (
        writing(output, "--output"),
        contextlib.ExitStack() as held,
    ):  # a file in the way, no space, ...: one line
        began = time.time()
        settings = settings or Settings()
        if not 0 <= settings.val_fraction < 1:
            raise UserError(f"--val-fraction {settings.val_fraction} is not in [0, 1)")
        if settings.shard_tokens < 1:
            raise UserError(f"--shard-tokens {settings.shard_tokens} must be positive")
        tok, token_dtype = _tokenizer(tokenizer, settings, options)
        if options.cache_max < 1:
            raise UserError(f"--cache-max must be positive, got {options.cache_max}")
        fields = inputs.Fields(settings.text_field, settings.exclude)
        pins = {} if options.overwrite else recorded_revisions(Path(output) / STATE_DIR / "state.json")
        sources = hub.expand(patterns, pins)
        local = [s for s in sources if isinstance(s, Path)]
        check_apart(Path(output), [p for p in patterns if not hub.is_hub(p)], local)
        units = UnitSource(sources, settings.text_field)
        early = units.early
        early_messages = [inputs.describe_problem(units.names[i], problem, 0) for i, problem in early]
        if options.strict and early_messages:
            raise UserError(early_messages[0])
        root = Path(output)
        root.mkdir(parents=True, exist_ok=True)
        held.enter_context(_owning(root))
        identity = identity_of(sources, tok, settings, token_dtype)
        state = starting_state(root, identity, options.overwrite)
        if state is None:
            return load_manifest(root)
        cache = None
        if units.remote:
            folder = Path(options.cache_dir or root / STATE_DIR / "cache") / f"prepare-{identity[:16]}"
            cache = hub.Cache(units.remote, folder, options.cache_max)
        header = {
            "format": FORMAT,
            "dtype": token_dtype.name,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id if settings.bos else None,
            "tokenizer_fingerprint": tok.fingerprint,
        }
        writer = _open_writer(root, state, header, settings.shard_tokens)
        state = writer.state
        spill_dir = root / STATE_DIR / SPILL_DIR
        shutil.rmtree(spill_dir, ignore_errors=True)  # what a killed preparation left on its way to a shard
        spill_dir.mkdir()
        num_proc = options.num_proc or (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
        skipped_bytes = units.start(state, cache)
        bar = tqdm(
            total=units.total_bytes(),
            initial=skipped_bytes,
            unit="B",
            unit_scale=True,
            desc="prepare",
            disable=not options.show_progress,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        warned = 0
        for message in early_messages:
            warned = _warn(message, warned, bar)
        docs = tokens = 0
        last_commit = time.monotonic()

        def commit() -> None:
            nonlocal last_commit
            note_found()  # counted in the state that records the files they were found in
            writer.commit()
            units.release_committed(state["units_done"])
            last_commit = time.monotonic()

        def note_found() -> None:  # problems of Hub files, found when they are fetched and planned
            nonlocal warned
            found = units.take_found()
            messages = [inputs.describe_problem(units.names[i], p, 0) for i, p in found]
            if options.strict and messages:
                raise UserError(messages[0])
            for message in messages:
                warned = _warn(message, warned, bar)
            writer.add_problems([p for _, p in found], messages)

        try:
            with serial_tokenizers():
                initargs = (
                    units.read_paths(),
                    str(tok.path),
                    fields,
                    settings,
                    tok.eos_id,
                    tok.bos_id,
                    token_dtype.name,
                    str(spill_dir),
                )
                for unit, result in processed(units, num_proc, initargs, commit):
                    note_found()
                    base = writer.line_base(unit)
                    messages = [
                        inputs.describe_problem(units.names[unit.file], p, base) for p in result.problems
                    ]
                    if options.strict and messages:
                        raise UserError(messages[0])
                    for message in messages:
                        warned = _warn(message, warned, bar)
                    writer.add(unit, result, messages)
                    if time.monotonic() - last_commit >= options.commit_seconds:
                        commit()
                    docs += result.documents()
                    tokens += result.tokens()
                    elapsed = max(time.time() - began, 1e-9)
                    bar.set_postfix_str(
                        f"{docs / elapsed:,.0f} docs/s, {tokens / elapsed / 1e6:,.2f}M tokens/s",
                        refresh=False,
                    )
                    bar.update(unit.size)
            note_found()
            writer.commit(final=True)
        finally:
            bar.close()
            writer.close()
            if cache is not None:
                cache.close()
        if cache is not None:
            cache.remove()
            if options.show_progress:
                print(f"hub cache: peak {cache.peak:,} bytes (cap {cache.max_bytes:,})", file=sys.stderr)
        manifest = _manifest(
            sources, tok, settings, token_dtype, writer.published, state, early_messages, early
        )
        _finish(root, patterns, tok, manifest)
        prepared = load_manifest(root)
        if options.show_progress:
            print(summary(prepared, time.time() - began))
        return prepared


def _tokenizer(
    tokenizer: str | os.PathLike, settings: Settings, options: PrepareOptions
) -> tuple[TokenizerInfo, np.dtype]:
    """The tokenizer (a file, a folder holding one, or a Hub repository) and the token dtype of its ids."""
    tokenizer_path, tokenizer_source = hub.tokenizer_file(str(tokenizer))
    tok = replace(
        load_tokenizer(tokenizer_path, options.eos_token, options.bos_token), source=tokenizer_source
    )
    if settings.bos and tok.bos_id is None:
        raise UserError(
            f"{tok.path}: --bos asked for, but the tokenizer has no BOS token; name one with --bos-token"
        )
    token_dtype = (
        dtype_for_vocab(tok.vocab_size)
        if options.dtype == "auto"
        else np.dtype(options.dtype).newbyteorder("<")
    )
    if tok.vocab_size > np.iinfo(token_dtype).max + 1:
        raise UserError(
            f"{tok.path}: vocab size {tok.vocab_size:,} does not fit {token_dtype.name} "
            f"(ids up to {np.iinfo(token_dtype).max:,}); use --dtype uint32 or auto"
        )
    return tok, token_dtype


def _finish(root: Path, patterns: Sequence[str], tok: TokenizerInfo, manifest: dict) -> None:
    """Write the dataset's tokenizer and manifest (last: readers accept only what it lists), then remove
    the progress folder; refused if no document was usable."""
    if not sum(split["documents"] for split in manifest["splits"].values()):
        raise UserError(
            f"no usable document in {', '.join(patterns)} ({manifest['skipped']['total']} skipped)"
        )
    if tok.path.resolve() != (root / TOKENIZER).resolve():
        write_atomic(root / TOKENIZER, tok.path.read_bytes())
    write_json_atomic(root / MANIFEST, manifest)
    shutil.rmtree(root / STATE_DIR)


@contextlib.contextmanager
def _owning(root: Path) -> Iterator[None]:
    """Hold the lease of output folder `root` (`pretrain.lease`): a second `prepare` into it is refused
    naming this one while it runs; a lease left by a killed one on this host is taken over."""
    path = root / LOCK

    def refuse(owner: dict) -> str:
        return (
            f"{root} is being written by another `pretrain data prepare` ({lease.describe_owner(owner)}): two "
            "preparations into one folder would mix their shards. Wait for it to finish or stop it, or choose "
            f"another --output; if that process is gone for good (its node died), delete {path}"
        )

    lease.acquire(path, refuse, "`pretrain data prepare`")
    try:
        yield
    finally:
        lease.release(path)


def _warn(message: str, warned: int, bar: tqdm) -> int:
    """Print the first WARNINGS skipped records, then one line saying there are more."""
    if warned < WARNINGS:
        bar.write(f"warning: {message} (skipped)", file=sys.stderr)
    elif warned == WARNINGS:
        bar.write("warning: more records skipped; the summary counts them all", file=sys.stderr)
    return warned + 1


def _manifest(
    sources: list[Source],
    tok: TokenizerInfo,
    settings: Settings,
    dtype: np.dtype,
    published: dict[str, list[dict]],
    state: dict,
    early_messages: list[str],
    early: list[tuple[int, Problem]],
) -> dict:
    skipped = Counter(p.reason for _, p in early)
    skipped.update(state["skipped"])
    splits = {
        split: {
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
        for split, shards in published.items()
    }
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "tokenizer": tok.manifest_entry(),
        "settings": asdict(settings),
        "inputs": [s.record() if isinstance(s, RemoteFile) else inputs.input_record(s) for s in sources],
        "splits": splits,
        "skipped": {
            "total": sum(skipped.values()),
            "by_reason": dict(sorted(skipped.items())),
            "examples": (early_messages + state["examples"])[:EXAMPLES],
        },
        "excluded": state["excluded"],
        "content_fingerprint": content_fingerprint(published, tok.fingerprint, dtype.name),
    }


def summary(manifest: Manifest, seconds: float) -> str:
    """The closing report of a preparation: documents, tokens and skipped records per split."""
    d = manifest.data
    docs = sum(s["documents"] for s in d["splits"].values())
    tokens = sum(s["tokens"] for s in d["splits"].values())
    lines = [f"prepared {manifest.root}: {docs:,} documents, {tokens:,} tokens in {seconds:.1f} s"]
    for split, s in d["splits"].items():
        lines.append(
            f"  {split:<5} {s['documents']:>12,} documents {s['tokens']:>16,} tokens  {len(s['shards'])} shard(s)"
        )
    sk = d["skipped"]
    reasons = ", ".join(f"{r} {n:,}" for r, n in sk["by_reason"].items())
    lines.append(f"  skipped {sk['total']:,} record(s)" + (f": {reasons}" if reasons else ""))
    if d["settings"]["exclude"]:
        lines.append(f"  excluded {d['excluded']:,} record(s) by {', '.join(d['settings']['exclude'])}")
    return "\n".join(lines)
