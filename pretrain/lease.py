"""A lease file: one live owner of a folder at a time (a run directory, a dataset being prepared).

The lease names its owner's host, process (with its start time, against pid reuse) and SLURM
job. It is written in full (fsynced) aside, then hard-linked into place (atomic on local disks,
NFS and Lustre alike), so a lease that cannot be read (empty, truncated, not UTF-8, not JSON, or
JSON of another shape) was not written by us: nobody can tell whether its owner still runs, so
every process is refused, naming the file to delete. Another process takes a lease over only
when its owner is provably gone: a process of this host that no longer runs, or the same SLURM
job requeued; it says so in one line. Otherwise it is refused with the owner named. An owner on
another host is never guessed dead. A stale lease is moved aside by an atomic rename, so of
several processes taking over at once one moves it, and a newer lease moved by mistake is put back.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import NoneType
from typing import Any

from pretrain.errors import UserError
from pretrain.files import DamagedRecord, Fields, has_fields, read_json, write_atomic

FIELDS: Fields = {"host": (str,), "pid": (int,), "start": (str, NoneType), "job_id": (str, NoneType)}


def acquire(path: Path, refuse: Callable[[dict[str, Any]], str], holder: str) -> None:
    """Make this process the owner of lease `path`, or raise UserError(refuse(owner)) while the
    owner may live. `holder` names the command that holds such leases (e.g. "`pretrain fit`")."""
    me = this_process()
    offer = path.with_name(f".{path.stem.lstrip('.')}.{me['host']}.{me['pid']}.tmp")
    write_atomic(offer, (json.dumps(me) + "\n").encode())  # on disk in full before it is linked
    try:
        for _ in range(3):
            try:
                os.link(offer, path)  # fails if a lease exists, atomically
                return
            except FileExistsError:
                owner = read(path)
                if owner == {}:
                    raise UserError(damaged_message(path, holder)) from None
                if owner is not None and same_process(owner, me):
                    return
                gone = gone_because(owner, me)
                if gone is None:
                    raise UserError(refuse(owner or {})) from None
                print(f"{path.parent}: taking over from an earlier {holder} ({gone})", file=sys.stderr)
                if owner is not None:
                    remove_stale(path, owner, offer.with_suffix(".stale"))
        raise UserError(f"{path}: another process keeps taking {path.parent} over; try again")
    finally:
        offer.unlink(missing_ok=True)


def read(path: Path) -> dict[str, Any] | None:
    """The lease's content, None if there is none; {} if it is not a lease we wrote (unreadable,
    or JSON of another shape)."""
    try:
        owner = read_json(path)
    except DamagedRecord:
        return {}
    if owner is None:
        return None
    return owner if has_fields(owner, FIELDS) else {}


def damaged_message(path: Path, holder: str) -> str:
    try:
        problem = "JSON of another shape" if read_json(path) is not None else "gone"
    except DamagedRecord as err:
        problem = str(err)
    return (
        f"{path}: not a lease written by {holder} ({problem}), so whether another process owns "
        f"{path.parent} cannot be told; if no {holder} runs on it, delete {path} and launch again"
    )


def remove_stale(path: Path, judged: dict[str, Any], aside: Path) -> None:
    """Remove the lease judged stale unless another process replaced it meanwhile."""
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process moved it first
    try:
        if read(aside) != judged:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
    finally:
        aside.unlink(missing_ok=True)


def release(path: Path) -> None:
    """Remove the lease if this process holds it."""
    owner = read(path)
    if owner and same_process(owner, this_process()):
        path.unlink(missing_ok=True)


def this_process() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": process_start(os.getpid()),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown or not running."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def same_process(owner: dict[str, Any], me: dict[str, Any]) -> bool:
    return (
        owner.get("host") == me["host"]
        and owner.get("pid") == me["pid"]
        and owner.get("start") == me["start"]
    )


def gone_because(owner: dict[str, Any] | None, me: dict[str, Any]) -> str | None:
    """Why the lease's owner is provably gone, or None if it may still be running."""
    if owner is None:
        return "released meanwhile"
    if owner.get("job_id") and owner["job_id"] == me["job_id"]:
        return f"SLURM requeued job {owner['job_id']}: its earlier run is over"
    if owner.get("host") == me["host"]:
        pid = owner.get("pid")
        start = process_start(pid) if isinstance(pid, int) else None
        if start is None or start != owner.get("start"):
            return f"process {pid} on this host is no longer running"
    return None


def describe_owner(owner: dict[str, Any]) -> str:
    """`host H, pid P[, SLURM job J], since T` of a lease's owner."""
    job = f", SLURM job {owner['job_id']}" if owner.get("job_id") else ""
    return f"host {owner.get('host')}, pid {owner.get('pid')}{job}, since {owner.get('since')}"
