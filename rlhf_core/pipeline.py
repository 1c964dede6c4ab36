"""The seeded pipeline: task data → tokenizer → pretrain → SFT → reward model → PPO.

Layout of a run folder (a single phase command writes the same layout with one phase):

    DIR/config.json      the resolved configuration (what actually ran)
    DIR/data/*.jsonl     the embedded task in TRL formats (pipeline only)
    DIR/tokenizer/       the locally trained byte-level BPE tokenizer (pipeline, tiny preset)
    DIR/pretrain/ sft/ reward/ ppo/   each phase's HF-format folder (safetensors + tokenizer)
    DIR/metrics.jsonl    every logged metric, one JSON object per line, with its phase
    DIR/summary.json     pretrain.eval_perplexity, sft.eval_loss, reward.eval_accuracy, ppo.*, ...
    DIR/report.md        summary table and PNG plots (DIR/plots/)
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from .checkpoint import write_json_atomic
from .config import PipelineConfig
from .errors import ConfigError
from .tracking import MetricsLogger, update_summary

MARKER = "config.json"  # an output dir holding this was made by rlhf and may be replaced with --overwrite
PHASE_ORDER = ("pretrain", "sft", "reward", "ppo")


def prepare_output_dir(out: Path, overwrite: bool) -> Path:
    """Refuse to write into an existing non-empty dir unless --overwrite (and only if rlhf made it)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: output dir is a file")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out}: output dir exists and is not empty (pass --overwrite to replace it)")
        if not (out / MARKER).exists():
            raise ConfigError(f"{out}: not an rlhf run folder (no {MARKER}); refusing to delete it, remove it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run_phase(name: str, cfg: PipelineConfig, out: Path, logger: MetricsLogger, **extra: Any) -> dict[str, Any]:
    section = getattr(cfg, name)
    t0 = time.time()
    if name == "pretrain":
        from .phases import pretrain
        result = pretrain.run(section, out / name, logger, model_cfg=cfg.model)
    elif name == "sft":
        from .phases import sft
        result = sft.run(section, out / name, logger)
    elif name == "reward":
        from .phases import reward_model
        result = reward_model.run(section, out / name, logger)
    else:
        from .phases import ppo
        result = ppo.run(section, out / name, logger, **extra)
    result.setdefault("wall_seconds", round(time.time() - t0, 2))
    update_summary(out / "summary.json", name, result)
    return result


def _start(cfg: PipelineConfig, out: Path) -> MetricsLogger:
    write_json_atomic(out / MARKER, cfg.to_dict())
    return MetricsLogger(out / "metrics.jsonl", echo=False)


def run_phase_command(name: str, cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """`rlhf PHASE`: one phase with the paths given on the command line (defaults: embedded task)."""
    logger = _start(cfg, out)
    _run_phase(name, cfg, out, logger)
    _finish(out, logger)
    return _load_summary(out)


def run_pipeline(cfg: PipelineConfig, out: Path, stop_after: str = "ppo") -> dict[str, Any]:
    """`rlhf pipeline`: build the task, then run the phases in order, each fed the previous output."""
    from .data.task import generate_task, write_task
    from .data.tokenizer import train_tokenizer

    t0 = time.time()
    task = generate_task(cfg.task, seed=cfg.seed)
    paths = write_task(task, out / "data")
    if cfg.pretrain.model == "tiny" and not cfg.pretrain.tokenizer:
        tok = train_tokenizer(task.corpus, vocab_size=cfg.model.vocab_size)
        tok.save_pretrained(out / "tokenizer")
        cfg.pretrain = dataclasses.replace(cfg.pretrain, tokenizer=str(out / "tokenizer"))
    # Wire each phase's input to the previous phase's output unless the user named one.
    fill = {
        "pretrain": {"data": str(paths["corpus"])},
        "sft": {"model": str(out / "pretrain"), "data": str(paths["sft"])},
        "reward": {"model": str(out / "pretrain"), "data": str(paths["preferences"])},
        "ppo": {"policy": str(out / "sft"), "reward": str(out / "reward"), "prompts": str(paths["prompts"])},
    }
    for phase, values in fill.items():
        section = getattr(cfg, phase)
        setattr(cfg, phase, dataclasses.replace(section, **{k: v for k, v in values.items() if not getattr(section, k)}))
    logger = _start(cfg, out)
    update_summary(out / "summary.json", "pipeline", {"seed": cfg.seed, "preset": cfg.preset})
    for phase in PHASE_ORDER:
        _run_phase(phase, cfg, out, logger, **({"task": task} if phase == "ppo" else {}))
        if phase == stop_after:
            break
    update_summary(out / "summary.json", "pipeline", {"wall_seconds": round(time.time() - t0, 2)})
    _finish(out, logger)
    return _load_summary(out)


def _load_summary(out: Path) -> dict[str, Any]:
    import json
    return json.loads((out / "summary.json").read_text())


def _finish(out: Path, logger: MetricsLogger) -> None:
    from .report import write_report
    write_report(out, logger.records, _load_summary(out))
