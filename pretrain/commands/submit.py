"""Render an sbatch script for a recipe into RUN_DIR/slurm/train.sbatch and submit it with sbatch
(`pretrain.slurm.job`). Options not given come from the recipe's `slurm:` section. Arguments after
`--` are passed to `pretrain fit`.

    pretrain submit --config RECIPE [--nodes N] [--gpus-per-node G] [--time HH:MM:SS] ...
                    [--dry-run] [-- extra `pretrain fit` overrides]
"""

from __future__ import annotations

import argparse
import dataclasses

HELP = "render an sbatch script for a recipe and submit it (auto-requeue before the time limit)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="the recipe to train: a YAML file, or a shipped recipe's name (e.g. tiny)",
    )
    parser.add_argument("--nodes", type=int, help="number of nodes (default: trainer.num_nodes)")
    parser.add_argument(
        "--gpus-per-node", type=int, help="GPUs (= tasks) per node; 0 for CPU (default: trainer.devices)"
    )
    parser.add_argument(
        "--cpus-per-task", type=int, help="CPU cores per task (default: data.num_workers + 1)"
    )
    parser.add_argument("--time", help="time limit, e.g. 48:00:00 (default: the partition's)")
    parser.add_argument("--partition", help="partition to submit to")
    parser.add_argument("--account", help="account to charge")
    parser.add_argument("--qos", help="quality of service")
    parser.add_argument("--constraint", help="required node features")
    parser.add_argument(
        "--signal-margin",
        type=int,
        help="send SIGUSR1 (checkpoint + requeue) this many seconds before the time limit (default: 300)",
    )
    parser.add_argument(
        "--max-requeues", type=int, help="requeue the job at most this many times (default: no limit)"
    )
    parser.add_argument(
        "--env-setup", help="shell lines run before srun (default: activate the current virtual environment)"
    )
    parser.add_argument("--job-name", help="job name (default: pretrain-<run dir name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    parser.add_argument(
        "overrides", nargs="*", metavar="-- FIT_OVERRIDES", help="extra `pretrain fit` arguments"
    )


def run(args: argparse.Namespace) -> int:
    from pretrain.slurm.job import render, resolve_job, submit
    from pretrain.train.recipes import recipe_path
    from pretrain.train.slurm_settings import SlurmSettings

    overrides = list(args.overrides)
    if overrides[:1] == ["--"]:
        overrides = overrides[1:]
    cli = {f.name: getattr(args, f.name) for f in dataclasses.fields(SlurmSettings)}
    job = resolve_job(recipe_path(args.config), cli, overrides)
    if args.dry_run:
        print(render(job), end="")
        return 0
    job_id = submit(job)
    out = job.log_dir / f"{job.job_name}-{job_id}"
    print(f"submitted job {job_id}")
    print(f"  script: {job.script_path}")
    print(f"  stdout: {out}.out")
    print(f"  stderr: {out}.err")
    print(f"  status: pretrain status {job.run_dir}")
    return 0
