"""Which metric stands for a task in tables and plots, and TinyLlama's suite (torch-free:
`pretrain plot` reads it)."""

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


def headline_metric(task: str, metrics: Collection[str]) -> str:
    """The metric shown for `task`: its suite's, else acc_norm, else acc, else the first by name."""
    for suite in SUITES.values():
        if suite.get(task) in metrics:
            return suite[task]
    return next((name for name in PREFERRED if name in metrics), min(metrics))
