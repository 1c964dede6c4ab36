"""Experiment trackers: ``--report-to tensorboard,wandb,trackio`` (or ``none``).

metrics.jsonl stays the source of truth; a tracker receives a copy of every logged metric under its
phase's namespace (``ppo/loss/policy``, step = the phase's own step), the run's config as
hyperparameters, and the run report and PPO samples as artifacts where it keeps them. All three run
offline and write inside the run folder: TensorBoard event files in ``DIR/tensorboard``, a W&B offline
run in ``DIR/wandb`` (``wandb sync`` uploads it later), trackio's local store in ``DIR/trackio``.

The packages are the optional extra ``.[track]``, imported only when asked for. A tracker that fails
mid-run (a full disk, a crash in its code) is dropped with one warning: training goes on and the JSONL
is complete.
"""
from __future__ import annotations

import importlib.util
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from .errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def parse_report_to(spec: str) -> list[str]:
    """``"tensorboard,wandb"`` -> ["tensorboard", "wandb"]; ``"none"``/"" -> [].

    Raises:
        ConfigError: an unknown tracker, or one whose package is not installed.
    """
    names = [n.strip() for n in (spec or "none").split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in PACKAGES:
            raise ConfigError(f"--report-to {name}: unknown tracker (choose none, {', '.join(PACKAGES)})")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"--report-to {name}: the {PACKAGES[name]} package is not installed "
                              "(pip install -c constraints.txt -e '.[track]')")
    return list(dict.fromkeys(names))


class Tracker:
    """One tracker: ``log`` each record, ``artifact`` files, ``close`` at the end."""
    name = ""

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def artifact(self, path: Path) -> None:
        """Keep a file (report.md, samples.md) where the tracker keeps files; nothing by default."""

    def close(self) -> None:
        pass


def _quiet_writer_threads(previous: Any = None) -> None:
    """TensorBoard writes from a background thread; when a write fails there (a full disk) the thread dies
    with a 15-line "Exception in thread" traceback, and the next write in the main thread raises the same
    error, which drops the tracker with one warning. Silence the thread's copy (only that thread's)."""
    previous = previous or threading.excepthook
    if getattr(previous, "rlhf_quiet", False):
        return

    def hook(args: Any) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)
    hook.rlhf_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, out: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        _quiet_writer_threads()
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=1) + "\n```", 0)

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"{phase}/{key}", value, step)
        self.writer.flush()

    def artifact(self, path: Path) -> None:
        self.writer.add_text(path.name, path.read_text(encoding="utf-8"), 0)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """Offline mode unless the user set WANDB_MODE; each phase's step is its own x axis."""
    name = "wandb"

    def __init__(self, out: Path, config: dict[str, Any]):
        import wandb
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(project=config.get("project") or "rlhf-core", dir=str(out), config=config,
                              name=config.get("run_name") or out.name, tags=config.get("tags") or None)
        self.phases: set[str] = set()

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        if phase not in self.phases:
            self.phases.add(phase)
            self.run.define_metric(f"{phase}/step")
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
        self.run.log({f"{phase}/step": step, **{f"{phase}/{k}": v for k, v in metrics.items()}})

    def artifact(self, path: Path) -> None:
        art = self.wandb.Artifact(path.stem.replace(".", "_"), type="report")
        art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker(Tracker):
    """trackio's local store, kept in the run folder (TRACKIO_DIR unless the user set it)."""
    name = "trackio"

    def __init__(self, out: Path, config: dict[str, Any]):
        os.environ.setdefault("TRACKIO_DIR", str(out / "trackio"))
        import trackio
        self.trackio = trackio
        self.run = trackio.init(project=config.get("project") or "rlhf-core", name=config.get("run_name") or out.name,
                                config=config, embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log({f"{phase}/step": step, **{f"{phase}/{k}": v for k, v in metrics.items()}})

    def close(self) -> None:
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


class Trackers:
    """The trackers of one run, each dropped with a single warning the first time it fails."""

    def __init__(self, names: list[str], out: Path, config: dict[str, Any]):
        self.active: list[Tracker] = []
        for name in names:
            try:
                self.active.append(TRACKERS[name](Path(out), config))
            except Exception as e:  # a tracker must never stop training
                self._drop(name, e)

    @staticmethod
    def _drop(name: str, error: Exception) -> None:
        first = str(error).splitlines()[0] if str(error) else ""
        warnings.warn(f"tracker {name} failed ({type(error).__name__}: {first}); it is dropped, metrics.jsonl goes on",
                      stacklevel=3)

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, call)(*args)
            except Exception as e:
                self.active.remove(tracker)
                self._drop(tracker.name, e)

    def log(self, phase: str, step: int, metrics: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "phase", "time")}
        self._each("log", phase, step, numbers)

    def artifact(self, path: Path) -> None:
        if Path(path).is_file():
            self._each("artifact", Path(path))

    def close(self) -> None:
        self._each("close")
