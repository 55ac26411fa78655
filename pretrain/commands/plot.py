"""Plot training loss (raw and smoothed), validation loss per source, the learning rate and, where
logged, downstream benchmark scores (one panel per task) of one or more runs against tokens seen,
from RUN_DIR/logs/version_<k>/metrics.csv; print each run's latest values. A run's anneal probes
(RUN_DIR/anneal/, docs/anneal-probes.md) are drawn with their forecast and its band. `--time
TIME.png` also draws where each launch's wall time went (RUN_DIR/goodput/, one stacked bar per launch).
"""

from __future__ import annotations

import argparse

HELP = "plot loss curves and downstream scores of runs from their CSV logs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directory (holds logs/version_<k>/)"
    )
    parser.add_argument("-o", "--out", default="loss.png", help="PNG file to write (default: %(default)s)")
    parser.add_argument(
        "--smoothing",
        type=float,
        default=None,
        help="EMA weight for the training loss, in [0, 1); 0 plots it unsmoothed (default: averaging over "
        "about a twentieth of the run's points, none up to 20)",
    )
    parser.add_argument(
        "--time",
        metavar="TIME.png",
        default=None,
        help="also write a stacked bar per launch of where its wall time went (start-up, useful and lost "
        "steps, checkpoint, validation, downstream, teardown)",
    )


def run(args: argparse.Namespace) -> int:
    from pretrain.anneal.report import anneal_view
    from pretrain.plot import plot_runs, plot_time, summarize
    from pretrain.run_dir import RunDir

    runs = [RunDir(run_dir).read_logs() for run_dir in args.run_dirs]
    plot_runs(runs, args.out, args.smoothing, [anneal_view(run_dir) for run_dir in args.run_dirs])
    print(f"wrote {args.out}")
    if args.time:
        plot_time(args.run_dirs, args.time)
        print(f"wrote {args.time}")
    for run_log in runs:
        print(summarize(run_log))
    return 0
