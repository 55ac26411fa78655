"""`SpikeGuard`: skip transient spikes, accept a legitimate new loss level, catch a divergence.

Each optimizer step is judged (`SpikeGuard.judge`) from its loss, its gradient norm and the norm
of the weights it was computed with:

- **Bad step**: the loss or the gradient norm is not finite, or the loss is a spike: more than
  `threshold` scales above the current level (the mean of the last `LEVEL_STEPS` good steps). The
  scale is the step-to-step noise of the last `window` good steps (the standard deviation of
  their successive differences over sqrt 2, which a falling trend does not inflate as a plain
  standard deviation would early in training), but at least 1% of the level (a smooth
  late-training history must not turn ordinary noise into a 6-sigma event). Judged once
  `min_steps` good steps are known. A bad step is skipped: no update, no optimizer-state change.
  Every skipped step is reported in one line (`Judgment.message`).
- A gradient-norm outlier with a normal loss is **not** skipped: gradient clipping already bounds
  its update, and on ordinary runs such outliers are about 1% of steps (the false positives that
  skipping them gave); they are counted (`grad_norm_outliers`) and logged.
- **A streak** of bad steps in a row is judged when it reaches `patience` steps, or at once when
  the update before it moved the weights abnormally:
  - *divergence* when a loss of the streak is not finite, when its mean loss is no better than
    guessing uniformly over the vocabulary (ln V: damaged weights or data without signal), when
    the loss keeps rising through the streak, or when the update just before the streak changed
    the norm of the weights by more than `WEIGHT_JUMP` x the largest change of the last `window`
    good steps (and by more than 1%): a learning rate far too large, the usual cause;
  - otherwise a *new level* (a new data domain, a mixture ramp, a re-warmed LR): the history
    restarts from the streak's steps and training goes on (one line says so).
- **Restarts**: the history is forgotten when a launch changes what the loss is measured on or
  where it starts from (another dataset, a branch, new initial weights: `restart`), so a
  continual stage is judged against its own steps, never the previous stage's.

The weights a bad step was computed with came out of the step before it (a too-large learning
rate shows in the loss one step after the update it ruined). So while a streak lasts,
`suspect_since` is its first step: no periodic checkpoint is written, retention keeps the newest
checkpoint from before that step, and a divergence rolls back to it (`pretrain.train.module`).
The guard's state is saved in checkpoints, so a resumed run judges its steps as an uninterrupted
one would.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

WEIGHT_JUMP = 30.0  # an update this many times larger (in weight-norm change) than any recent one
MIN_WEIGHT_JUMP = 0.01  # ...and changing the weight norm by at least 1% is a divergence
MIN_RELATIVE_SCALE = 0.01  # the loss scale is at least 1% of the mean loss
LEVEL_STEPS = 10  # the loss level is the mean of this many latest good steps


@dataclass(frozen=True)
class Judgment:
    """What the guard decided about one step."""

    skip: bool = False  # skip this step's update
    verdict: str | None = None  # "divergence" or "new level" when a streak was judged now
    why: str = ""  # the reason for the verdict
    message: str = ""  # one line for the log when something happened ("" otherwise)
    grad_norm_outlier: bool = False


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


class SpikeGuard:
    def __init__(
        self,
        threshold: float | None = 6.0,
        window: int = 100,
        patience: int = 10,
        vocab_size: int | None = None,
        min_steps: int = 10,
    ) -> None:
        self.threshold = threshold
        self.window = window
        self.patience = patience
        self.uniform_loss = math.log(vocab_size) if vocab_size else math.inf
        self.min_steps = min_steps
        self.history: deque[tuple[float, float]] = deque(maxlen=window)  # (loss, grad norm) of good steps
        self.weight_changes: deque[float] = deque(maxlen=window)  # relative weight-norm change per good step
        self.last_weight_norm: float | None = None
        self.suspect_since: int | None = None  # first step of the current streak of bad steps
        self.streak: list[tuple[float, float]] = []  # (loss, grad norm) of the streak's steps
        self.streak_jump: float | None = None  # weight-norm change of the update before the streak

    @property
    def in_a_row(self) -> int:
        return len(self.streak)

    def restart(self) -> None:
        """Forget the history: the next steps are judged against themselves (a new stage)."""
        self.history.clear()
        self.weight_changes.clear()
        self.last_weight_norm = None
        self.suspect_since, self.streak, self.streak_jump = None, [], None

    def judge(self, step: int, loss: float, grad_norm: float, weight_norm: float | None = None) -> Judgment:
        """Judge step `step` (module docstring); `weight_norm` is the norm of the weights it used."""
        change = self._weight_change(weight_norm)
        reason = self._bad_because(loss, grad_norm)
        if reason is None:
            self.history.append((loss, grad_norm))
            if change is not None:
                self.weight_changes.append(change)
            self.suspect_since, self.streak, self.streak_jump = None, [], None
            outlier = self._grad_norm_z(grad_norm)
            if outlier is None:
                return Judgment()
            return Judgment(grad_norm_outlier=True)
        if self.suspect_since is None:
            self.suspect_since, self.streak_jump = step, change
        self.streak.append((loss, grad_norm))
        note = (
            f"step {step}: skipped, {reason} (streak of {len(self.streak)} since step {self.suspect_since})"
        )
        if self._weights_jumped() or len(self.streak) >= self.patience:
            verdict, why = self._judge_streak()
            if verdict == "new level":
                message = self._accept_new_level(why)
                return Judgment(skip=True, verdict=verdict, why=why, message=f"{note}; {message}")
            return Judgment(skip=True, verdict=verdict, why=why, message=f"{note}; divergence: {why}")
        return Judgment(skip=True, message=note)

    def _weight_change(self, weight_norm: float | None) -> float | None:
        """Relative change of the weight norm since the previous step (what the last update did)."""
        if weight_norm is None or not math.isfinite(weight_norm):
            return None if weight_norm is None else math.inf
        previous, self.last_weight_norm = self.last_weight_norm, weight_norm
        if previous is None or previous <= 0:
            return None
        return abs(weight_norm / previous - 1)

    def _bad_because(self, loss: float, grad_norm: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"a non-finite loss or gradient (loss {loss:.4g}, gradient norm {grad_norm:.4g})"
        if self.threshold is None or len(self.history) < self.min_steps:
            return None
        losses = [entry[0] for entry in self.history]
        level = sum(losses[-LEVEL_STEPS:]) / len(losses[-LEVEL_STEPS:])
        noise = _mean_std([b - a for a, b in zip(losses, losses[1:])])[1] / math.sqrt(2)
        scale = max(noise, MIN_RELATIVE_SCALE * abs(level))
        z = (loss - level) / scale if scale > 0 else 0.0
        if z > self.threshold:
            return (
                f"a loss spike ({loss:.4g}, z-score {z:.1f}: the level of the last good steps is {level:.4g}, "
                f"their step-to-step noise {scale:.3g})"
            )
        return None

    def _grad_norm_z(self, grad_norm: float) -> float | None:
        """The gradient norm's z-score if it is an outlier (kept: clipping bounds it), else None."""
        if self.threshold is None or len(self.history) <= self.min_steps:
            return None
        mean, std = _mean_std([entry[1] for entry in list(self.history)[:-1]])
        z = (grad_norm - mean) / std if std > 1e-12 else 0.0
        return z if z > self.threshold else None

    def _weights_jumped(self) -> bool:
        jump = self.streak_jump
        if jump is None:
            return False
        largest = max(self.weight_changes, default=0.0)
        return jump > MIN_WEIGHT_JUMP and jump > WEIGHT_JUMP * largest

    def _judge_streak(self) -> tuple[str, str]:
        """("divergence" | "new level", why) for the current streak."""
        losses = [entry[0] for entry in self.streak]
        if not all(math.isfinite(loss) and math.isfinite(norm) for loss, norm in self.streak):
            return "divergence", f"{len(losses)} steps in a row with a non-finite loss or gradient"
        if self._weights_jumped():
            largest = max(self.weight_changes, default=0.0)
            return "divergence", (
                f"the update before step {self.suspect_since} changed the weight norm by {100 * (self.streak_jump or 0):.3g}%, "
                f"over {WEIGHT_JUMP:g}x the largest change of the last {len(self.weight_changes)} good steps "
                f"({100 * largest:.3g}%): the learning rate is too large for these weights"
            )
        mean = sum(losses) / len(losses)
        if mean >= self.uniform_loss:
            return "divergence", (
                f"the streak's mean loss {mean:.4g} is no better than guessing uniformly over the vocabulary "
                f"(ln V = {self.uniform_loss:.4g}): the weights are damaged or the data carries no signal"
            )
        third = max(len(losses) // 3, 1)
        first, last = _mean_std(losses[:third])[0], _mean_std(losses[-third:])[0]
        _, std = _mean_std(losses)
        if last > first + max(2 * std, MIN_RELATIVE_SCALE * abs(first)) and len(losses) >= 3:
            return "divergence", f"the loss kept rising through the streak ({first:.4g} -> {last:.4g})"
        return "new level", (
            f"a new loss level ({mean:.4g} over {len(losses)} steps): finite, not rising, better than "
            "chance, and the weights did not jump"
        )

    def _accept_new_level(self, why: str) -> str:
        self.history.clear()
        self.history.extend(self.streak)
        self.suspect_since, self.streak, self.streak_jump = None, [], None
        return f"accepted {why}; the guard's history restarts from these steps"

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "weight_changes": list(self.weight_changes),
            "last_weight_norm": self.last_weight_norm,
            "suspect_since": self.suspect_since,
            "streak": list(self.streak),
            "streak_jump": self.streak_jump,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restart()
        self.history.extend(tuple(entry) for entry in state.get("history", []))
        self.weight_changes.extend(state.get("weight_changes", []))
        self.last_weight_norm = state.get("last_weight_norm")
        self.suspect_since = state.get("suspect_since")
        self.streak = [(float(loss), float(norm)) for loss, norm in state.get("streak", [])]
        self.streak_jump = state.get("streak_jump")
