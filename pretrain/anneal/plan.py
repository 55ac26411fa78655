"""Which anneal probes `pretrain anneal` runs, and the recipe each one trains with.

A probe of the parent's checkpoint at step N is the parent's latest resolved recipe
(`RunDir.latest_config`) with: its own run_dir (`RUN_DIR/anneal/step-N/`), `branch_from` the
pinned checkpoint (optimizer, step and data position carry over), and the parent's own schedule
class ended by a decay of D steps right after N: `WarmupStableDecay(decay_steps=D)` or
`Infinite(anneal_steps=D)` over N + D steps. Both give every step before N exactly the parent's LR
(checked step by step, `check_constant_phase`) and go from the constant LR to the schedule's
`min_lr` over [N, N + D) with the chosen shape. A schedule without a constant phase (a cosine) has
nothing to branch a decay from: it is refused.

D is `fraction` of the N steps done (Hägele et al. 2024: 10-20%), or `tokens` / global batch
tokens; at least one step.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.anneal.result import ProbeResult, probe_dir
from pretrain.errors import UserError
from pretrain.run_dir import RunDir
from pretrain.train.schedules import DECAY_SHAPES, Infinite, LRSchedule, WarmupStableDecay

AUTOMATIC_PROBES = "pretrain.train.callbacks.anneal_probes.AnnealProbes"


@dataclass(frozen=True)
class Probe:
    """One decay branch: from the parent's checkpoint at `step`, `decay_steps` more steps."""

    step: int
    checkpoint: Path  # the parent's published checkpoint
    checkpoint_id: str  # its identity when planned (`pretrain.model.checkpoint.checkpoint_identity`)
    decay_steps: int
    tokens_per_step: int

    @property
    def parent_tokens(self) -> int:
        return self.step * self.tokens_per_step

    @property
    def anneal_tokens(self) -> int:
        return self.decay_steps * self.tokens_per_step


@dataclass(frozen=True)
class Settings:
    """The command line's choice of probes and decay."""

    every: int | None = None
    steps: tuple[int, ...] = ()
    fraction: float = 0.2
    tokens: int | None = None
    shape: str | None = None


def check_settings(settings: Settings) -> None:
    """Refuse numbers outside their range, in one line naming the option."""
    if not 0.0 < settings.fraction <= 1.0:
        raise UserError(f"--fraction {settings.fraction}: must be in (0, 1], e.g. 0.2 (a 20% decay)")
    if settings.tokens is not None and settings.tokens <= 0:
        raise UserError(f"--tokens {settings.tokens}: must be a positive number of tokens")
    if settings.every is not None and settings.every <= 0:
        raise UserError(f"--every {settings.every}: must be a positive number of steps")
    if any(step <= 0 for step in settings.steps):
        raise UserError(f"--steps {','.join(map(str, settings.steps))}: steps must be positive")
    if settings.shape is not None and settings.shape not in DECAY_SHAPES:
        raise UserError(f"--shape {settings.shape}: choose one of {', '.join(DECAY_SHAPES)}")


def parent_config(run: RunDir) -> dict[str, Any]:
    """The parent's latest resolved recipe; refused in one line when there is none."""
    if not run.path.is_dir():
        raise UserError(f"{run.path}: no such run directory")
    config = run.latest_config()
    if not config:
        raise UserError(
            f"{run.path}: no logs/version_<k>/config.yaml (is this a run directory of `pretrain fit`?)"
        )
    return config


def schedule_of(config: dict[str, Any], run: RunDir) -> LRSchedule:
    """The parent's LR schedule, built from its recipe; refused unless it has a constant phase."""
    spec = (config.get("model") or {}).get("lr_schedule")
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise UserError(f"{run.path}: its recipe has no model.lr_schedule to branch a decay from")
    module_name, _, class_name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        schedule = cls(**(spec.get("init_args") or {}))
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        raise UserError(
            f"{run.path}: cannot build its model.lr_schedule {spec['class_path']}: {err}"
        ) from None
    if not isinstance(schedule, WarmupStableDecay | Infinite):
        raise UserError(
            f"{run.path}: its LR schedule {class_name} has no constant phase to branch a decay from; "
            "anneal probes need pretrain.train.schedules.WarmupStableDecay or Infinite "
            "(e.g. configs/continual/wsd-decay-branch.yaml)"
        )
    return schedule


def default_shape(schedule: LRSchedule) -> str:
    """The decay shape of the parent's schedule: its configured decay, else 1-sqrt."""
    if isinstance(schedule, WarmupStableDecay):
        return schedule.decay_shape
    if isinstance(schedule, Infinite) and schedule.anneal_steps > 0:
        return schedule.anneal_shape
    return "1-sqrt"


