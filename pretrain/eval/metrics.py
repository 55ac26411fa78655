"""Which metric stands for a task in tables and plots, TinyLlama's suite, and the names kept beside
the scores (torch-free: `pretrain plot` reads it).

Beside each score `<metric>` of a task, lm-eval's standard error is kept as `<metric>_stderr`, and
a multiple-choice task's chance level as `chance`: the expected acc (and acc_norm) of guessing,
the mean over the evaluated documents of 1 / their number of choices. Neither is a score.
"""

from __future__ import annotations

from collections.abc import Collection

# TinyLlama's EVAL.md: "We report the acc_norm by default"; winogrande and boolq have only acc.
TINYLLAMA_COMMONSENSE = {
    "hellaswag": "acc_norm",
    "openbookqa": "acc_norm",
    "winogrande": "acc",
    "arc_challenge": "acc_norm",
    "arc_easy": "acc_norm",
    "boolq": "acc",
    "piqa": "acc_norm",
}
SUITES = {"tinyllama-commonsense": TINYLLAMA_COMMONSENSE}
PREFERRED = ("acc_norm", "acc")
STDERR = "_stderr"
CHANCE = "chance"
CHANCE_METRICS = ("acc", "acc_norm")  # the metrics whose chance level `chance` is


def is_score(name: str) -> bool:
    """Whether a name kept beside a task's scores is a score (not a standard error or the chance level)."""
    return name != CHANCE and not name.endswith(STDERR)


def stderr_name(metric: str) -> str:
    """The name of a score's standard error, as lm-eval names it: `acc_norm` -> `acc_norm_stderr`."""
    return metric + STDERR


def headline_metric(task: str, metrics: Collection[str]) -> str:
    """The metric shown for `task`: its suite's, else acc_norm, else acc, else the first by name
    (standard errors and the chance level are never one)."""
    metrics = [name for name in metrics if is_score(name)]
    for suite in SUITES.values():
        if suite.get(task) in metrics:
            return suite[task]
    return next((name for name in PREFERRED if name in metrics), min(metrics))
