"""`pretrain status`: where a run stands (`pretrain.run_dir.RunDir.summary`), its SLURM job's state and
where its launches' time went (`pretrain.run_dir.goodput`)."""

from __future__ import annotations

import os
import shutil
import subprocess

from pretrain.anneal.report import status_lines as anneal_lines
from pretrain.plot import format_tokens
from pretrain.run_dir import RunDir, describe_incidents
from pretrain.run_dir.goodput import describe as describe_goodput


def _first_line(command: list[str]) -> str:
    """The first line a SLURM client command prints, "" if it is missing or fails."""
    if shutil.which(command[0]) is None:
        return ""
    result = subprocess.run(command, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines() if result.returncode == 0 else []
    return lines[0] if lines else ""


def job_state(job_id: str) -> str:
    """The job's state from squeue (pending, running, recently ended) or else sacct (which fails
    without accounting storage)."""
    if line := _first_line(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r|%M|%l"]):
        state, reason, elapsed, limit = line.split("|")
        detail = f"reason {reason}" if state == "PENDING" else f"elapsed {elapsed}, limit {limit}"
        return f"{state} ({detail})"
    if line := _first_line(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode,Elapsed"]):
        state, exit_code, elapsed = line.split("|")
        return f"{state} (exit code {exit_code}, elapsed {elapsed})"
    return "unknown (not in squeue, and sacct has no record)"


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{days}d " if days else "") + f"{hours}h {minutes:02d}m"


def status(run_dir: str | os.PathLike) -> str:
    """A few lines on a run: job state, progress, last checkpoint, requeues, throughput and ETA."""
    run = RunDir(run_dir)
    summary = run.summary()
    lines = [f"run         {run.path}"]
    job_id = run.latest_job_id()
    lines.append(f"job         {f'{job_id}: {job_state(job_id)}' if job_id else 'none recorded'}")

    steps_done, max_steps, batch_tokens = summary.steps_done, summary.max_steps, summary.global_batch_tokens
    if summary.last_loss is not None:
        of = f" of {max_steps:,} ({100 * steps_done / max_steps:.1f}%)" if max_steps else ""
        tokens = f", {format_tokens(steps_done * batch_tokens)} tokens seen" if batch_tokens else ""
        lines.append(f"progress    step {steps_done:,}{of}{tokens}, loss {summary.last_loss:.4f}")
    else:
        lines.append("progress    no training step logged yet")
    lines.append(f"checkpoint  {summary.latest_checkpoint or 'none yet'}")

    if record := summary.requeue:
        limit = record.get("max_requeues")
        text = f"{record.get('requeues', 0)} (max {limit if limit is not None else 'unlimited'})"
        if events := record.get("events"):
            last = events[-1]
            text += (
                f"; last signal: {last['signal']} at step {last['step']}, checkpoint saved, {last['action']}"
            )
        lines.append(f"requeues    {text}")
    if summary.requeue_problem:
        lines.append(
            f"            {run.requeue_file}: {summary.requeue_problem} (it is kept aside at the next signal)"
        )

    if summary.skipped_steps or summary.incidents:
        lines.append(f"divergence  {describe_incidents(summary.skipped_steps, summary.incidents)}")

    if (rate := summary.tokens_per_sec) is not None:
        text = f"{rate:,.0f} tokens/s"
        if max_steps and steps_done >= max_steps:
            text += ", training finished"
        elif max_steps and batch_tokens and rate > 0:
            eta = (max_steps - steps_done) * batch_tokens / rate
            text += f", ETA {_duration(eta)} of training at this rate (queue time not included)"
        lines.append(f"throughput  {text}")
    if summary.goodput is not None and (summary.goodput.launches or summary.goodput.problems):
        lines += [
            f"{'goodput' if i == 0 else '':<12}{line}"
            for i, line in enumerate(describe_goodput(summary.goodput))
        ]
    lines += anneal_lines(run.path)
    return "\n".join(lines)