def branch_schedule(
    spec: dict[str, Any], schedule: LRSchedule, decay_steps: int, shape: str
) -> dict[str, Any]:
    """The parent's `model.lr_schedule` with its decay moved to the last `decay_steps` steps."""
    init_args = dict(spec.get("init_args") or {})
    if isinstance(schedule, WarmupStableDecay):
        init_args.update(decay_steps=decay_steps, decay_shape=shape)
    else:
        init_args.update(anneal_steps=decay_steps, anneal_shape=shape)
    return {"class_path": spec["class_path"], "init_args": init_args}


def build(spec: dict[str, Any]) -> LRSchedule:
    module_name, _, class_name = spec["class_path"].rpartition(".")
    schedule: LRSchedule = getattr(importlib.import_module(module_name), class_name)(**spec["init_args"])
    return schedule


def constant_phase_start(schedule: LRSchedule) -> int:
    """The first step of the constant phase."""
    if isinstance(schedule, Infinite):
        return schedule.warmup_steps + schedule.cooldown_steps
    return schedule.warmup_steps


def in_constant_phase(
    parent: LRSchedule, parent_steps: int, branch: LRSchedule, step: int, decay_steps: int
) -> bool:
    """Whether a branch at `step` sees exactly the parent's LR at every step before it."""
    if step < constant_phase_start(parent):
        return False
    total = step + decay_steps
    return all(parent(s, parent_steps) == branch(s, total) for s in range(step))


def decay_steps(step: int, settings: Settings, tokens_per_step: int) -> int:
    """The decay's length in steps: `tokens` of it, or `fraction` of the steps done; at least 1."""
    if settings.tokens is not None:
        return max(1, round(settings.tokens / tokens_per_step))
    return max(1, round(settings.fraction * step))


def probe_config(
    config: dict[str, Any], run_dir: Path, probe: Probe, branch: dict[str, Any], pinned: Path
) -> dict[str, Any]:
    """The recipe of the probe: the parent's, with the overrides of the module docstring."""
    out = copy.deepcopy(config)
    out.update(
        run_dir=str(probe_dir(run_dir, probe.step)),
        branch_from=str(pinned),
        resume="auto",
        max_tokens=None,
        validate_every_steps=probe.decay_steps,
    )
    trainer = out.setdefault("trainer", {})
    trainer["max_steps"] = probe.step + probe.decay_steps
    callbacks = trainer.get("callbacks")
    if isinstance(callbacks, list):  # a probe launches no probes of its own
        trainer["callbacks"] = [c for c in callbacks if not _is_automatic_probes(c)] or None
    elif _is_automatic_probes(callbacks):
        trainer["callbacks"] = None
    out.setdefault("model", {})["lr_schedule"] = branch
    slurm = out.get("slurm")
    if isinstance(slurm, dict):  # the parent's job name would hide which job is which probe
        slurm["job_name"] = f"anneal-{Path(run_dir).resolve().name}-step-{probe.step}"
    return out


def _is_automatic_probes(callback: Any) -> bool:
    return isinstance(callback, dict) and callback.get("class_path") == AUTOMATIC_PROBES


def tokens_per_step(config: dict[str, Any], run: RunDir) -> int:
    value = (config.get("data") or {}).get("global_batch_tokens")
    if not isinstance(value, int) or value <= 0:
        raise UserError(f"{run.path}: its recipe has no positive data.global_batch_tokens")
    return value


def parent_steps(config: dict[str, Any], run: RunDir) -> int:
    value = (config.get("trainer") or {}).get("max_steps")
    if not isinstance(value, int) or value <= 0:
        raise UserError(f"{run.path}: its resolved recipe has no positive trainer.max_steps")
    return value


def is_done(result: ProbeResult | None, probe: Probe) -> bool:
    """Whether a probe's record is of this very checkpoint (not of one rewritten since)."""
    return result is not None and result.checkpoint_id == probe.checkpoint_id


