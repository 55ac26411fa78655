"""Goodput: where each launch's wall time went, read back from `RUN_DIR/goodput/launch-<k>.json`.

Launch k of a run (the one that logs `logs/version_<k>`) writes its record (rank 0,
`pretrain.train.callbacks.goodput.GoodputRecorder`) at checkpoints, every ~30 s and at the end:

    {"kind": "pretrain-goodput", "launch": k, "process_start": UNIX, "updated": UNIX, "ended": bool,
     "start_step": S, "last_step": N, "phases": {PHASE: seconds}, "marks": [[step, step_s, elapsed_s]],
     "rollbacks": [{"from_step": a, "to_step": b, "seconds": s}]}

`marks` place the cumulative step seconds of the launch at some steps (its start, each checkpoint
step, each write; rising in step: a rollback drops those past its checkpoint); `elapsed_s` counts
from the process start. Each metrics.csv row of a step also holds
`goodput/elapsed_s`, so the steps a SIGKILL cut off after the last write are placed too.

Work lost by launch k = the step seconds it spent past the step launch k+1 resumed from (and past
each rollback's checkpoint). Goodput = (step seconds - lost seconds) / wall seconds since the run's
first launch started. The gap between launches is known when launch k ended with a record (its
`updated`) and is then "queue/idle"; after a kill it is unknown and left out of the accounted sum.

Damaged, foreign or wrongly shaped records are left out with one line each (`GoodputReport.problems`);
no torch import.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.files import DamagedRecord, Fields, has_fields, is_a, read_json

KIND = "pretrain-goodput"
PHASES = ("startup", "steps", "checkpoint", "validation", "downstream", "teardown")
ELAPSED = "goodput/elapsed_s"  # metrics.csv: seconds from the process start at the end of a step
_RECORD = re.compile(r"launch-(\d+)\.json")
_FIELDS: Fields = {
    "kind": (str,),
    "launch": (int,),
    "process_start": (int, float),
    "updated": (int, float),
    "ended": (bool,),
    "start_step": (int,),
    "last_step": (int,),
    "phases": (dict,),
    "marks": (list,),
    "rollbacks": (list,),
}


@dataclass(frozen=True)
class LaunchTime:
    """One launch's accounting (seconds), with the work the next launch or a rollback redid."""

    launch: int
    start: float
    end: float
    ended: bool
    start_step: int
    last_step: int
    phases: dict[str, float]
    lost_steps: int = 0
    lost_seconds: float = 0.0
    gap_after: float | None = None  # idle until the next launch started; None: unknown or last

    @property
    def wall(self) -> float:
        return self.end - self.start

    @property
    def useful(self) -> float:
        return self.phases["steps"] - self.lost_seconds

    @property
    def goodput(self) -> float:
        return self.useful / self.wall if self.wall > 0 else 0.0


@dataclass(frozen=True)
class GoodputReport:
    launches: list[LaunchTime]
    problems: list[str] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return self.launches[-1].end - self.launches[0].start if self.launches else 0.0

    @property
    def useful(self) -> float:
        return sum(launch.useful for launch in self.launches)

    @property
    def goodput(self) -> float:
        return self.useful / self.wall if self.wall > 0 else 0.0

    def total(self, phase: str) -> float:
        return sum(launch.phases[phase] for launch in self.launches)

    @property
    def lost_steps(self) -> int:
        return sum(launch.lost_steps for launch in self.launches)

    @property
    def lost_seconds(self) -> float:
        return sum(launch.lost_seconds for launch in self.launches)

    @property
    def known_gaps(self) -> float:
        return sum(launch.gap_after or 0.0 for launch in self.launches)

    @property
    def unknown_gaps(self) -> int:
        return sum(launch.gap_after is None for launch in self.launches[:-1])


def record_path(run_dir: Path, launch: int) -> Path:
    return run_dir / "goodput" / f"launch-{launch}.json"


