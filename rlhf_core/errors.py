"""Errors a user can cause (data, config, paths): one typed exception, one clear line.

The CLI prints ``str(err)`` alone and exits with code 2 (a traceback only with ``--debug``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class RLHFError(Exception):
    """Base class for every error a user can cause and fix."""


class ConfigError(RLHFError):
    """An invalid configuration value, unknown key or bad override."""


class DataError(RLHFError):
    """A bad input file or record: message names the file, record number and field."""

    def __init__(self, path, problem: str, record: int | None = None, field: str | None = None):
        where = str(path)
        if record is not None:
            where += f":{record}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")
        self.path, self.record, self.field, self.problem = path, record, field, problem


class RewardError(RLHFError):
    """A reward source that raised, returned non-finite values or the wrong number of scores."""


class UserCodeError(RLHFError):
    """The user's own function (an estimator, a policy loss, a loss) broke its contract at run time:
    the message names the function, the iteration and what was wrong."""


@contextlib.contextmanager
def user_code(where: str) -> Iterator[None]:
    """Run the user's function: an exception it raises becomes one UserCodeError line naming ``where``."""
    try:
        yield
    except UserCodeError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserCodeError(f"{where} raised {type(e).__name__}: {first}") from e


class DiskFullError(RLHFError):
    """No space left while writing a checkpoint, a model or a JSON file: the write was atomic, so the
    previous version is intact."""


class CheckpointError(RLHFError):
    """A checkpoint that is missing, torn or corrupted (never loaded silently)."""


class NumericError(RLHFError):
    """max_skipped_steps optimizer steps in a row had a non-finite loss or gradient: the run stops
    before writing another checkpoint, so the last good one is intact."""
