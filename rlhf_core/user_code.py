"""The user's own Python, named on the command line as ``path/to/file.py:function``.

Reward functions (``ppo.reward``), gold judges, advantage estimators
(``ppo.advantage_estimator``) and losses (``ppo.loss_fn``) all load through
:func:`load_user_function`, so each fails the same way: one line naming the setting, the file
and what went wrong (``ConfigError``, exit code 2 from the CLI) before anything is written.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

_LOADED: dict[str, Any] = {}  # resolved path -> module: a file runs once per process (the checks
# before a run and the run itself see the same module, its state and its registrations)


def is_user_spec(spec: str) -> bool:
    """True for ``"file.py:function"`` (the part before the last colon ends in ``.py``)."""
    return isinstance(spec, str) and spec.rpartition(":")[0].endswith(".py")


def load_user_function(spec: str, setting: str = "reward") -> Callable[..., Any]:
    """Import ``function`` from ``file.py`` given ``"file.py:function"`` (each file executed once per
    process, then reused).

    Args:
        spec: ``"path/to/file.py:function"``.
        setting: the config setting that named it, for the error message (``ppo.loss_fn``, ...).
    Raises:
        ConfigError: a missing file, an import that raises, or no callable of that name.
    """
    path_str, _, name = spec.rpartition(":")
    path = Path(path_str)
    if not path.is_file():
        raise ConfigError(f"{setting} '{spec}': file {path} not found")
    key = str(path.resolve())
    module = _LOADED.get(key)
    if module is None:
        module_spec = importlib.util.spec_from_file_location(f"user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        try:
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:
            raise ConfigError(f"{setting} '{spec}': importing {path} failed: {type(e).__name__}: {e}") from None
        _LOADED[key] = module
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{setting} '{spec}': {path} has no function '{name}'")
    return fn
