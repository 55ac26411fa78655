"""The stop/requeue flag that SIGUSR1 and SIGTERM set (no torch import: installed first thing).

`pretrain fit` routes both signals here before it imports torch or parses the recipe, so a
signal that arrives at any point of start-up is kept, not fatal; `pretrain.train.callbacks.requeue` acts
on the flag at the first step boundary. A handler only records the signal (see that module).
"""

from __future__ import annotations

import signal
from typing import Any

# Flag values, combined across ranks with max(): a requeue request wins over a plain stop.
NONE, STOP, REQUEUE = 0, 1, 2
_received = NONE


def received() -> int:
    """The strongest signal recorded since `install_signal_handlers` (NONE, STOP or REQUEUE)."""
    return _received


def _on_signal(signum: int, frame: Any) -> None:
    global _received
    _received = max(_received, REQUEUE if signum == signal.SIGUSR1 else STOP)


def install_signal_handlers() -> dict[int, Any]:
    """Clear the flag and route SIGUSR1 and SIGTERM to it; returns the handlers they replace.
    Call as early as possible (a signal's default action ends the process). Main thread only."""
    global _received
    _received = NONE
    return route_signals()


def route_signals() -> dict[int, Any]:
    """Route SIGUSR1 and SIGTERM to the flag (keeping what it holds); returns the old handlers."""
    previous: dict[int, Any] = {}
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        previous[signum] = signal.signal(signum, _on_signal)
        signal.siginterrupt(signum, False)  # restart interrupted system calls (I/O, gloo sockets)
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
