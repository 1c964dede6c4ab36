"""Metrics JSONL, progress bars with ETA, and the run's summary.

Metric names are namespaced (``loss/policy``, ``objective/kl``, ``perf/tokens_per_s``) and carry
the phase: every JSONL line is ``{"phase": ..., "step": ..., "time": ..., **metrics}``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

from .checkpoint import write_json_atomic
from .errors import DataError

T = TypeVar("T")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A torn last line (the run was killed while writing it) is
    skipped; any other line that is not a JSON object is a DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(str(path), f"not UTF-8 text (byte {e.start})", record=line) from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn by a kill mid-write
            raise DataError(str(path), "not a JSON object", record=i + 1) from None
        if not isinstance(rec, dict):
            raise DataError(str(path), "not a JSON object", record=i + 1)
        if not isinstance(rec.get("phase"), str) or not isinstance(rec.get("step"), int):
            raise DataError(str(path), "a metrics record needs a string \"phase\" and an integer \"step\"",
                            record=i + 1)
        records.append(rec)
    return records


class MetricsLogger:
    """Append-only JSONL metrics file shared by all phases of a run (None path: memory only)."""

    def __init__(self, path: str | Path | None, echo: bool = False, resume: bool = False, trackers: Any = None):
        self.path = Path(path) if path is not None else None
        self.echo = echo
        self.trackers = trackers  # trackers.Trackers: a copy of every record (JSONL stays the truth)
        self.records: list[dict[str, Any]] = []
        self.t0 = time.time()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume and self.path.exists():  # the report plots the whole run, not just this process
                self.records = read_metrics(self.path)

    def log(self, phase: str, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        rec = {"phase": phase, "step": int(step), "time": round(time.time() - self.t0, 3)}
        for k, v in metrics.items():
            v = float(v) if hasattr(v, "item") or isinstance(v, (int, float)) else v
            rec[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        self.records.append(rec)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        if self.trackers is not None:
            self.trackers.log(phase, int(step), rec)
        if self.echo:
            shown = " ".join(f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float) and k != "time")
            print(f"[{phase} {step}] {shown}", file=sys.stderr)
        return rec

    def series(self, phase: str, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.records if r["phase"] == phase and r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """tqdm progress bar with ETA on stderr; silent when RLHF_NO_PROGRESS=1 or not a terminal in CI."""
    disable = os.environ.get("RLHF_NO_PROGRESS") == "1" or (os.environ.get("CI") == "true")
    return iter(tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False))


def update_summary(path: str | Path, phase: str, values: dict[str, Any]) -> dict[str, Any]:
    """Merge ``values`` under ``phase`` into summary.json (written atomically) and return it."""
    path = Path(path)
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.setdefault(phase, {}).update(values)
    write_json_atomic(path, summary)
    return summary


class MeanMetrics:
    """Weighted sum and total weight per key, so a mean only averages values that were written (TRL
    #7012) and pools them by what they were measured on: update statistics are token means of their
    minibatch, so weighting each by its tokens gives the token mean over all of them (clipfrac 0.5 on
    10 tokens and 0 on 100 tokens is 0.045, not 0.25)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, stats: dict[str, float], weight: float = 1.0) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + weight * float(v)
            self.counts[k] = self.counts.get(k, 0.0) + weight

    def mean(self) -> dict[str, float]:
        return {k: s / self.counts[k] if self.counts[k] else 0.0 for k, s in self.sums.items()}
