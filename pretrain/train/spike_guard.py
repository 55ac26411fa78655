"""`SpikeGuard`: catch a diverging run before its weights are ruined for good.

A step is bad when its loss or gradient norm is not finite, or is a spike: more than `threshold`
standard deviations above the mean of the last `window` good steps (a z-score, in the spirit of
PaLM's skipped batches and OLMo-core's skip-step optimizer), judged once `min_steps` good steps
are known. A bad step is skipped (no update, no optimizer-state change); enough bad steps in a row
mean divergence and the run stops (`PretrainModule`).

The weights a bad step was computed with came out of the step before it (a too-large learning
rate shows in the loss one step after the update it ruined). So while a streak of bad steps lasts,
`suspect_since` is its first step: no periodic checkpoint is written, retention never deletes the
newest checkpoint from before that step, and that is the checkpoint the stop message names.
The history is saved in checkpoints, so a resumed run judges its steps as an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any


class SpikeGuard:
    def __init__(self, threshold: float | None = 6.0, window: int = 100, min_steps: int = 10) -> None:
        self.threshold = threshold
        self.history: deque[tuple[float, float]] = deque(maxlen=window)  # (loss, grad norm) of good steps
        self.min_steps = min_steps
        self.suspect_since: int | None = None  # first step of the current streak of bad steps
        self.in_a_row = 0

    def judge(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Why step `step` is bad (its update must be skipped), or None if it is good."""
        reason = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = f"a non-finite loss or gradient ({loss:.4g}, norm {grad_norm:.4g})"
        elif self.threshold is not None and len(self.history) >= self.min_steps:
            for name, value, past in (("loss", loss, 0), ("gradient norm", grad_norm, 1)):
                values = [entry[past] for entry in self.history]
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
                if std > 1e-12 and (value - mean) / std > self.threshold:
                    reason = (
                        f"a {name} spike ({value:.4g}, {(value - mean) / std:.1f} standard deviations above the "
                        f"mean {mean:.4g} of the last {len(values)} steps)"
                    )
                    break
        if reason is None:
            self.history.append((loss, grad_norm))
            self.suspect_since, self.in_a_row = None, 0
        else:
            self.suspect_since = step if self.suspect_since is None else self.suspect_since
            self.in_a_row += 1
        return reason

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "suspect_since": self.suspect_since, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(tuple(entry) for entry in state["history"])
        self.suspect_since, self.in_a_row = state["suspect_since"], state["in_a_row"]
