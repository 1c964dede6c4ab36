"""The seeded pipeline: task data → tokenizer → pretrain → SFT → reward model → PPO.

One pipeline for every preset (``rlhf_core/presets``): the preset says which task, which models,
which phases and how their inputs are wired; this module runs them in order, each phase's output
the next one's input.

Layout of a run folder (a single phase command writes the same layout with one phase):

    DIR/config.json      the resolved configuration (what actually ran)
    DIR/data/*.jsonl     the preset's task in TRL formats (pipeline only)
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
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import AutoConfig

from . import distributed as D
from .checkpoint import check_resume_config, write_json_atomic
from .config import PipelineConfig, PPOConfig
from .data.loaders import load_records
from .data.tasks import Task
from .data.tokenizer import train_tokenizer
from .errors import ConfigError, RLHFError
from .models import check_reward_dir, load_tokenizer, merge_adapter
from .phases import ppo, pretrain, reward_model, sft
from .phases.common import resolve_device
from .ppo.extensions import resolve_estimator, resolve_loss_fn, resolve_policy_loss, resolve_rollout_correction
from .ppo.vllm_engine import check_model, check_settings
from .user_code import is_user_spec, load_user_function
from .precision import precision
from .presets import get_preset
from .report import write_report
from .trackers import Trackers, parse_report_to
from .tracking import MetricsLogger, update_summary

MARKER = "config.json"  # an output dir holding this was made by rlhf and may be replaced with --overwrite
PHASE_ORDER = ("pretrain", "sft", "reward", "ppo")
RUNNERS = {"pretrain": pretrain.run, "sft": sft.run, "reward": reward_model.run, "ppo": ppo.run}


def prepare_output_dir(out: Path, overwrite: bool, resume: bool = False) -> tuple[Path, Path | None]:
    """Refuse to write into an existing non-empty dir unless --overwrite (and only if rlhf made it);
    with --resume an rlhf run folder is reused as it is (a missing one is started fresh).

    With --overwrite the previous run is not deleted here: it is moved aside to a hidden sibling (the
    second value returned) and :func:`settle_replaced` either deletes it, once the new run has finished
    or written a checkpoint of its own, or moves it back, when the new run failed before that. So a
    typo that fails after this point (a reward folder that does not load) never costs a finished run.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: output dir is a file")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other (resume keeps the run, overwrite deletes it)")
    replaced = None
    if out.exists() and any(out.iterdir()):
        if resume and (out / MARKER).exists():
            return out, None
        if resume:
            raise ConfigError(f"{out}: not an rlhf run folder (no {MARKER}); nothing to resume")
        if not overwrite:
            raise ConfigError(f"{out}: output dir exists and is not empty (pass --overwrite to replace it, "
                              "--resume to continue it)")
        if not (out / MARKER).exists():
            raise ConfigError(f"{out}: not an rlhf run folder (no {MARKER}); refusing to delete it, remove it yourself")
        replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, replaced)
    out.mkdir(parents=True, exist_ok=True)
    return out, replaced


def settle_replaced(out: Path, replaced: Path | None, succeeded: bool) -> str:
    """The end of an --overwrite: delete the previous run when the new one succeeded or has a checkpoint
    (it can be resumed), else put the previous run back in place of the failed one. Returns what was done,
    in words ("" when nothing was replaced)."""
    if replaced is None or not replaced.exists():
        return ""
    started = (out / "checkpoints").is_dir() and any((out / "checkpoints").rglob("step-*"))
    if succeeded or started:
        shutil.rmtree(replaced, ignore_errors=True)
        return "" if succeeded else f"the previous run in {out} was replaced (the new one has a checkpoint)"
    shutil.rmtree(out, ignore_errors=True)
    os.replace(replaced, out)
    return f"the previous run in {out} is kept (the new one failed before writing anything worth keeping)"


# Each phase's data field and the formats it accepts (the first that fits wins, as in the phases).
DATA_FIELDS = {"pretrain": ("data", ("text",)), "sft": ("data", ("prompt_completion", "messages")),
               "reward": ("data", ("preference",)), "ppo": ("prompts", ("prompt",))}


