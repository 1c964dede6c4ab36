"""Phase 3: PPO on the SFT policy against a reward source, evaluated on held-out prompts.

Reads ``cfg.policy`` (an HF causal-LM folder with its tokenizer), ``cfg.reward`` (see
``rlhf_core.ppo.reward_sources``) and the prompts (``cfg.prompts`` or the task's). Evaluation
(:func:`plan_evaluation`): on ``cfg.eval_prompts``, else the task's held-out prompts when training on
the task, else a seeded held-out split of the user's prompts; judged by ``cfg.gold`` (file.py:function),
else the task's gold judge when training on the task, else by no gold judge at all (the summary then
reports the reward source's score, the exact KL and response lengths only). The summary says which
prompts and which judge its numbers come from. Writes ``output_dir`` atomically: the PPO policy (safetensors + tokenizer; LoRA merged),
``value_head.safetensors``, ``samples.md`` (held-out generations before and after, with their gold
scores) and, with ``cfg.trace``, ``trace.json`` holding every tensor of the first iteration
(docs/how_ppo_works.md uses it).
"""
from __future__ import annotations

import copy
import functools
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import distributed as D, fsdp
from ..checkpoint import load_for_resume, write_json_atomic
from ..config import PPOConfig, TaskConfig
from ..data import movie_reviews
from ..data.loaders import load_records
from ..data.tasks import Task
from ..errors import ConfigError, DataError
from ..models import load_causal_lm, load_reward_model, load_tokenizer, place, save_model
from ..ppo.extensions import resolve_estimator
from ..ppo.policy import PolicyWithValue
from ..ppo.reward_sources import (RewardFn, RewardModelScorer, RewardSet, chat_text_format, make_reward_fn,
                                  with_dataset_columns)
from ..ppo.trainer import PPOTrainer
from ..tracking import MetricsLogger
from ..user_code import load_user_function
from .common import resolve_device, setup_torch

N_SAMPLES = 8  # held-out generations shown before/after in samples.md
MIN_EVAL_PROMPTS = 16  # the held-out split of the user's prompts holds at least this many


@dataclass
class Evaluation:
    """Where the evaluation numbers come from: the prompts trained on and held out, the judge."""
    train_prompts: list[str]
    prompts: list[str]  # evaluated on, never trained on
    gold: RewardFn | None  # None: no gold numbers at all
    prompt_source: str  # which prompts, in words (summary.json, report)
    judge: str  # which judge, in words
    held_out: list[int] | None = None  # record numbers (1-based) of cfg.prompts held out, if split
    task_judge: bool = False  # the task's own judge (its gold_parts, shown_prompt apply)
    warnings: list[str] = field(default_factory=list)  # the hygiene rules' warnings (summary.json)


