"""Files written so that a reader sees the old content or the whole new one, never a part.

This is the one way `pretrain` writes a file it or a user reads back: `write_atomic` (bytes),
`write_json_atomic`, `write_atomic_with` (any writer given the temporary path). Every write lands
in a temporary file (`NAME.tmp`) beside its destination (same filesystem, so the rename is
atomic, never in `$TMPDIR`), is flushed and fsynced, then renamed over the destination, and the
folder is fsynced so that the rename survives a crash. Imports nothing heavy: `pretrain status`
and `pretrain plot` use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    write_atomic_with(path, lambda tmp: tmp.write_bytes(data))


def write_atomic_with(path: Path, write: Callable[[Path], object]) -> None:
    """Let `write(tmp)` fill a temporary file beside `path` (torch.save, a safetensors writer, a
    copy), then fsync it and rename it over `path`; the temporary file is removed on any failure."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (so that a rename in it survives a crash), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Fields = dict[str, tuple[type, ...]]  # JSON key -> the types its value may have


class DamagedRecord(ValueError):
    """A file that `pretrain` wrote and cannot read back; the message says why, in a few words."""


def read_json(path: Path) -> Any:
    """The JSON value in `path`, None when there is no such file; `DamagedRecord` when it is empty,
    unreadable, not UTF-8 or not complete JSON."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DamagedRecord(f"unreadable ({err.strerror})") from None
    if not data.strip():
        raise DamagedRecord("empty")
    try:
        return json.loads(data.decode())
    except UnicodeDecodeError:
        raise DamagedRecord("not UTF-8 text (garbage bytes)") from None
    except ValueError:
        raise DamagedRecord("not complete JSON (truncated?)") from None


def has_fields(value: Any, fields: Fields) -> bool:
    """Whether `value` is a JSON object holding every key of `fields` with a value of its types
    (a bool is not an int)."""
    return isinstance(value, dict) and all(
        key in value and is_a(value[key], types) for key, types in fields.items()
    )


def is_a(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not an int."""
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
