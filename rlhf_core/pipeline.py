"""The seeded pipeline: task data → tokenizer → pretrain → SFT → reward model → PPO.

Layout of a run folder (a single phase command writes the same layout with one phase):

    DIR/config.json      the resolved configuration (what actually ran)
    DIR/data/*.jsonl     the embedded task in TRL formats (pipeline only)
    DIR/tokenizer/       the locally trained byte-level BPE tokenizer (pipeline, tiny preset)
    DIR/pretrain/ sft/ reward/ ppo/   each phase's HF-format folder (safetensors + tokenizer)
    DIR/metrics.jsonl    every logged metric, one JSON object per line, with its phase
    DIR/summary.json     pretrain.eval_perplexity, sft.eval_loss, reward.eval_accuracy, ppo.*, ...
    DIR/report.md        summary table and PNG plots (DIR/plots/)
    DIR/checkpoints/PHASE/step-XXXXXX/   resumable training state (``--resume``; see checkpoint.py)
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from . import distributed as D
from .checkpoint import check_resume_config, write_json_atomic
from .config import PipelineConfig
from .errors import ConfigError, RLHFError
from .tracking import MetricsLogger, update_summary

MARKER = "config.json"  # an output dir holding this was made by rlhf and may be replaced with --overwrite
PHASE_ORDER = ("pretrain", "sft", "reward", "ppo")


def prepare_output_dir(out: Path, overwrite: bool, resume: bool = False) -> Path:
    """Refuse to write into an existing non-empty dir unless --overwrite (and only if rlhf made it);
    with --resume an rlhf run folder is reused as it is (a missing one is started fresh)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: output dir is a file")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other (resume keeps the run, overwrite deletes it)")
    if out.exists() and any(out.iterdir()):
        if resume and (out / MARKER).exists():
            return out
        if resume:
            raise ConfigError(f"{out}: not an rlhf run folder (no {MARKER}); nothing to resume")
        if not overwrite:
            raise ConfigError(f"{out}: output dir exists and is not empty (pass --overwrite to replace it, "
                              "--resume to continue it)")
        if not (out / MARKER).exists():
            raise ConfigError(f"{out}: not an rlhf run folder (no {MARKER}); refusing to delete it, remove it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# Each phase's data field and the formats it accepts (the first that fits wins, as in the phases).
DATA_FIELDS = {"pretrain": ("data", ("text",)), "sft": ("data", ("prompt_completion", "messages")),
               "reward": ("data", ("preference",)), "ppo": ("prompts", ("prompt",))}


def preflight(cfg: PipelineConfig, phases: tuple[str, ...]) -> None:
    """Read every data file the phases will use before the output dir is touched, so a bad record
    (or, with ``ppo.on_long_prompt=error``, an over-long prompt) fails with nothing written; the
    same for a ``device='cuda'`` that this machine cannot give."""
    from .data.loaders import load_records
    from .phases.common import resolve_device
    for phase in phases:
        resolve_device(getattr(cfg, phase), phase)
        key, formats = DATA_FIELDS[phase]
        path = getattr(getattr(cfg, phase), key)
        if not path:
            continue
        errors: list[RLHFError] = []
        for fmt in formats:
            try:
                records = load_records(path, fmt)
                break
            except RLHFError as e:
                errors.append(e)
        else:
            raise errors[0]
        if phase == "ppo" and cfg.ppo.policy and cfg.ppo.on_long_prompt == "error":
            from .models import load_tokenizer
            from .phases.ppo import check_prompt_lengths
            check_prompt_lengths([r["prompt"] for r in records], load_tokenizer(cfg.ppo.policy), cfg.ppo)


def _done(out: Path, name: str) -> bool:
    """A phase finished in an earlier attempt: its folder and its summary entry both exist."""
    return (out / name).is_dir() and name in (_load_summary(out) if (out / "summary.json").exists() else {})


def _run_phase(name: str, cfg: PipelineConfig, out: Path, logger: MetricsLogger, resume: bool = False,
               **extra: Any) -> dict[str, Any]:
    if resume and _done(out, name):
        return _load_summary(out)[name]
    section = getattr(cfg, name)
    extra.update(checkpoint_dir=out / "checkpoints" / name, resume=resume)
    t0 = time.time()
    if name == "pretrain":
        from .phases import pretrain
        result = pretrain.run(section, out / name, logger, model_cfg=cfg.model, **extra)
    elif name == "sft":
        from .phases import sft
        result = sft.run(section, out / name, logger, **extra)
    elif name == "reward":
        from .phases import reward_model
        result = reward_model.run(section, out / name, logger, **extra)
    else:
        from .phases import ppo
        result = ppo.run(section, out / name, logger, **extra)
    result.setdefault("wall_seconds", round(time.time() - t0, 2))
    result.setdefault("device", str(D.device(section.device)))  # where the phase ran (rank 0's)
    result.setdefault("world_size", D.world_size())  # processes (torchrun ranks) that trained it
    if D.is_main():
        update_summary(out / "summary.json", name, result)
    return result


def _start(cfg: PipelineConfig, out: Path, resume: bool = False) -> MetricsLogger:
    if resume and (out / MARKER).exists():
        check_resume_config(json.loads((out / MARKER).read_text()), cfg.to_dict(), "")
    if not D.is_main():  # torchrun: rank 0 alone writes config, metrics, summary, report
        return MetricsLogger(None, echo=False)
    write_json_atomic(out / MARKER, cfg.to_dict())
    return MetricsLogger(out / "metrics.jsonl", echo=False, resume=resume)


def run_phase_command(name: str, cfg: PipelineConfig, out: Path, resume: bool = False) -> dict[str, Any]:
    """`rlhf PHASE`: one phase with the paths given on the command line (defaults: embedded task)."""
    logger = _start(cfg, out, resume)
    _run_phase(name, cfg, out, logger, resume=resume)
    if not D.is_main():
        return {}
    _finish(out, logger)
    return _load_summary(out)


def run_pipeline(cfg: PipelineConfig, out: Path, stop_after: str = "ppo", resume: bool = False) -> dict[str, Any]:
    """`rlhf pipeline`: build the task, then run the phases in order, each fed the previous output."""
    if cfg.preset == "smollm2":  # real weights: no phase 0, its own task (rlhf_core/real.py)
        from .real import run_real_pipeline
        return run_real_pipeline(cfg, out, stop_after, resume)
    from .data.task import generate_task, write_task
    from .data.tokenizer import train_tokenizer

    t0 = time.time()
    task = generate_task(cfg.task, seed=cfg.seed)  # seeded: the same on every rank
    # torchrun: rank 0 writes the data and the tokenizer; each phase's folder (written by rank 0)
    # is the next phase's input, read by every rank (several nodes need a shared filesystem)
    if D.is_main():
        write_task(task, out / "data")
    if cfg.pretrain.model == "tiny" and not cfg.pretrain.tokenizer:
        if D.is_main() and not (resume and (out / "tokenizer").is_dir()):
            tok = train_tokenizer(task.corpus, vocab_size=cfg.model.vocab_size)
            tok.save_pretrained(out / "tokenizer")
        D.barrier()
        cfg.pretrain = dataclasses.replace(cfg.pretrain, tokenizer=str(out / "tokenizer"))
    # Wire each phase's model input to the previous phase's output unless the user named one. Data
    # left empty means the embedded task (passed in memory, identical to DIR/data/*.jsonl), which
    # also lets the reward phase score held-out pairs against the gold judge.
    fill = {
        "sft": {"model": str(out / "pretrain")},
        "reward": {"model": str(out / "pretrain")},
        "ppo": {"policy": str(out / "sft"), "reward": str(out / "reward")},
    }
    for phase, values in fill.items():
        section = getattr(cfg, phase)
        setattr(cfg, phase, dataclasses.replace(section, **{k: v for k, v in values.items() if not getattr(section, k)}))
    logger = _start(cfg, out, resume)
    if D.is_main():
        update_summary(out / "summary.json", "pipeline", {"seed": cfg.seed, "preset": cfg.preset})
    for phase in PHASE_ORDER:
        _run_phase(phase, cfg, out, logger, resume, task=task)
        if phase == stop_after:
            break
    if not D.is_main():
        return {}
    update_summary(out / "summary.json", "pipeline", {"wall_seconds": round(time.time() - t0, 2)})
    _finish(out, logger)
    return _load_summary(out)


def _load_summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def _finish(out: Path, logger: MetricsLogger) -> None:
    from .report import write_report
    write_report(out, logger.records, _load_summary(out))