def held_out_records(n: int, cfg: PPOConfig) -> list[int]:
    """The seeded held-out split of ``n`` user prompts: ``max(16, eval_fraction·n)`` record numbers (1-based).

    Raises:
        DataError: too few prompts to hold that many out and still train on some.
    """
    k = max(MIN_EVAL_PROMPTS, round(cfg.eval_fraction * n))
    if n - k < k:  # the rule of --ppo.eval_prompts' help: the split may not leave less to train on than it holds out
        raise DataError(cfg.prompts, f"{n} prompts are too few to hold out {k} for evaluation: {max(n - k, 0)} would "
                                     "be left to train on (give --ppo.eval_prompts, or at least "
                                     f"{2 * MIN_EVAL_PROMPTS} prompts)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return sorted(i + 1 for i in order[:k])


def plan_evaluation(cfg: PPOConfig, task: Task, prompts: list[str], tokenizer: Any = None,
                    conversations: dict[str, list[dict]] | None = None,
                    columns: dict[str, dict[str, Any]] | None = None) -> Evaluation:
    """Which prompts to evaluate on and with which judge (see the module docstring); an eval file's
    prompts are rendered like the training prompts (with ``tokenizer``).

    Raises:
        DataError: an eval file with no prompts, or too few prompts to split.
        ConfigError: a gold ``file.py:function`` that does not load.
    """
    own = bool(cfg.prompts)  # trained on the user's prompts, not the task's
    held = None
    notes: list[str] = []
    if cfg.eval_prompts:
        records = load_records(cfg.eval_prompts, "prompt", keep_columns=True)
        raw, train = [r["prompt"] for r in records], prompts
        evals = render_prompts(raw, tokenizer, cfg.chat_template, cfg.eval_prompts, conversations) if tokenizer else raw
        collect_columns(records, evals, cfg.eval_prompts, columns)
        source = f"{cfg.eval_prompts} ({len(evals)} prompts)"
        notes = eval_hygiene(cfg, raw, evals, train, tokenizer)
    elif own:
        held = held_out_records(len(prompts), cfg)
        keep = set(held)
        evals = [prompts[i - 1] for i in held]
        train = [p for i, p in enumerate(prompts, start=1) if i not in keep]
        source = (f"held-out split of {cfg.prompts}: {len(held)} of {len(prompts)} prompts (seed {cfg.seed}, "
                  "never trained on)")
    else:
        evals, train = task.eval_prompts, prompts
        source = f"the {type(task).__name__}'s held-out prompts ({len(evals)})"
    per_batch = cfg.batch_size // cfg.group_size
    if len(train) < per_batch:
        notes.append(f"{len(train)} training prompts for {per_batch} prompts per iteration: every iteration repeats "
                     "prompts")
    for note in notes:
        warnings.warn(f"ppo evaluation: {note}", stacklevel=2)
    if cfg.gold:
        return Evaluation(train, evals, load_user_function(cfg.gold, "ppo.gold"), source, cfg.gold, held,
                          warnings=notes)
    if own:
        return Evaluation(train, evals, None, source, "none (no --ppo.gold): no gold numbers", held, warnings=notes)
    return Evaluation(train, evals, task.gold_reward, source, f"the {type(task).__name__}'s gold judge", held, True,
                      notes)


def eval_hygiene(cfg: PPOConfig, raw: list[Any], evals: list[str], train: list[str], tokenizer: Any) -> list[str]:
    """The rules ``--ppo.eval_prompts``' help states, for an eval file: eval prompts longer than
    ``max_prompt_length`` follow ``on_long_prompt`` (an error, or truncated with a warning); eval prompts that
    are also training prompts, and an eval file whose format (plain strings / conversations) differs from the
    training prompts', are warnings, returned in words (they go into summary.json).

    Raises:
        DataError: an over-long eval prompt with ``on_long_prompt=error``.
    """
    notes = []
    if tokenizer is not None:
        check_prompt_lengths(evals, tokenizer, cfg, source=cfg.eval_prompts)
    seen = set(train)
    shared = sum(p in seen for p in evals)
    if shared:
        notes.append(f"{shared} of {len(evals)} eval prompts ({cfg.eval_prompts}) are also training prompts: "
                     "what is measured on them is not held out")
    if cfg.prompts:
        train_raw = [r["prompt"] for r in load_records(cfg.prompts, "prompt")]
        kinds = {name: {"conversations" if isinstance(p, list) else "plain strings" for p in ps}
                 for name, ps in (("eval", raw), ("train", train_raw))}
        if kinds["eval"] != kinds["train"]:
            notes.append(f"the eval prompts are {' and '.join(sorted(kinds['eval']))}, the training prompts "
                         f"{' and '.join(sorted(kinds['train']))}: they reach the policy in different formats")
    return notes


def load_prompts(cfg: PPOConfig, task: Task, tokenizer: Any = None,
                 conversations: dict[str, list[dict]] | None = None,
                 columns: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Training prompts from ``cfg.prompts`` ({"prompt"} records: strings or conversations) or the
    embedded task, rendered for the policy (:func:`render_prompts`; with a tokenizer); prompts over
    ``max_prompt_length`` tokens follow ``cfg.on_long_prompt``. ``conversations`` collects rendered
    text -> turns for the conversational ones, ``columns`` rendered text -> the record's other fields."""
    records = (load_records(cfg.prompts, "prompt", keep_columns=True) if cfg.prompts
               else [{"prompt": p} for p in task.prompts])
    prompts = [r["prompt"] for r in records]
    if tokenizer is not None:
        prompts = render_prompts(prompts, tokenizer, cfg.chat_template, cfg.prompts or "embedded task", conversations)
        check_prompt_lengths(prompts, tokenizer, cfg)
    collect_columns(records, prompts, cfg.prompts, columns)
    return prompts


def collect_columns(records: list[dict], prompts: list[Any], source: str,
                    columns: dict[str, dict[str, Any]] | None) -> None:
    """``columns[rendered prompt] = the record's other fields``, for the reward's keyword arguments.

    Raises:
        DataError: the same prompt twice with different columns (which would the reward get?).
    """
    if columns is None:
        return
    first: dict[str, int] = {}
    for n, (rec, prompt) in enumerate(zip(records, prompts), start=1):
        extra = rec.get("columns") or {}
        key = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
        if key in columns and columns[key] != extra:
            raise DataError(source, f"the same prompt as record {first.get(key, '?')} with other columns: the reward "
                                    "could not tell which to use", record=n, field="prompt")
        columns[key], first[key] = extra, first.get(key, n)


def render_prompts(prompts: list[Any], tokenizer: Any, mode: str, source: str,
                   conversations: dict[str, list[dict]] | None = None) -> list[str]:
    """Prompts as the policy reads them. A conversation (TRL's conversational prompt, a list of
    {role, content} turns) is rendered with the tokenizer's chat template and the generation prompt;
    a plain string stays as it is (``mode="auto"`` or ``"never"``) or becomes one user turn rendered
    the same way (``"always"``). The rendered text -> turns of each conversation go into
    ``conversations`` (a reward model then reads them in its own format).

    Raises:
        DataError: a conversation with ``mode="never"`` or a tokenizer without a chat template.
        ConfigError: ``mode="always"`` and the tokenizer has no chat template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has_template:
        raise ConfigError("ppo.chat_template=always: the policy's tokenizer has no chat template")
    out = []
    for n, prompt in enumerate(prompts, start=1):
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}] if mode == "always" else None
        if turns is None:
            out.append(prompt)
            continue
        if mode == "never" or not has_template:
            raise DataError(source, "a conversational prompt needs a chat template, and " + (
                "ppo.chat_template=never" if mode == "never" else "the policy's tokenizer has none"),
                record=n, field="prompt")
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        out.append(text)
        if conversations is not None:
            conversations[text] = turns
    return out


def check_prompt_lengths(prompts: list[str], tokenizer: Any, cfg: PPOConfig, source: str = "") -> None:
    """Raise DataError (on_long_prompt=error) or warn once (truncate) about over-long prompts of ``source``
    (default: the training prompts).

    Truncation keeps each prompt's last ``max_prompt_length`` tokens (``rollout.encode_prompts``).
    """
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n > cfg.max_prompt_length]
    if not long:
        return
    source, first = source or cfg.prompts or "embedded task", long[0]
    if cfg.on_long_prompt == "error":
        raise DataError(source, f"prompt has {lengths[first]} tokens, more than ppo.max_prompt_length="
                                f"{cfg.max_prompt_length} (or pass --ppo.on_long_prompt truncate)",
                        record=first + 1, field="prompt")
    warnings.warn(f"{source}: {len(long)} of {len(prompts)} prompts exceed ppo.max_prompt_length="
                  f"{cfg.max_prompt_length} tokens and are truncated from the left (first: record {first + 1})",
                  stacklevel=2)


def build_policy(cfg: PPOConfig, model: torch.nn.Module) -> Any:
    """Wrap ``model`` in a PolicyWithValue; the separate value trunk comes from the reward model
    (``value_init_from_reward``, same vocabulary required) or a full copy of the policy folder. A
    critic-free estimator (``advantages.advantage_estimator(critic=False)``) gets no value head at all."""
    if not resolve_estimator(cfg).critic:
        return PolicyWithValue(model, value_model="none")
    backbone = None
    if cfg.value_model == "separate" and cfg.value_init_from_reward:
        backbone, _ = load_reward_model(cfg.reward)
        if backbone.get_input_embeddings().num_embeddings != model.get_input_embeddings().num_embeddings:
            raise ConfigError("ppo.value_init_from_reward=true: the reward model's vocabulary differs from "
                              "the policy's (the value model reads the policy's token ids)")
    elif cfg.value_model == "separate" and cfg.use_lora:
        backbone = load_causal_lm(cfg.policy, mode="full")  # the adapter-wrapped trunk is not a full copy
    torch.manual_seed(cfg.seed)  # value-head init
    return PolicyWithValue(model, value_model=cfg.value_model, value_backbone=backbone)


def trace_to_json(trace: dict[str, Any]) -> dict[str, Any]:
    """Tensors to nested lists (rounded to 6 digits) so the trace reads as plain JSON."""
    def convert(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return (v.float().round(decimals=6) if v.is_floating_point() else v).tolist()
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, list):
            return [convert(x) for x in v]
        return v
    return {k: convert(v) for k, v in trace.items()}


def save_policy(policy: Any, tokenizer: Any, output_dir: Path, trace: dict[str, Any] | None = None,
                state_dict: dict[str, torch.Tensor] | None = None, texts: dict[str, str] | None = None) -> None:
    """Policy (LoRA merged into a copy) + tokenizer + value_head.safetensors (with a critic) (+ trace.json, + ``texts``:
    file name -> content, e.g. samples.md), all in one atomic folder.

    ``state_dict``: the policy's full weights when they are FSDP2 shards (``fsdp.full_state_dict``,
    gathered by every rank; this function then runs on rank 0 only).
    """
    def value_head_and_trace(folder: Path) -> None:
        if policy.has_critic:
            save_file(policy.value_state_dict(), str(folder / "value_head.safetensors"))
        if trace:
            write_json_atomic(folder / "trace.json", trace_to_json(trace))
        for name, text in (texts or {}).items():
            (folder / name).write_text(text, encoding="utf-8")

    model = copy.deepcopy(policy.model) if policy.is_lora else policy.model  # merged in the copy only
    save_model(model, tokenizer, output_dir, merge=True, state_dict=state_dict, extra=value_head_and_trace)


def samples_table(task: Task, prompts: list[str], before: list[str], after: list[str],
                  judge: RewardFn | None, shown: bool = True) -> str:
    """A markdown table of the first held-out prompts with the responses before and after PPO (the
    evaluations' own samples) and, with a ``judge``, their gold scores. ``shown``: display the prompts
    as the task does (``task.shown_prompt``; for the task's own prompts)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")
    rows = list(zip(prompts, before, after))[:N_SAMPLES]
    if judge is None:
        lines = ["| prompt | before PPO | after PPO |", "|---|---|---|"]
        return "\n".join(lines + [f"| {cell(p)} | {cell(b)} | {cell(a)} |" for p, b, a in rows]) + "\n"
    ps = [p for p, _, _ in rows]
    gb, ga = judge(ps, [b for _, b, _ in rows]), judge(ps, [a for _, _, a in rows])
    lines = ["| prompt | before PPO (gold) | after PPO (gold) |", "|---|---|---|"]
    for (p, b, a), sb, sa in zip(rows, gb, ga):
        lines.append(f"| {cell(task.shown_prompt(p) if shown else p)} | {cell(b)} ({float(sb):+.2f}) | "
                     f"{cell(a)} ({float(sa):+.2f}) |")
    return "\n".join(lines) + "\n"


def gold_part_means(task: Task, prompts: list[str], responses: list[str]) -> dict[str, float]:
    """The mean of each of the judge's components (``task.gold_parts``) over the responses."""
    parts = [task.gold_parts(p, r) for p, r in zip(prompts, responses)]
    return {k: sum(x[k] for x in parts) / len(parts) for k in parts[0]} if parts and parts[0] else {}


def resume_trainer(trainer: Any, cfg: PPOConfig, checkpoint_dir: Path) -> int:
    """Load the newest valid checkpoint under ``checkpoint_dir`` into ``trainer``; its iteration (0: none).

    The configuration must match the one that wrote the checkpoint (bar logging/saving fields),
    or the resumed run would not be the run that was interrupted.
    """
    found = load_for_resume(checkpoint_dir, cfg.to_dict(), "ppo.", PPOConfig().to_dict())
    if found is None:
        return 0
    trainer.load_state(*found)
    return trainer.iteration


def run(cfg: PPOConfig, output_dir: Path, logger: MetricsLogger, task: Task | None = None,
        checkpoint_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train the policy with PPO and save it; return the phase summary.

    Returns: ``gold_reward_before/after`` (mean gold score on the held-out prompts, SFT vs PPO
    policy, responses sampled at ``cfg.temperature``; only with a gold judge), ``eval_prompts`` and
    ``gold_judge`` (where those numbers come from, :func:`plan_evaluation`; ``eval_held_out_records``
    when the user's prompts were split), ``scores_before/after`` (the reward source's mean there),
    ``kl_to_ref`` (mean over responses of the summed exact per-token KL of the final policy to the
    reference), ``response_length_before/after`` (tokens), ``episodes_per_s`` (training only), ``wall_seconds`` (all of it), and
    ``NAME_before/after`` for each component of a judge that has them (``task.gold_parts``).
    With ``checkpoint_dir`` a checkpoint is written every ``cfg.save_every`` iterations; with
    ``resume`` the newest valid one there is loaded first and the run goes on from it.
    """
    t0 = time.perf_counter()
    cfg.validate()
    setup_torch(cfg.seed)
    # Only the prompt splits are needed (each split has its own stream: the others stay identical).
    task = task or movie_reviews.generate_task(TaskConfig(n_corpus=1, n_sft=1, n_preferences=1), seed=cfg.seed)
    device = resolve_device(cfg, "ppo")
    tokenizer = load_tokenizer(cfg.policy)
    model = load_causal_lm(cfg.policy, mode="lora" if cfg.use_lora else "full", lora=cfg)
    hidden = model.get_output_embeddings().weight.shape[1]
    torch.set_num_threads(cfg.num_threads or (1 if hidden < 256 else torch.get_num_threads()))
    conversations: dict[str, list[dict]] = {}  # rendered prompt -> its turns (conversational prompts)
    columns: dict[str, dict[str, Any]] = {}  # rendered prompt -> its record's other columns (TRL's reward kwargs)
    adapt = functools.partial(with_dataset_columns, columns=columns, conversations=conversations)
    reward_fn = make_reward_fn(cfg.reward, tokenizer, device=device, task=task, weights=cfg.reward_weights,
                               adapt=adapt)
    if cfg.shard_reward_model:  # every rank scores the same number of chunks: the forwards pair up
        if not isinstance(getattr(reward_fn, "model", None), torch.nn.Module):
            raise ConfigError(f"ppo.shard_reward_model=true: ppo.reward={cfg.reward!r} is not a reward-model folder")
        fsdp.wrap_fsdp2(reward_fn.model, mixed_precision_bf16=cfg.mixed_precision == "bf16")
    evaluation = plan_evaluation(cfg, task, load_prompts(cfg, task, tokenizer, conversations, columns), tokenizer,
                                 conversations, columns)
    if cfg.gold:  # the same contract as the reward's
        evaluation.gold = adapt(evaluation.gold)
    sources = [part.source for _, part in reward_fn.parts] if isinstance(reward_fn, RewardSet) else [reward_fn]
    for scorer in (fn for fn in sources if conversations and isinstance(fn, RewardModelScorer)):
        scorer.text_format = chat_text_format(conversations, scorer.tokenizer, scorer.text_format)  # its own format
    policy = place(build_policy(cfg, model), device)  # policy, value head/trunk and reference copy
    trainer = PPOTrainer(cfg, policy, tokenizer, reward_fn, evaluation.train_prompts, evaluation.prompts, logger,
                         gold_fn=evaluation.gold)
    if resume and checkpoint_dir is not None:
        resume_trainer(trainer, cfg, Path(checkpoint_dir))
    result = trainer.train(checkpoint_dir)
    full = fsdp.full_state_dict(policy.model) if trainer.sharded else None  # a collective: every rank
    before, after = trainer.responses["before"], trainer.responses["last"]
    if D.is_main():
        samples = ({"samples.md": samples_table(task, evaluation.prompts, before, after, evaluation.gold,
                                                shown=evaluation.task_judge)} if before and after else {})
        save_policy(policy, tokenizer, Path(output_dir), trainer.trace if cfg.trace else None, full, samples)
    D.barrier()
    parts = {f"{k}_{when}": v for when, texts in (("before", before), ("after", after))
             for k, v in (gold_part_means(task, evaluation.prompts, texts) if evaluation.task_judge else {}).items()}
    gold = {k: result.get(k) for k in ("gold_reward_before", "gold_reward_after")} if evaluation.gold else {}
    return {
        **gold,
        "eval_prompts": evaluation.prompt_source,
        "gold_judge": evaluation.judge,
        **({"eval_warnings": evaluation.warnings} if evaluation.warnings else {}),
        **({"eval_held_out_records": evaluation.held_out} if evaluation.held_out else {}),
        "scores_before": result.get("scores_before"),
        "scores_after": result.get("scores_after"),
        "kl_to_ref": result.get("kl_to_ref_after"),
        "response_length_before": result.get("response_length_before"),
        "response_length_after": result.get("response_length_after"),
        "episodes_per_s": result["episodes_per_s"],
        "skipped_steps": result["skipped_steps"],
        "iterations": result["iterations"],
        **parts,
        "sharded_models": [name for name, m in (("policy", policy.model), ("reference", policy.ref_model),
                                                ("reward_model", getattr(reward_fn, "model", None)))
                           if isinstance(m, torch.nn.Module) and fsdp.is_sharded(m)],  # FSDP2 (torchrun)
        "wall_seconds": time.perf_counter() - t0,
    }
