"""Learning-rate schedules as pure functions of the optimizer step.

Each schedule maps (step, total_steps) to an absolute learning rate, so resuming at any step
gives exactly the LR an uninterrupted run would use; nothing but the step is state. In YAML
recipes they are chosen Lightning-style:

    lr_schedule:
      class_path: pretrain.train.schedules.WarmupCosine
      init_args: {max_lr: 4.0e-4, min_lr: 4.0e-5, warmup_steps: 2000}

Warmup is linear from max_lr / warmup_steps at step 0 to max_lr at step warmup_steps - 1
(no step trains at LR 0). `total_steps` is the stage's number of optimizer steps.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


class LRSchedule(ABC):
    """An LR schedule: `schedule(step, total_steps) -> lr`."""

    def __init__(self, max_lr: float, warmup_steps: int = 0) -> None:
        if max_lr <= 0 or warmup_steps < 0:
            raise ValueError("max_lr must be positive and warmup_steps non-negative")
        self.max_lr = max_lr
        self.warmup_steps = warmup_steps

    def __call__(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        return self.after_warmup(step, total_steps)

    @abstractmethod
    def after_warmup(self, step: int, total_steps: int) -> float:
        """The LR at `step` >= warmup_steps."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def decay(progress: float, start: float, end: float, shape: str) -> float:
    """Interpolate from `start` (progress 0) to `end` (progress 1) with the given shape."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        fraction_left = 1.0 - progress
    elif shape == "cosine":
        fraction_left = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif shape == "1-sqrt":  # Hägele et al. 2024: the best cooldown shape for WSD
        fraction_left = 1.0 - math.sqrt(progress)
    else:
        raise ValueError(f"unknown decay shape {shape!r}; choose one of {', '.join(DECAY_SHAPES)}")
    return end + (start - end) * fraction_left


class Constant(LRSchedule):
    """Warmup, then max_lr forever."""

    def after_warmup(self, step: int, total_steps: int) -> float:
        return self.max_lr


class WarmupCosine(LRSchedule):
    """Linear warmup, then cosine from max_lr to min_lr at the last step (TinyLlama: 4e-4 -> 4e-5)."""

    def __init__(self, max_lr: float, min_lr: float = 0.0, warmup_steps: int = 0) -> None:
        super().__init__(max_lr, warmup_steps)
        self.min_lr = min_lr

    def after_warmup(self, step: int, total_steps: int) -> float:
        span = max(total_steps - 1 - self.warmup_steps, 1)
        return decay((step - self.warmup_steps) / span, self.max_lr, self.min_lr, "cosine")


class WarmupLinear(LRSchedule):
    """Linear warmup, then linear decay from max_lr to min_lr at the last step."""

    def __init__(self, max_lr: float, min_lr: float = 0.0, warmup_steps: int = 0) -> None:
        super().__init__(max_lr, warmup_steps)
        self.min_lr = min_lr

    def after_warmup(self, step: int, total_steps: int) -> float:
        span = max(total_steps - 1 - self.warmup_steps, 1)
        return decay((step - self.warmup_steps) / span, self.max_lr, self.min_lr, "linear")


class WarmupStableDecay(LRSchedule):
    """Warmup, constant max_lr, then a cooldown to min_lr over the last `decay_fraction` of steps
    (or the last `decay_steps` steps when given: for a decay branched off a constant phase).

    MiniCPM (Hu et al. 2024) and Hägele et al. 2024: a 10-20% cooldown, 1-sqrt shape best.
    """

    def __init__(
        self,
        max_lr: float,
        min_lr: float = 0.0,
        warmup_steps: int = 0,
        decay_fraction: float = 0.2,
        decay_shape: str = "1-sqrt",
        decay_steps: int | None = None,
    ) -> None:
        super().__init__(max_lr, warmup_steps)
        if not 0.0 <= decay_fraction <= 1.0 or decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_fraction must be in [0, 1] and decay_shape one of {DECAY_SHAPES}")
        self.min_lr, self.decay_fraction, self.decay_shape = min_lr, decay_fraction, decay_shape
        self.decay_steps = decay_steps

    def after_warmup(self, step: int, total_steps: int) -> float:
        decay_steps = (
            self.decay_steps if self.decay_steps is not None else round(self.decay_fraction * total_steps)
        )
        decay_start = total_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return self.max_lr
        return decay((step - decay_start + 1) / decay_steps, self.max_lr, self.min_lr, self.decay_shape)


class Infinite(LRSchedule):
    """The "infinite" schedule of Ibrahim et al. 2024 (arXiv 2403.08763).

    Warmup to max_lr, cosine cooldown to constant_lr over `cooldown_steps`, constant_lr for as
    long as training goes on (across datasets, no re-warming), then, only when `anneal_steps`
    > 0, a final anneal from constant_lr to min_lr over the last `anneal_steps` steps (the
    shape is configurable; Ibrahim et al. anneal quickly, here linear by default).
    """

    def __init__(
        self,
        max_lr: float,
        constant_lr: float,
        warmup_steps: int = 0,
        cooldown_steps: int = 0,
        anneal_steps: int = 0,
        min_lr: float = 0.0,
        anneal_shape: str = "linear",
    ) -> None:
        super().__init__(max_lr, warmup_steps)
        if anneal_shape not in DECAY_SHAPES:
            raise ValueError(f"anneal_shape must be one of {DECAY_SHAPES}")
        self.constant_lr, self.cooldown_steps = constant_lr, cooldown_steps
        self.anneal_steps, self.min_lr, self.anneal_shape = anneal_steps, min_lr, anneal_shape

    def after_warmup(self, step: int, total_steps: int) -> float:
        anneal_start = total_steps - self.anneal_steps
        if self.anneal_steps > 0 and step >= anneal_start:
            progress = (step - anneal_start + 1) / self.anneal_steps
            return decay(progress, self.constant_lr, self.min_lr, self.anneal_shape)
        since_warmup = step - self.warmup_steps
        if since_warmup < self.cooldown_steps:
            return decay((since_warmup + 1) / self.cooldown_steps, self.max_lr, self.constant_lr, "cosine")
        return self.constant_lr


class MultiStep(LRSchedule):
    """DeepSeek LLM's multi-step schedule (arXiv 2401.02954): warmup, then max_lr times a
    piecewise-constant factor that drops at fractions of the stage.

    From step boundaries[i] * total_steps (rounded to the nearest step, halves up) on, the LR is
    factors[i] * max_lr. The default is DeepSeek's: the peak until 80% of the steps, 31.6% of it
    until 90%, then 10%. Unlike a cosine, the LR before the first drop is the peak whatever the
    stage's length, so when the token budget grows, a checkpoint of the first phase continues
    (`branch_from`, larger max_tokens) exactly as if the larger budget had been planned.
    """

    def __init__(
        self,
        max_lr: float,
        warmup_steps: int = 0,
        boundaries: tuple[float, ...] = (0.8, 0.9),
        factors: tuple[float, ...] = (0.316, 0.1),
    ) -> None:
        super().__init__(max_lr, warmup_steps)
        boundaries, factors = tuple(boundaries), tuple(factors)
        increasing = all(a < b for a, b in zip(boundaries, boundaries[1:]))
        if len(boundaries) != len(factors) or not increasing or not all(0 < b <= 1 for b in boundaries):
            raise ValueError("boundaries must increase within (0, 1], one factor per boundary")
        if any(f <= 0 for f in factors):
            raise ValueError("factors must be positive")
        self.boundaries, self.factors = boundaries, factors

    def after_warmup(self, step: int, total_steps: int) -> float:
        factor = 1.0
        for boundary, boundary_factor in zip(self.boundaries, self.factors):
            if step >= math.floor(boundary * total_steps + 0.5):
                factor = boundary_factor
        return self.max_lr * factor