def preflight(cfg: PipelineConfig, phases: tuple[str, ...]) -> None:
    """Read every data file the phases will use before the output dir is touched, so a bad record
    (or, with ``ppo.on_long_prompt=error``, an over-long prompt) fails with nothing written; the
    same for a ``device='cuda'`` that this machine cannot give, for PPO's estimator, losses and gold judge
    (``ppo.advantage_estimator`` / ``ppo.policy_loss`` / ``ppo.loss_fn`` / ``ppo.gold``: a name or
    ``file.py:function`` that must load, declared), its reward folder, its evaluation prompts and the held-out
    split of the user's prompts."""
    if "ppo" in phases:  # a policy or reward model that an earlier phase of this run makes is not there yet
        preflight_ppo(cfg.ppo, made_here={"sft", "reward"} & set(phases[:-1]))
    if "ppo" in phases and cfg.ppo.rollout_engine == "vllm":  # vLLM installed, the settings and the model it runs
        check_settings(cfg.ppo)
        tiny = "sft" in phases[:-1] or not cfg.ppo.policy  # the preset's Llama, built from cfg.model
        shape = {"architectures": ["LlamaForCausalLM"], "hidden_size": cfg.model.hidden_size,
                 "num_attention_heads": cfg.model.num_heads}
        check_model(SimpleNamespace(**shape) if tiny else AutoConfig.from_pretrained(cfg.ppo.policy),
                    resolve_device(cfg.ppo, "ppo").type)
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
        if phase == "ppo" and cfg.ppo.policy and "sft" not in phases:  # rendered as the policy reads them
            tokenizer = load_tokenizer(cfg.ppo.policy)
            prompts = ppo.render_prompts([r["prompt"] for r in records], tokenizer, cfg.ppo.chat_template, path)
            if cfg.ppo.on_long_prompt == "error":
                ppo.check_prompt_lengths(prompts, tokenizer, cfg.ppo)
        if phase == "ppo" and not cfg.ppo.eval_prompts:
            ppo.held_out_records(len(records), cfg.ppo)  # enough prompts to hold some out


def preflight_ppo(cfg: PPOConfig, made_here: set[str] | frozenset[str] = frozenset()) -> None:
    """PPO's own checks before anything is written: the estimator and losses (declared, loadable), the
    gold judge, a reward folder that is a real sequence classifier (``models.check_reward_dir``), a
    value model initialised from it with the policy's vocabulary, and an eval file rendered as the
    policy reads it (a conversational file needs the policy's chat template). ``made_here``: the phases of
    this run ("sft", "reward") that will make the policy or the reward model, which are not checked."""
    resolve_policy_loss(cfg, has_critic=resolve_estimator(cfg).critic), resolve_loss_fn(cfg)
    resolve_rollout_correction(cfg)
    if cfg.gold:
        load_user_function(cfg.gold, "ppo.gold")
    reward_dir = ("reward" not in made_here and cfg.reward and cfg.reward != "gold"
                  and all(not is_user_spec(s) for s in cfg.reward.split(",")) and "," not in cfg.reward)
    if reward_dir:
        check_reward_dir(cfg.reward)
    tokenizer = load_tokenizer(cfg.policy) if cfg.policy and "sft" not in made_here else None
    if reward_dir and cfg.policy and cfg.value_model == "separate" and cfg.value_init_from_reward:
        vocab = {name: json.loads((Path(folder) / "config.json").read_text()).get("vocab_size")
                 for name, folder in (("reward", cfg.reward), ("policy", cfg.policy))
                 if (Path(folder) / "config.json").is_file()}
        if len(vocab) == 2 and vocab["reward"] != vocab["policy"]:
            raise ConfigError(f"ppo.value_init_from_reward=true: the reward model's vocabulary ({vocab['reward']}) "
                              f"differs from the policy's ({vocab['policy']}); the value model reads the policy's "
                              "token ids")
    if cfg.eval_prompts:
        evals = [r["prompt"] for r in load_records(cfg.eval_prompts, "prompt")]
        if tokenizer is not None:
            evals = ppo.render_prompts(evals, tokenizer, cfg.chat_template, cfg.eval_prompts)
            if cfg.on_long_prompt == "error":
                ppo.check_prompt_lengths(evals, tokenizer, cfg, source=cfg.eval_prompts)


def _load_summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}


def _run_phase(name: str, cfg: PipelineConfig, out: Path, logger: MetricsLogger, resume: bool = False,
               task: Task | None = None) -> dict[str, Any]:
    """One phase into ``out/name``; with ``resume`` a phase that already finished (its folder and its
    summary entry both exist) is kept, not rerun."""
    done = _load_summary(out).get(name) if resume and (out / name).is_dir() else None
    extended = name == "ppo" and done is not None and done.get("iterations", 0) < cfg.ppo.num_iterations
    if done is not None and not extended:  # finished; a PPO run given more iterations goes on
        return done
    section = getattr(cfg, name)
    extra: dict[str, Any] = {"model_cfg": cfg.model} if name == "pretrain" else {}
    t0 = time.time()
    result = RUNNERS[name](section, out / name, logger, task=task, checkpoint_dir=out / "checkpoints" / name,
                           resume=resume, **extra)
    result.setdefault("wall_seconds", round(time.time() - t0, 2))
    result.setdefault("device", str(D.device(section.device)))  # where the phase ran (rank 0's)
    result.setdefault("world_size", D.world_size())  # processes (torchrun ranks) that trained it
    result.setdefault("precision", precision(section))  # fp32, or bf16 autocast / FSDP2's
    if D.is_main():
        update_summary(out / "summary.json", name, result)
    return result


