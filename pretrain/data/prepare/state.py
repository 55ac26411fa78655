"""The resume state of `pretrain data prepare`: `.prepare/state.json` in the output folder, the commit
point (units done, open shard sizes, skip counts), and where a preparation starts from.

A rerun with the same inputs and settings (`identity_of`) continues the committed state; other inputs
need --overwrite, which deletes only what an earlier preparation wrote (`_clean`). A state that is
damaged (empty, truncated, not JSON, the wrong shape) is not guessed at: the preparation starts over,
saying so in one line (nothing finished is lost).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pretrain.data.prepare import inputs
from pretrain.data.prepare.hub import RemoteFile
from pretrain.data.prepare.settings import Settings
from pretrain.data.prepare.units import Source
from pretrain.data.shards import FORMAT, MANIFEST, SPLITS, as_object, field, load_manifest
from pretrain.data.tokenizer import TokenizerInfo
from pretrain.errors import UserError
from pretrain.files import read_json, write_json_atomic

STATE_DIR = ".prepare"

OUR_FILE = re.compile(r"shard_\d+\.(bin|json|bin\.tmp|docs\.tmp|json\.tmp)")  # what prepare writes in a split


def identity_of(sources: list[Source], tok: TokenizerInfo, settings: Settings, dtype: np.dtype) -> str:
    """What a resumed run must share with the interrupted one."""
    spec = {
        "format": FORMAT,
        "unit_bytes": inputs.UNIT_BYTES,
        "tokenizer": tok.manifest_entry(),
        "dtype": dtype.name,
        "settings": asdict(settings),
        "inputs": [
            [s.name, s.size]  # a mirror file's bytes are checked by content on resume (`units`)
            if isinstance(s, RemoteFile)
            else [str(s), inputs.input_record(s)["bytes"], inputs.modified(s)]
            for s in sources
        ],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _fresh_state(identity: str) -> dict:
    return {
        "identity": identity,
        "units_done": 0,
        "line_base": [-1, 0],  # [file, lines] of the units done so far in that file
        "splits": {s: {"index": 0, "tokens": 0, "docs": 0} for s in SPLITS},
        "skipped": {},
        "examples": [],
        "excluded": 0,
    }


def _clean(root: Path) -> None:
    """Delete what an earlier preparation wrote in `root`, recognised by name and format; nothing else."""
    manifest = root / MANIFEST
    if manifest.exists():
        try:
            ours = json.loads(manifest.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(
                f"--overwrite: {manifest} was not written by `pretrain data prepare`; move it away first"
            )
        manifest.unlink()
    for split in SPLITS:
        folder = root / split
        if folder.is_dir():
            for path in folder.iterdir():
                if OUR_FILE.fullmatch(path.name) and path.is_file():
                    path.unlink()
            with contextlib.suppress(OSError):  # kept when it holds files of someone else's
                folder.rmdir()
    shutil.rmtree(root / STATE_DIR, ignore_errors=True)


def check_apart(root: Path, patterns: Sequence[str], paths: Sequence[Path]) -> None:
    """The output folder must neither hold an input nor lie inside an input folder."""
    out = root.resolve()
    for path in paths:
        if out in path.resolve().parents:
            raise UserError(
                f"--output {root} holds the input {path}: a dataset folder is written and replaced by prepare; "
                "give the dataset a folder of its own, outside the inputs"
            )
    for pattern in patterns:
        folder = Path(pattern)
        if folder.is_dir() and (out == folder.resolve() or folder.resolve() in out.parents):
            raise UserError(
                f"--output {root} is inside the input folder {pattern}: a later run would read the dataset's "
                "own files as input; write it outside the inputs"
            )


def starting_state(root: Path, identity: str, overwrite: bool) -> dict | None:
    """The committed state to continue from: fresh unless an identical run was interrupted;
    None if an identical run finished (killed while removing its progress folder)."""
    state_path = root / STATE_DIR / "state.json"
    state, damage = (None, None) if overwrite else _read_state(state_path)
    if overwrite:
        _clean(root)
    elif (root / MANIFEST).exists():
        if state is not None and state["identity"] == identity:
            shutil.rmtree(root / STATE_DIR)
            return None
        load_manifest(root)  # a damaged manifest is named as such
        raise UserError(
            f"{root} already holds a prepared dataset ({root / MANIFEST}); pass --overwrite to replace it"
        )
    elif state is not None:
        if state["identity"] == identity:
            return state
        raise UserError(
            f"{root} holds an unfinished preparation of other inputs or settings ({state_path}); "
            "pass --overwrite to start over"
        )
    elif damage is not None:
        start_over(root, f"{state_path}: damaged ({damage})")
    elif any((root / s).exists() for s in SPLITS):
        raise UserError(
            f"{root} holds shard folders but no manifest or progress; pass --overwrite to start over"
        )
    return begin_state(root, identity)


def begin_state(root: Path, identity: str) -> dict:
    """A fresh state, committed: a kill before the first commit resumes from nothing."""
    (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    state = _fresh_state(identity)
    write_json_atomic(root / STATE_DIR / "state.json", state)
    return state


def start_over(root: Path, why: str) -> None:
    """Remove an unfinished preparation that cannot be continued, saying so (its work is redone)."""
    print(f"{why}: starting the preparation over (nothing finished is lost: no dataset was written yet)",
          file=sys.stderr)  # fmt: skip
    _clean(root)


def _read_state(path: Path) -> tuple[dict | None, str | None]:
    """The committed state at `path` (None if there is none), or None and why it is damaged."""
    if not path.exists():
        return None, None
    try:
        state = as_object(read_json(path))
        _check_state(state)
    except (OSError, ValueError) as err:
        return None, str(err)
    return state, None


def _check_state(state: dict) -> None:
    """The fields a preparation continues from; ValueError naming the first one wrong."""
    field(state, "identity", str)
    field(state, "units_done", int)
    field(state, "line_base.0", int)
    field(state, "line_base.1", int)
    for split in SPLITS:
        for name in ("index", "tokens", "docs"):
            if field(state, f"splits.{split}.{name}", int) < 0:
                raise ValueError(f"field 'splits.{split}.{name}' is negative")
    for name in ("skipped", *(("file_units",) if "file_units" in state else ())):
        for key, count in field(state, name, dict).items():
            if not isinstance(count, int) or isinstance(count, bool):
                raise ValueError(f"field {name!r} counts {key!r} as {count!r}, not an integer")
    field(state, "examples", list)
    field(state, "excluded", int)
