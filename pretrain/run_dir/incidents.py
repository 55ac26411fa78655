"""A run's incidents (`RUN_DIR/incidents.jsonl`): one line per divergence the spike guard judged,
with the steps, why, the checkpoint rolled back to and the skipped sample range, which is part of
the run's data order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain.errors import UserError


def read_incidents(path: Path, strict: bool = True) -> list[dict[str, Any]]:
    """The divergence records in `path`, oldest first. Their skip ranges are part of the data order,
    so a damaged file stops training (`strict`) naming it; `status` and `plot` leave out the
    damaged lines instead."""
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        if strict:
            raise UserError(f"{path}: unreadable ({err}); restore it from a backup") from None
        return []
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or entry.get("action") not in ("rollback", "stop"):
                raise ValueError("not an incident record")
            skip_range(entry)
        except (ValueError, TypeError) as err:
            if strict:
                raise UserError(
                    f"{path}, line {number}: not an incident record ({err}); its skipped "
                    "sample ranges are part of the run's data order: restore the line (or remove it to "
                    "train on those samples again)"
                ) from None
            continue
        found.append(entry)
    return found


def describe_incidents(skipped_steps: int, incidents: tuple[dict[str, Any], ...]) -> str:
    """The spike guard's record in one line: skipped steps, rollbacks and stops, the last incident."""
    rolled = [entry for entry in incidents if entry["action"] == "rollback"]
    bad_steps = sum(entry["steps"][1] - entry["steps"][0] + 1 for entry in rolled)
    text = (
        f"{skipped_steps} step(s) skipped on the path kept, {len(rolled)} rollback(s) (of {bad_steps} bad "
        f"step(s)), {len(incidents) - len(rolled)} stop(s)"
    )
    if incidents:
        last = incidents[-1]
        first, final = last["steps"]
        text += f"; last: steps {first}-{final}, {last['action']}"
        if last["action"] == "rollback":
            start, stop = last["skip"]
            text += f" to step {last['skip_steps'][0]}, samples [{start:,}, {stop:,}) skipped"
    return text


def skip_range(entry: dict[str, Any]) -> tuple[int, int] | None:
    """An incident's skipped [start, stop) global sample range, None if it skipped nothing."""
    skip = entry.get("skip")
    if skip is None:
        return None
    start, stop = skip
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop):
        raise ValueError(f"skip {skip} is not a [start, stop) sample range")
    return start, stop