def _start(cfg: PipelineConfig, out: Path, resume: bool = False) -> MetricsLogger:
    if resume and (out / MARKER).exists():
        saved = {k: v for k, v in json.loads((out / MARKER).read_text()).items() if k not in PipelineConfig.TRACKING}
        check_resume_config(saved, {k: v for k, v in cfg.to_dict().items() if k not in PipelineConfig.TRACKING}, "",
                            PipelineConfig().to_dict())  # the trackers may change on resume
    if not D.is_main():  # torchrun: rank 0 alone writes config, metrics, summary, report
        return MetricsLogger(None, echo=False)
    write_json_atomic(out / MARKER, cfg.to_dict())
    trackers = Trackers(parse_report_to(cfg.report_to), out, cfg.to_dict()) if cfg.report_to != "none" else None
    return MetricsLogger(out / "metrics.jsonl", echo=False, resume=resume, trackers=trackers)


def _finish(out: Path, logger: MetricsLogger) -> dict[str, Any]:
    summary = _load_summary(out)
    report = write_report(out, logger.records, summary)
    if logger.trackers is not None:  # the report and the samples as artifacts, then close
        for path in (report, out / "ppo" / "samples.md", out / "summary.json"):
            logger.trackers.artifact(path)
        logger.trackers.close()
    return summary


def run_phase_command(name: str, cfg: PipelineConfig, out: Path, resume: bool = False) -> dict[str, Any]:
    """`rlhf PHASE`: one phase with the paths given on the command line (defaults: embedded task)."""
    logger = _start(cfg, out, resume)
    _run_phase(name, cfg, out, logger, resume=resume)
    return _finish(out, logger) if D.is_main() else {}


def wire_inputs(cfg: PipelineConfig, out: Path, models: dict[str, Path]) -> None:
    """Fill each phase's input fields the user left empty from the preset's templates (``{out}``, the
    preset's model paths). A QLoRA SFT output is an adapter on a 4-bit base, so PPO reads its merge
    into the float base (``out/sft_merged``, written after SFT)."""
    names = {"out": str(out), **{k: str(v) for k, v in models.items()}}
    for phase, values in get_preset(cfg.preset).inputs.items():
        section = getattr(cfg, phase)
        unset = {k: v.format(**names) for k, v in values.items() if not getattr(section, k)}  # the user's win
        setattr(cfg, phase, dataclasses.replace(section, **unset))
    if cfg.sft.mode == "qlora" and cfg.ppo.policy == str(out / "sft"):
        cfg.ppo = dataclasses.replace(cfg.ppo, policy=str(out / "sft_merged"))


def run_pipeline(cfg: PipelineConfig, out: Path, stop_after: str = "ppo", resume: bool = False) -> dict[str, Any]:
    """`rlhf pipeline`: build the preset's models and task, then run its phases in order."""
    t0 = time.time()
    preset = get_preset(cfg.preset)
    models = {name: locate() for name, locate in preset.models.items()}  # e.g. a GGUF converted once, cached
    tokenizer = load_tokenizer(str(models[preset.task_tokenizer])) if preset.task_tokenizer else None
    task = preset.make_task(cfg.task, cfg.seed, tokenizer)  # seeded: the same on every rank
    # torchrun: rank 0 writes the data and the tokenizer; each phase's folder (written by rank 0)
    # is the next phase's input, read by every rank (several nodes need a shared filesystem)
    if D.is_main():
        task.write(out / "data")
    if "pretrain" in preset.phases and cfg.pretrain.model == "tiny" and not cfg.pretrain.tokenizer:
        if D.is_main() and not (resume and (out / "tokenizer").is_dir()):
            train_tokenizer(task.corpus, vocab_size=cfg.model.vocab_size).save_pretrained(out / "tokenizer")
        D.barrier()
        cfg.pretrain = dataclasses.replace(cfg.pretrain, tokenizer=str(out / "tokenizer"))
    # A phase whose data field is empty reads the task in memory (identical to DIR/data/*.jsonl),
    # which also lets the reward phase score held-out pairs against the task's gold judge.
    wire_inputs(cfg, out, models)
    logger = _start(cfg, out, resume)
    if D.is_main():
        update_summary(out / "summary.json", "pipeline", {"seed": cfg.seed, "preset": cfg.preset,
                                                          **{f"{k}_model": str(v) for k, v in models.items()}})
    for phase in PHASE_ORDER:
        if phase in preset.phases:
            _run_phase(phase, cfg, out, logger, resume, task=task)
            merged = out / "sft_merged"
            if phase == "sft" and cfg.ppo.policy == str(merged) and not (resume and merged.is_dir()):
                if D.is_main():
                    merge_adapter(out / "sft", merged)
                D.barrier()
        if phase == stop_after:
            break
    if not D.is_main():
        return {}
    update_summary(out / "summary.json", "pipeline", {"wall_seconds": round(time.time() - t0, 2)})
    return _finish(out, logger)