def read_record(path: Path) -> dict[str, Any]:
    """A launch record; `DamagedRecord` (why, in a few words) when it is not one we wrote."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DamagedRecord(f"JSON {type(data).__name__} where a goodput record belongs")
    if data.get("kind") != KIND:
        raise DamagedRecord("not a goodput record written by `pretrain fit`")
    if not has_fields(data, _FIELDS):
        missing = [key for key, types in _FIELDS.items() if key not in data or not is_a(data[key], types)]
        raise DamagedRecord(f"missing or wrong-typed {', '.join(missing)}")
    phases = data["phases"]
    if not all(isinstance(phases.get(p), (int, float)) for p in PHASES) or not all(
        isinstance(m, list) and len(m) == 3 and all(isinstance(x, (int, float)) for x in m)
        for m in data["marks"]
    ):
        raise DamagedRecord("phases or marks of the wrong shape")
    return data


def step_seconds_at(marks: list[list[float]], step: int) -> float:
    """Cumulative step seconds at `step`, interpolated between the marks (0 before the first)."""
    below = [m for m in marks if m[0] <= step]
    above = [m for m in marks if m[0] >= step]
    if not below:
        return 0.0
    low = max(below, key=lambda m: m[0])
    if not above:
        return float(low[1])
    high = min(above, key=lambda m: m[0])
    if high[0] == low[0]:
        return float(low[1])
    return float(low[1] + (high[1] - low[1]) * (step - low[0]) / (high[0] - low[0]))


def last_logged_step(metrics_csv: Path) -> tuple[int, float] | None:
    """(optimizer step, seconds from the process start) of the last step a launch logged with its
    elapsed time; None when there is none (or the file cannot be read)."""
    try:
        text = metrics_csv.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    found = None
    for row in csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1])):
        try:
            step, elapsed = int(row["step"]) + 1, float(row[ELAPSED])
        except (KeyError, TypeError, ValueError):
            continue
        if found is None or step > found[0]:
            found = (step, elapsed)
    return found


def read_goodput(run_dir: Path) -> GoodputReport:
    """Every launch's record, accounted (module docstring); unusable records named in `problems`."""
    records, problems = [], []
    for path in sorted((run_dir / "goodput").glob("launch-*.json")):
        match = _RECORD.fullmatch(path.name)
        if match is None:
            continue
        try:
            record = read_record(path)
        except DamagedRecord as err:
            problems.append(f"{path}: {err}; left out")
            continue
        if record["launch"] != int(match[1]):
            problems.append(f"{path}: records launch {record['launch']}, not {match[1]}; left out")
            continue
        records.append(_with_logged_tail(record, run_dir / "logs" / f"version_{match[1]}" / "metrics.csv"))
    records.sort(key=lambda r: r["launch"])
    return GoodputReport(_account(records), problems)


def _with_logged_tail(record: dict[str, Any], metrics_csv: Path) -> dict[str, Any]:
    """The record extended by the steps its launch logged after its last write (a SIGKILL)."""
    logged = last_logged_step(metrics_csv)
    if record["ended"] or logged is None or logged[0] <= record["last_step"]:
        return record
    step, elapsed = logged
    last_elapsed = max((m[2] for m in record["marks"]), default=record["phases"]["startup"])
    tail = max(0.0, elapsed - last_elapsed)
    phases = dict(record["phases"], steps=record["phases"]["steps"] + tail)
    marks = [*record["marks"], [step, phases["steps"], elapsed]]
    updated = max(record["updated"], record["process_start"] + elapsed)
    return dict(record, last_step=step, phases=phases, marks=marks, updated=updated)


def _account(records: list[dict[str, Any]]) -> list[LaunchTime]:
    launches = []
    for i, record in enumerate(records):
        lost_steps = sum(
            max(0, r["from_step"] - r["to_step"]) for r in record["rollbacks"] if _is_rollback(r)
        )
        lost_seconds = sum(float(r["seconds"]) for r in record["rollbacks"] if _is_rollback(r))
        gap = None
        if i + 1 < len(records):
            following = records[i + 1]
            resumed = following["start_step"]
            if record["last_step"] > resumed:
                lost_steps += record["last_step"] - max(resumed, record["start_step"])
                lost_seconds += record["phases"]["steps"] - step_seconds_at(record["marks"], resumed)
            if record["ended"]:
                gap = max(0.0, following["process_start"] - record["updated"])
        launches.append(
            LaunchTime(
                launch=record["launch"],
                start=float(record["process_start"]),
                end=float(record["updated"]),
                ended=record["ended"],
                start_step=record["start_step"],
                last_step=record["last_step"],
                phases={p: float(record["phases"][p]) for p in PHASES},
                lost_steps=lost_steps,
                lost_seconds=lost_seconds,
                gap_after=gap,
            )
        )
    return launches


def _is_rollback(entry: Any) -> bool:
    return has_fields(entry, {"from_step": (int,), "to_step": (int,), "seconds": (int, float)})


def describe(report: GoodputReport) -> list[str]:
    """`pretrain status`'s lines: one per launch, then the run's totals and goodput."""
    lines = []
    for launch in report.launches:
        p = launch.phases
        how = "ended" if launch.ended else "killed or running"
        lines.append(
            f"launch {launch.launch}: {_s(launch.wall)} wall ({how}), steps {launch.start_step}->{launch.last_step}: "
            f"start-up {_s(p['startup'])}, steps {_s(p['steps'])}, checkpoint {_s(p['checkpoint'])}, "
            f"validation {_s(p['validation'])}, downstream {_s(p['downstream'])}, teardown {_s(p['teardown'])}, "
            f"lost {launch.lost_steps} step(s) {_s(launch.lost_seconds)}; goodput {launch.goodput:.1%}"
        )
    if report.launches:
        gaps = f"between launches {_s(report.known_gaps)}"
        if report.unknown_gaps:
            gaps += f" + {report.unknown_gaps} gap(s) unknown (after a kill; not in the sum)"
        lines.append(
            f"total: {_s(report.wall)} wall since the run began, useful steps {_s(report.useful)}, "
            f"start-up {_s(report.total('startup'))}, checkpoint {_s(report.total('checkpoint'))}, "
            f"evaluation {_s(report.total('validation') + report.total('downstream'))}, "
            f"lost {report.lost_steps} step(s) {_s(report.lost_seconds)}, {gaps}; goodput {report.goodput:.1%}"
        )
    return lines + report.problems


def _s(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 600 else f"{seconds / 3600:.2f}h"
