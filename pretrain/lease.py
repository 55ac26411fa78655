"""A lease file: one live owner of a folder at a time (a run directory, a dataset being prepared).

The lease is created with a hard link (atomic on local disks, NFS and Lustre alike) and names
its owner's host, process (with its start time, against pid reuse) and SLURM job. Another
process takes it over only when the owner is provably gone: a process of this host that no
longer runs, the same SLURM job requeued, or a lease file left unreadable by a crash while it
was written; it says so in one line. Otherwise it is refused with the owner named. An owner
on another host is never guessed dead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pretrain.errors import UserError


def acquire(path: Path, refuse: Callable[[dict[str, Any]], str], holder: str) -> None:
    """Make this process the owner of lease `path`, or raise UserError(refuse(owner)) while the
    owner may live. `holder` names what holds it in the take-over line (e.g. "`pretrain fit`")."""
    me = this_process()
    offer = path.with_name(f".{path.stem.lstrip('.')}.{me['host']}.{me['pid']}.tmp")
    offer.write_text(json.dumps(me) + "\n")
    try:
        for _ in range(3):
            try:
                os.link(offer, path)  # fails if a lease exists, atomically
                return
            except FileExistsError:
                owner = read(path)
                if owner is not None and same_process(owner, me):
                    return
                gone = gone_because(owner, me)
                if gone is None:
                    raise UserError(refuse(owner or {})) from None
                print(f"{path.parent}: taking over from an earlier {holder} ({gone})", file=sys.stderr)
                if read(path) == owner:  # still the stale lease we judged
                    path.unlink(missing_ok=True)
        raise UserError(f"{path}: another process keeps taking {path.parent} over; try again")
    finally:
        offer.unlink(missing_ok=True)


def read(path: Path) -> dict[str, Any] | None:
    """The lease's content, None if there is none; {} if it is unreadable (a crash mid-write)."""
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


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
    if not owner:
        return "its lease file is unreadable, left by a crash while it was written"
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
