"""Render an sbatch script for a recipe into RUN_DIR/slurm/train.sbatch and submit it with sbatch
(`pretrain.slurm.job`). Options not given come from the recipe's `slurm:` section. Arguments after
`--` are passed to `pretrain fit`.
"""

from __future__ import annotations

import argparse
import dataclasses

from docstring_parser import parse

from pretrain.recipe import SlurmSettings

HELP = "render an sbatch script for a recipe and submit it (auto-requeue before the time limit)"
FIELD_HELP = {
    p.arg_name: " ".join((p.description or "").split()) for p in parse(SlurmSettings.__doc__ or "").params
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="the recipe to train: a YAML file, or a shipped recipe's name (e.g. tiny)",
    )
    for field in dataclasses.fields(SlurmSettings):  # --nodes, --time, ...: the recipe's slurm: section
        kind = int if str(field.type).startswith("int") else str
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, help=FIELD_HELP[field.name])
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    parser.add_argument(
        "overrides", nargs="*", metavar="-- FIT_OVERRIDES", help="extra `pretrain fit` arguments"
    )


def run(args: argparse.Namespace) -> int:
    from pretrain.recipe import recipe_path
    from pretrain.slurm.job import render, resolve_job, submit

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
