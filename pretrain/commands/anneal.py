"""Anneal probes: what the run would score if its LR were decayed now (docs/anneal-probes.md).

    pretrain anneal RUN_DIR [--every K | --steps A,B,...] [--fraction F | --tokens T] [--shape S]
                    [--tasks T1,T2 [--limit N]] [--dry-run] [--submit [--nodes N] [--gpus G]]
                    [--target LOSS] [--forecast]

For checkpoints of the run's constant-LR phase (a WarmupStableDecay or Infinite schedule), runs
a decay branch from the checkpoint with its optimizer state (`branch_from`): the shape of the
run's decay (1-sqrt by default) from the constant LR to the schedule's min_lr, over F of the
steps done so far (or T tokens). Each probe is a run of its own under RUN_DIR/anneal/step-N/
and records its final validation loss per source (and downstream scores with --tasks) in
probe.json. The parent may keep training meanwhile: a probe reads only published checkpoints
(pinned by a hard link), never takes the parent's lease, and writes only under RUN_DIR/anneal/.
Running the command again skips the probes that are done and resumes the unfinished ones. The
plan (probes, tokens, time at the run's tokens/s) is printed first; --dry-run stops there.

When the probes are done, RUN_DIR/anneal/table.md lists them and the forecast is printed: the
power law L(D) = E + A * D^-alpha fitted to (tokens, annealed loss), with its 90% band, at the
run's planned end and, with --target LOSS, the tokens needed to reach LOSS. --forecast only
prints the forecast of the probes already done and runs nothing.

--submit: one SLURM job per probe (`pretrain submit`'s rendering, the recipe's geometry unless
--nodes/--gpus), requeued like a training job; run `pretrain anneal RUN_DIR` again once the jobs
have ended to write their records.
"""

from __future__ import annotations

import argparse
import sys

from pretrain.errors import UserError

HELP = "anneal probes: decay branches of a constant-LR run's checkpoints, and their validation loss"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the parent run directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--every", type=int, metavar="K", help="probe the checkpoints at multiples of K steps")
    which.add_argument("--steps", type=_steps, metavar="A,B", help="probe the checkpoints of these steps")
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--fraction", type=float, default=0.2, metavar="F", help="decay over F of the steps so far, in (0, 1]"
    )
    length.add_argument("--tokens", type=int, metavar="T", help="decay over T tokens")
    parser.add_argument("--shape", help="decay shape: linear, cosine or 1-sqrt (default: the run's)")
    parser.add_argument("--tasks", help="lm-eval tasks to score each annealed model on, comma-separated")
    parser.add_argument("--limit", type=int, metavar="N", help="--tasks: at most N examples per task")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan (and the job scripts); run nothing"
    )
    parser.add_argument(
        "--submit", action="store_true", help="one SLURM job per probe instead of running here"
    )
    parser.add_argument(
        "--target", type=float, metavar="LOSS", help="forecast the tokens needed to reach this annealed loss"
    )
    parser.add_argument(
        "--forecast", action="store_true", help="print the forecast of the probes done so far; run nothing"
    )
    parser.add_argument("--nodes", type=int, help="--submit: nodes per probe job (default: the recipe's)")
    parser.add_argument("--gpus", type=int, help="--submit: GPUs per node (default: the recipe's)")


def _steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give step numbers separated by commas, e.g. 1000,2000"
        ) from None


def run(args: argparse.Namespace) -> int:
    from pretrain.anneal.plan import Settings, make_plan
    from pretrain.anneal.report import forecast_lines, write_table

    if args.forecast:
        write_table(args.run_dir, args.target)
        print("\n".join(forecast_lines(args.run_dir, args.target)))
        return 0
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit}: must be a positive number of examples")
    if (args.nodes is not None or args.gpus is not None) and not args.submit:
        raise UserError("--nodes and --gpus go with --submit")
    settings = Settings(args.every, args.steps or (), args.fraction, args.tokens, args.shape)
    plan = make_plan(args.run_dir, settings)
    print(plan.describe(), flush=True)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.submit:
        from pretrain.anneal.submit import submit_probes

        return submit_probes(plan, args.nodes, args.gpus, args.dry_run)
    if args.dry_run:
        return 0
    from pretrain.anneal.probe import run_probe
    from pretrain.commands.fit import main as fit

    for probe in plan.probes:
        code = run_probe(plan, probe, fit, tasks, args.limit)
        if code != 0:
            print(f"pretrain anneal: probe step-{probe.step} did not finish (exit {code})", file=sys.stderr)
            return code
    write_table(args.run_dir, args.target)
    print("\n".join(forecast_lines(args.run_dir, args.target)))
    return 0
