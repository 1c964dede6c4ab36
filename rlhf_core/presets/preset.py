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

    def defaults(self, data: dict[str, Any]) -> dict[str, Any]:
        """A config dict with this preset's values under the user's (the user's win)."""
        merged = dict(data)
        for section, values in self.config.items():
            merged[section] = {**values, **(data.get(section) or {})}
        return merged
