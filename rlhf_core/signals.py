"""SIGTERM, how clusters preempt a job: finish the current step or iteration, checkpoint it, exit 143.

``install()`` (the CLI calls it) replaces SIGTERM's default (die at once, like kill -9) with a flag. The
training loops call ``stop_requested()`` at the end of every step / iteration, after its checkpoint
would have been written: under torchrun it is a collective (every rank must stop at the same step, or
the next collective would hang), so every rank sees the same answer. When it is True the loop writes a
checkpoint of the step it just finished and raises :class:`Preempted`; ``--resume`` then continues
byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

from . import distributed as D
from .errors import RLHFError

EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended
_requested = False


class Preempted(RLHFError):
    """SIGTERM arrived: the run stopped cleanly after a step whose checkpoint is on disk."""


def _handler(signum: int, frame: object) -> None:
    global _requested
    _requested = True


def install() -> None:
    """Turn SIGTERM into a request to stop at the next step boundary (main thread only; no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


def reset() -> None:
    """Forget a request (tests; a new run in the same process)."""
    global _requested
    _requested = False


def stop_requested() -> bool:
    """True when SIGTERM reached any rank (a collective under torchrun: call it on every rank)."""
    return D.global_count(1 if _requested else 0) > 0


def preempted(phase: str, step: int, checkpoint_dir: str | Path | None) -> Preempted:
    """The error the loops raise; it names the step and how to continue."""
    if checkpoint_dir is None:
        return Preempted(f"{phase} stopped by SIGTERM after step {step} (no checkpoint directory: nothing saved)")
    return Preempted(f"{phase} stopped by SIGTERM after step {step}; its checkpoint is in {checkpoint_dir}: "
                     "rerun the same command with --resume to continue")
