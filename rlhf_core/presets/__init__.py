"""Presets: plain data saying what ``rlhf pipeline --preset NAME`` runs.

A :class:`Preset` names the task, the models the phases start from, how each phase's inputs are
wired to those models and to earlier phases' outputs, and the configuration values it sizes the
run with. The one pipeline (``rlhf_core/pipeline.py``) consumes it; a preset adds no code path.

Wiring values are templates filled by the pipeline: ``{out}`` is the run folder and ``{NAME}``
the path of the preset's model ``NAME``. A value the user gave wins over the preset's.
"""
from __future__ import annotations

from ..errors import ConfigError
from .preset import Preset
from .smollm2 import SMOLLM2
from .tiny import TINY

PRESETS: dict[str, Preset] = {p.name: p for p in (TINY, SMOLLM2)}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a one-line ConfigError listing the known ones otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"preset '{name}': unknown (available: {', '.join(PRESETS)})")
    return PRESETS[name]