@dataclass(frozen=True)
class Plan:
    """What `pretrain anneal` will do: the probes to run (new or resumed) and those already done."""

    run: RunDir
    config: dict[str, Any]
    schedule: LRSchedule
    shape: str
    probes: list[Probe]
    done: list[ProbeResult]
    tokens_per_sec: float | None

    def branch(self, probe: Probe) -> dict[str, Any]:
        """The probe's `model.lr_schedule`."""
        return branch_schedule(
            self.config["model"]["lr_schedule"], self.schedule, probe.decay_steps, self.shape
        )

    def describe(self) -> str:
        """The plan, printed before anything runs."""
        min_lr = getattr(self.schedule, "min_lr", 0.0)
        lines = [f"anneal probes of {self.run.path}: {self.shape} decay to min_lr {min_lr:g}"]
        for result in self.done:
            lines.append(f"  step-{result.step}: done (val loss {result.val_loss:.4f}), skipped")
        for probe in self.probes:
            state = "resumes" if (probe_dir(self.run.path, probe.step) / "checkpoints").is_dir() else "new"
            lines.append(
                f"  step-{probe.step}: {probe.parent_tokens:,} tokens so far, decay {probe.decay_steps} steps "
                f"({probe.anneal_tokens:,} tokens), {state}"
            )
        total = sum(p.anneal_tokens for p in self.probes)
        time = (
            f"about {_duration(total / self.tokens_per_sec)} at the run's {self.tokens_per_sec:,.0f} tokens/s"
            if self.tokens_per_sec
            else "time unknown (the run logged no tokens/s)"
        )
        lines.append(f"  total: {len(self.probes)} probe(s) to run, {total:,} tokens, {time}")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def measured_tokens_per_sec(run: RunDir) -> float | None:
    """The median tokens/s the parent logged, None if it logged none."""
    import numpy as np

    from pretrain.run_dir import TOKENS_PER_SEC

    try:
        series = run.read_logs().series.get(TOKENS_PER_SEC)
    except UserError:
        return None
    return float(np.median(series.values)) if series is not None and len(series.values) else None


def make_plan(run_dir: str | Path, settings: Settings) -> Plan:
    """The probes `settings` asks for: done ones skipped, unfinished ones resumed (module docstring)."""
    from pretrain.anneal.probe import existing_probe

    check_settings(settings)
    run = RunDir(run_dir)
    config = parent_config(run)
    schedule = schedule_of(config, run)
    shape = settings.shape or default_shape(schedule)
    per_step, total = tokens_per_step(config, run), parent_steps(config, run)
    published = dict(run.list_checkpoints())
    started = {step: existing_probe(run.path, step) for step in _started_steps(run.path)}
    steps = _chosen_steps(run, settings, published, started)
    probes, done = [], []
    for step in steps:
        result, pinned = started.get(step, (None, None))
        source = published.get(step, pinned)
        if source is None:
            raise UserError(_missing_message(run, step, published))
        probe = Probe(step, source, _identity(source), decay_steps(step, settings, per_step), per_step)
        if result is not None and (step not in published or is_done(result, probe)):
            done.append(result)
            continue
        spec = branch_schedule(config["model"]["lr_schedule"], schedule, probe.decay_steps, shape)
        if not in_constant_phase(schedule, total, build(spec), step, probe.decay_steps):
            if settings.steps:
                raise UserError(
                    f"step {step} of {run.path} is not in its constant-LR phase (warmup, or the decay has begun): "
                    "probe a checkpoint of the constant phase"
                )
            print(f"anneal: left out step-{step}: not in the constant-LR phase", flush=True)
            continue
        probes.append(probe)
    return Plan(run, config, schedule, shape, probes, done, measured_tokens_per_sec(run))


def _identity(path: Path) -> str:
    from pretrain.model.checkpoint import checkpoint_identity

    return checkpoint_identity(path)


def _started_steps(run_dir: Path) -> list[int]:
    """Steps with a probe folder under RUN_DIR/anneal/."""
    from pretrain.anneal.result import ANNEAL_DIR

    found = []
    for path in (run_dir / ANNEAL_DIR).glob("step-*"):
        number = path.name.removeprefix("step-")
        if path.is_dir() and number.isdigit():
            found.append(int(number))
    return sorted(found)


def _chosen_steps(
    run: RunDir, settings: Settings, published: dict[int, Path], started: dict[int, tuple[Any, Any]]
) -> list[int]:
    if settings.steps:
        return sorted(set(settings.steps))
    if not published and not started:
        raise UserError(
            f"{run.checkpoints}: no published checkpoint to probe yet; let the run save one "
            "(checkpoint.every_n_steps) and run `pretrain anneal` again"
        )
    every = settings.every
    known = set(published) | {step for step, (_, pinned) in started.items() if pinned is not None}
    return sorted(step for step in known if step > 0 and (every is None or step % every == 0))


def _missing_message(run: RunDir, step: int, published: dict[int, Path]) -> str:
    have = ", ".join(f"step-{s}" for s in published) or "none"
    return (
        f"checkpoint step-{step} is not among {run.checkpoints}'s published checkpoints ({have}): pruned by the "
        "parent's retention or never written; probe a published one, or keep future ones with "
        "checkpoint.pin_every_n_steps"
    )
