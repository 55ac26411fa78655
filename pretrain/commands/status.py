"""Report on a run directory: its latest SLURM job's state (squeue, else sacct), the last logged
step and tokens seen, the newest checkpoint, the requeue count and an ETA from the logged throughput;
for a run with anneal probes, the newest probe and the forecast with its band (docs/anneal-probes.md).
"""

from __future__ import annotations

import argparse

HELP = "state of a run: SLURM job, step, tokens, last checkpoint, requeues, ETA"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")


def run(args: argparse.Namespace) -> int:
    from pretrain.slurm.status import status

    print(status(args.run_dir))
    return 0
