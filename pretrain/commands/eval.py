"""Downstream benchmarks with lm-evaluation-harness (`pip install 'pretrain[eval]'`).

    pretrain eval CHECKPOINT --tasks tinyllama-commonsense [-o results.json]
    pretrain eval RUN_DIR --tasks pystdlib_next_line --every 1000
    pretrain eval --download tinyllama-commonsense      (on a machine with internet)

CHECKPOINT is any form pretrain reads (training .ckpt, FSDP2 shard folder, model file, Hugging
Face directory). Tasks are lm-eval names, the suite tinyllama-commonsense (TinyLlama's seven
zero-shot tasks: hellaswag, openbookqa, winogrande, arc_challenge, arc_easy, boolq, piqa) or the
embedded pystdlib_next_line (no download). Given a RUN_DIR, every checkpoint not yet scored is
evaluated; scores are kept in RUN_DIR/eval/ and the table against tokens seen is printed.

Offline compute nodes read the Hugging Face datasets cache (HF_HOME): fill it with --download
where there is internet; a task whose data is missing fails at once, naming the task.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pretrain.errors import UserError

HELP = "downstream benchmarks (lm-evaluation-harness) of a checkpoint or of a run's checkpoints"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", nargs="?", metavar="CKPT_OR_RUN_DIR", help="a checkpoint, HF directory or run"
    )
    parser.add_argument("--tasks", action="append", help="comma-separated tasks or suites (repeatable)")
    parser.add_argument("--download", metavar="TASKS", help="only fill the datasets cache for these tasks")
    parser.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAML files")
    parser.add_argument(
        "--num-fewshot", type=int, help="few-shot examples (default: each task's own, else 0)"
    )
    parser.add_argument("--limit", type=float, help="at most this many examples per task (a fraction if < 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="default: bf16 on a GPU that has it",
    )
    parser.add_argument("--ema", action="store_true", help="evaluate a training checkpoint's EMA weights")
    parser.add_argument("--every", type=int, help="RUN_DIR: only checkpoints at multiples of this many steps")
    parser.add_argument(
        "-o", "--output", type=Path, help="write lm-eval's results JSON here (and a .md table)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("pretrain eval needs lm-evaluation-harness: pip install 'pretrain[eval]'") from None
    from pretrain.eval.harness import load_tasks, parse_tasks

    if args.download:
        names = parse_tasks(args.download)
        load_tasks(names, args.include_path)
        print(f"cached the datasets of {len(names)} task(s): {', '.join(names)}")
        return 0
    if args.target is None or not args.tasks:
        raise UserError("give CKPT_OR_RUN_DIR and --tasks (or --download TASKS)")
    for name in ("batch_size", "every", "num_fewshot"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_fewshot" else 1):
            raise UserError(
                f"--{name.replace('_', '-')} must be {'>= 0' if name == 'num_fewshot' else '>= 1'}"
            )
    if args.limit is not None and args.limit <= 0:
        raise UserError("--limit must be positive (a count, or a fraction below 1)")
    if args.output is not None and args.output.suffix == ".md":
        raise UserError(f"-o {args.output}: give the .json path; the table is written beside it as .md")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    target = Path(args.target)
    if not target.exists():
        raise UserError(
            f"{target} does not exist: give a checkpoint, a Hugging Face directory or a run directory"
        )
    names = parse_tasks(args.tasks)
    tasks = load_tasks(
        names, args.include_path
    )  # before any weights are read: a missing dataset fails at once

    def make_lm(path: Path) -> Any:
        from pretrain.eval.backend import PretrainLM

        return PretrainLM(str(path), args.ema, args.device, args.dtype, args.batch_size)

    if (target / "checkpoints").is_dir():
        from pretrain.eval.runs import evaluate_run
        from pretrain.run_dir import RunDir

        table, records = evaluate_run(
            make_lm, RunDir(target), tasks, args.num_fewshot, limit, args.every, log=_stderr
        )
        print(table, end="")
        if args.output:
            _write(args.output, {"checkpoints": records}, table)
        return 0
    from pretrain.eval.runs import evaluate_checkpoint, table_for

    results = evaluate_checkpoint(make_lm, target, tasks, args.num_fewshot, limit)
    table = table_for(target.name, results, names)
    print(table, end="")
    if args.output:
        _write(args.output, results, table)
    return 0


def _write(path: Path, results: dict[str, Any], table: str) -> None:
    from lm_eval.utils import handle_non_serializable

    from pretrain.errors import writing
    from pretrain.files import write_atomic

    with writing(path, "--output"):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(results, indent=2, default=handle_non_serializable) + "\n").encode())
        write_atomic(path.with_suffix(".md"), table.encode())
    _stderr(f"wrote {path} and {path.with_suffix('.md')}")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
