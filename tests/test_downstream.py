"""The DownstreamEval callback: the same scores on one process and on two FSDP2 processes, and a
curve that survives a SIGKILL and a resume with no step missing or doubled."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import STEPS, recipe, require, run, run_and_kill_after_checkpoint

from pretrain.run_dir import RunDir

require("lm_eval")
pytestmark = pytest.mark.slow

EVERY = 4
CALLBACK = {
    "class_path": "pretrain.train.callbacks.downstream.DownstreamEval",
    "init_args": {"tasks": ["pystdlib_next_line"], "every_n_steps": EVERY, "limit": 24, "batch_size": 8},
}


def _curve(run_dir) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """metric -> (steps, tokens, values) of the merged logs."""
    downstream = RunDir(run_dir).read_logs().downstream()
    return {
        metric: (series.steps.tolist(), series.tokens.tolist(), series.values.tolist())
        for metric, series in downstream["pystdlib_next_line"].items()
    }


def _config(tmp_path, tiny_dataset, run_dir, **changes):
    return str(recipe(tmp_path, tiny_dataset, run_dir, trainer__callbacks=[CALLBACK], **changes))


def test_two_fsdp2_processes_log_the_scores_of_one(tiny_dataset, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    result = run(["fit", "--config", _config(tmp_path, tiny_dataset, one)])
    assert "pystdlib_next_line/acc" in result.stderr
    run(
        [
            "fit",
            "--config",
            _config(tmp_path, tiny_dataset, two, trainer__devices=2, trainer__strategy="fsdp2"),
        ]
    )
    single, double = _curve(one), _curve(two)
    assert set(single) == {"acc", "acc_norm"}
    logged = RunDir(one).read_logs()  # beside the scores: their standard errors and the chance level
    for name in ("acc_stderr", "acc_norm_stderr", "chance"):
        extra = logged.downstream_extra("pystdlib_next_line", name)
        assert extra is not None and extra.steps.tolist() == single["acc"][0], name
    assert logged.downstream_extra("pystdlib_next_line", "chance").values.tolist() == [0.25] * (
        STEPS // EVERY
    )
    for metric in single:
        steps, tokens, values = single[metric]
        assert steps == [s - 1 for s in range(EVERY, STEPS + 1, EVERY)]  # Lightning's step of those metrics
        assert tokens == [s * 1024 for s in range(EVERY, STEPS + 1, EVERY)]
        assert double[metric][:2] == (steps, tokens)
        np.testing.assert_allclose(double[metric][2], values, atol=1e-4)


def test_a_killed_and_resumed_run_keeps_every_evaluation_once(tiny_dataset, tmp_path):
    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    config = _config(tmp_path, tiny_dataset, killed)
    run_and_kill_after_checkpoint(["fit", "--config", config], killed / "checkpoints" / "step-00000008.ckpt")
    run(["fit", "--config", config])
    run(["fit", "--config", _config(tmp_path, tiny_dataset, uninterrupted)])
    resumed, reference = _curve(killed), _curve(uninterrupted)
    for metric, (steps, tokens, values) in reference.items():
        assert resumed[metric][:2] == (steps, tokens)
        np.testing.assert_allclose(resumed[metric][2], values, atol=1e-6)


def test_a_task_missing_offline_stops_the_launch_before_training(tiny_dataset, tmp_path):
    import os
    import subprocess

    from helpers import PRETRAIN

    run_dir = tmp_path / "offline"
    callback = CALLBACK | {"init_args": CALLBACK["init_args"] | {"tasks": ["piqa"]}}
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__callbacks=[callback])
    env = os.environ | {"HF_HOME": str(tmp_path / "empty"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [PRETRAIN, "fit", "--config", str(config)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "task piqa" in last and "pretrain eval --download piqa" in last
    assert "Traceback" not in result.stderr
    assert not list((run_dir / "checkpoints").glob("step-*"))
