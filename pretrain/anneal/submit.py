"""`pretrain anneal --submit`: one SLURM job per probe, rendered like `pretrain submit`'s.

Each job runs `pretrain fit --config RUN_DIR/anneal/step-N/probe.yaml` in the probe's own run
directory (its script, job record and .out/.err in `RUN_DIR/anneal/step-N/slurm/`) and requeues
like a training job; its record (probe.json) is written by the next `pretrain anneal RUN_DIR`,
which finds the probe's run finished.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from pretrain.anneal.plan import Plan, Probe, probe_config
from pretrain.anneal.probe import PINNED, RECIPE, prepare_probe
from pretrain.anneal.result import probe_dir
from pretrain.files import write_atomic
from pretrain.run_dir import RunDir, checkpoint_name


def submit_probes(plan: Plan, nodes: int | None, gpus: int | None, dry_run: bool) -> int:
    """Submit (or with `dry_run` print) one job per probe of `plan`."""
    from pretrain.slurm.job import resolve_job, submit

    cli = {"nodes": nodes, "gpus_per_node": gpus}
    for probe in plan.probes:
        if dry_run:
            print(_dry_run_script(plan, probe, cli).rstrip("\n"))
            continue
        folder = probe_dir(plan.run.path, probe.step)
        folder.mkdir(parents=True, exist_ok=True)
        lease = RunDir(folder)
        lease.acquire()  # not while a probe of this step runs here
        try:
            recipe = prepare_probe(plan, probe)
        finally:
            lease.release()
        job_id = submit(resolve_job(str(recipe), cli, _branch_from(folder, probe)))
        print(
            f"anneal: probe step-{probe.step}: submitted job {job_id} (pretrain status {folder})", flush=True
        )
    return 0


def _dry_run_script(plan: Plan, probe: Probe, cli: dict[str, int | None]) -> str:
    """The job script of `probe`, rendered from a recipe written aside (nothing is pinned or written
    in the run directory); it names the recipe's real place."""
    from pretrain.slurm.job import render, resolve_job

    folder = probe_dir(plan.run.path, probe.step)
    pinned = folder / PINNED / checkpoint_name(probe.step)
    config = probe_config(plan.config, plan.run.path, probe, plan.branch(probe), pinned)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / RECIPE
        write_atomic(recipe, yaml.safe_dump(config, sort_keys=False).encode())
        script = render(resolve_job(str(recipe), cli, _branch_from(folder, probe)))
        return script.replace(str(recipe), str(folder / RECIPE))


def _branch_from(folder: Path, probe: Probe) -> list[str]:
    """The recipe's branch point, repeated on the job's command line so that the script shows it."""
    return ["--branch_from", str(folder / PINNED / checkpoint_name(probe.step))]
