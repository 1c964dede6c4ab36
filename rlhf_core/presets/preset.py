"""The Preset record (see ``rlhf_core/presets/__init__.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import TaskConfig
from ..data.tasks import Task


@dataclass(frozen=True)
class Preset:
    """What one preset means (see the module docstring)."""
    name: str
    description: str  # one line for --help
    phases: tuple[str, ...]  # which of pretrain, sft, reward, ppo run, in that order
    make_task: Callable[[TaskConfig, int, Any], Task]  # (task config, seed, tokenizer for prompts) -> Task
    inputs: dict[str, dict[str, str]]  # phase -> field -> template ("{out}/sft", "{base}")
    models: dict[str, Callable[[], Path]] = field(default_factory=dict)  # name -> where it is (made once)
    task_tokenizer: str = ""  # the model whose tokenizer (chat template) formats the task's prompts
    config: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> values under the user's
    # section -> values under the user's for `rlhf pipeline` only: settings that need an earlier phase's
    # output (e.g. a critic initialized from the reward model the pipeline trained), not a phase run alone
    pipeline_config: dict[str, dict[str, Any]] = field(default_factory=dict)

    def defaults(self, data: dict[str, Any], pipeline: bool = False) -> dict[str, Any]:
        """A config dict with this preset's values (and, for ``pipeline``, its pipeline_config's) under
        the user's (the user's win)."""
        extra = self.pipeline_config if pipeline else {}
        merged = dict(data)
        for section in {**self.config, **extra}:
            merged[section] = {**self.config.get(section, {}), **extra.get(section, {}), **(data.get(section) or {})}
        return merged
