"""What a finished anneal probe scored: `RUN_DIR/anneal/step-N/probe.json`, one record per probe.

The probe under `step-N/` is an ordinary run (`pretrain fit --branch_from`) of the parent's
checkpoint at step N; its record is written atomically when the probe has finished, so a record
that exists describes a complete probe. Records are keyed by the parent checkpoint's identity
(`pretrain.model.checkpoint.checkpoint_identity`), not only by its step: a probe of a checkpoint
that was later rewritten under the same name is stale.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.files import DamagedRecord, Fields, has_fields, read_json, write_json_atomic

ANNEAL_DIR = "anneal"
RECORD = "probe.json"
_NUMBER = (int, float)
_FIELDS: Fields = {
    "step": (int,),
    "checkpoint_id": (str,),
    "parent_tokens": (int,),
    "anneal_tokens": (int,),
    "val_loss": _NUMBER,
    "val_loss_per_source": (dict,),
    "downstream": (dict,),
}


@dataclass(frozen=True)
class ProbeResult:
    """One probe: the parent's checkpoint at `step`, decayed over `anneal_tokens` more tokens."""

    step: int  # the parent checkpoint's optimizer step
    checkpoint_id: str  # the parent checkpoint's identity when the probe started from it
    parent_tokens: int  # tokens the parent had trained on at `step`
    anneal_tokens: int  # tokens of the decay branch
    val_loss: float  # annealed validation loss, all sources
    stable_val_loss: float | None = None  # the parent's validation loss at `step` (None: not logged)
    val_loss_per_source: dict[str, float] = field(default_factory=dict)
    downstream: dict[str, float] = field(default_factory=dict)  # task/metric -> annealed score

    @property
    def tokens(self) -> int:
        """Tokens the annealed model has seen in all: the forecast's D."""
        return self.parent_tokens + self.anneal_tokens


def probe_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / ANNEAL_DIR / f"step-{step}"


def write_result(run_dir: str | Path, result: ProbeResult) -> Path:
    """Publish a finished probe's record (atomically, beside its destination)."""
    path = probe_dir(run_dir, result.step) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, dataclasses.asdict(result))
    return path


def read_result(path: Path) -> ProbeResult | None:
    """The record in `path`; None when there is none. A damaged or foreign file raises `DamagedRecord`."""
    value = read_json(path)
    if value is None:
        return None
    stable = value.get("stable_val_loss") if isinstance(value, dict) else None
    if not has_fields(value, _FIELDS) or not (stable is None or isinstance(stable, _NUMBER)):
        raise DamagedRecord("not a probe record (fields missing or of the wrong type)")
    per_source, downstream = value["val_loss_per_source"], value["downstream"]
    if not all(isinstance(v, _NUMBER) for v in (*per_source.values(), *downstream.values())):
        raise DamagedRecord("not a probe record (a score that is not a number)")
    return ProbeResult(**{f.name: value.get(f.name) for f in dataclasses.fields(ProbeResult)})


def read_results(run_dir: str | Path) -> list[ProbeResult]:
    """Every finished probe of the run, by step; a damaged record is named in one line and left out."""
    results = []
    for path in sorted((Path(run_dir) / ANNEAL_DIR).glob(f"step-*/{RECORD}")):
        try:
            result = read_result(path)
        except DamagedRecord as err:
            print(
                f"{path}: {err}; left out (delete it and run `pretrain anneal` again to redo the probe)",
                file=sys.stderr,
            )
            continue
        if result is not None:
            results.append(result)
    return sorted(results, key=lambda r: r.step)
