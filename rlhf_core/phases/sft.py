"""Phase 1: supervised fine-tuning with the loss on response tokens only.

Each record becomes ``prompt + completion + EOS``; labels are -100 on the prompt and on padding,
so the model learns to answer and to stop (the EOS is a label), not to write prompts. Prompt and
completion are tokenized separately and concatenated, exactly as PPO later sees them (a tokenized
prompt followed by generated tokens).

Modes: ``full``; ``lora`` (peft adapters, merged into the base on save when ``merge_adapter`` so
PPO loads a plain model); ``qlora`` (nf4 4-bit frozen base + adapters). A QLoRA output folder is
the adapter (safetensors) + tokenizer; its ``adapter_config.json`` names the absolute base folder,
so ``AutoModelForCausalLM.from_pretrained(out)`` or :func:`rlhf_core.models.load_causal_lm`
loads base + adapter (the base folder must still exist).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import distributed as D
from ..config import SFTConfig
from ..data import movie_reviews
from ..data.batching import pad
from ..data.loaders import load_records, messages_to_prompt_completion
from ..data.tasks import Task
from ..errors import ConfigError, DataError
from ..models import check_model_dir, load_causal_lm, load_tokenizer, place
from ..tracking import MetricsLogger
from .common import eval_lm_loss, lm_nll, resolve_device, save_trained, setup_torch, split_eval, train_loop

PHASE = "sft"


def encode_example(prompt_ids: Sequence[int], completion_ids: Sequence[int], eos_id: int,
                   max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one record: labels are -100 on the prompt, the completion and the
    EOS are targets; both truncated to ``max_length`` tokens."""
    ids = [*prompt_ids, *completion_ids, eos_id][:max_length]
    labels = ([-100] * len(prompt_ids) + [*completion_ids, eos_id])[:max_length]
    return ids, labels


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: pad positions get attention 0 and label -100.  Each tensor (B, T_max)."""
    input_ids = pad([e[0] for e in examples], pad_id)
    labels = pad([e[1] for e in examples], -100)
    attention_mask = pad([[1] * len(e[0]) for e in examples], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def load_pairs(cfg: SFTConfig, tokenizer: Any, task: Task | None = None) -> list[dict[str, str]]:
    """prompt/completion records from ``cfg.data`` (prompt/completion or chat messages) or the
    task's SFT split (default: the movie-review task)."""
    if not cfg.data:
        task = task or movie_reviews.generate_task(seed=cfg.seed)
        return [dict(r) for r in task.sft]
    try:
        return list(load_records(cfg.data, "prompt_completion"))
    except DataError as first:
        try:
            records = load_records(cfg.data, "messages")
        except DataError:
            raise first from None
        return messages_to_prompt_completion(records, tokenizer)


def tokenize_pairs(pairs: list[dict[str, str]], tokenizer: Any, max_length: int
                   ) -> list[tuple[list[int], list[int]]]:
    """Encode records; those whose response is truncated away entirely are dropped."""
    prompts = tokenizer([p["prompt"] for p in pairs], add_special_tokens=False)["input_ids"]
    completions = tokenizer([p["completion"] for p in pairs], add_special_tokens=False)["input_ids"]
    out = [encode_example(p, c, tokenizer.eos_token_id, max_length) for p, c in zip(prompts, completions)]
    return [e for e in out if any(t != -100 for t in e[1])]


def load_policy(cfg: SFTConfig) -> tuple[Any, Any]:
    """(trainable model, tokenizer) from ``cfg.model`` in ``cfg.mode``."""
    if not cfg.model:
        raise ConfigError("sft.model is empty: expected a base model folder (e.g. phase 0's output)")
    path = check_model_dir(cfg.model)
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path), mode=cfg.mode, lora=cfg,
                           gradient_checkpointing=cfg.gradient_checkpointing)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        if cfg.mode != "full":
            raise ConfigError(f"{path}: tokenizer has {len(tokenizer)} tokens but the model "
                              f"{model.get_input_embeddings().num_embeddings}; add a pad token with mode 'full'")
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def run(cfg: SFTConfig, output_dir: Path, logger: MetricsLogger, task: Task | None = None,
        checkpoint_dir: Path | None = None, resume: bool = False, **_: Any) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on prompt/completion pairs; save to ``output_dir``.

    Returns the summary: eval_loss_before, eval_loss (mean response-token NLL on held-out pairs),
    train_loss, trainable_params, wall_seconds.
    """
    t0 = time.perf_counter()
    cfg.validate()
    generator = setup_torch(cfg.seed)
    model, tokenizer = load_policy(cfg)
    model = place(model, resolve_device(cfg, PHASE))
    examples = tokenize_pairs(load_pairs(cfg, tokenizer, task), tokenizer, cfg.max_length)
    if len(examples) < 2:
        raise DataError(cfg.data or "embedded task", f"need at least 2 usable SFT records, got {len(examples)}")
    train, held = split_eval(examples, cfg.eval_fraction, cfg.seed)
    pad_id = tokenizer.pad_token_id

    def eval_loss() -> float:
        return eval_lm_loss(model, len(held), 2 * cfg.batch_size, lambda idx: collate([held[i] for i in idx], pad_id))

    def loss_fn(idx: list[int]) -> tuple[torch.Tensor, int]:
        batch = collate([train[i] for i in idx], pad_id)
        nll, n = lm_nll(model, **batch)
        # token-mean over the GLOBAL batch: W·Σ_local/N_global, averaged over W ranks (distributed.py)
        return nll * D.world_size() / max(D.global_count(n), 1), int(batch["attention_mask"].sum())

    before = eval_loss()
    logger.log(PHASE, 0, {"loss/eval": before})
    result = train_loop(model, loss_fn, len(train), cfg, logger, PHASE, generator, checkpoint_dir, resume)
    after = eval_loss()
    logger.log(PHASE, result.steps, {"loss/eval": after})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    save_trained(model, tokenizer, output_dir, merge=cfg.merge_adapter, base_path=cfg.model)
    return {"eval_loss_before": before, "eval_loss": after, "train_loss": result.train_loss,
            "mode": cfg.mode, "trainable_params": trainable, "steps": result.steps,
            "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
            "wall_seconds": time.perf_counter() - t0}
