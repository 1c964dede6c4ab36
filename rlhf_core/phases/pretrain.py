"""Phase 0: causal-LM pretraining on raw domain text.

Documents are tokenized, joined with an EOS after each one and cut into fixed ``block_size``
blocks (HF ``run_clm.py``'s ``group_texts``: the remainder is dropped, so no padding and every
position carries a loss). A seeded fraction of blocks is held out; perplexity = exp(mean token
NLL) on them is measured before and after training.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import distributed as D
from ..config import PretrainConfig, TinyModelConfig
from ..data import movie_reviews
from ..data.loaders import load_records
from ..data.tasks import Task
from ..data.tokenizer import train_tokenizer
from ..errors import ConfigError, DataError
from ..models import build_tiny_model, check_model_dir, load_causal_lm, load_tokenizer, place
from ..tracking import MetricsLogger
from .common import eval_lm_loss, lm_nll, resolve_device, save_trained, setup_torch, split_eval, train_loop

PHASE = "pretrain"


def group_texts(token_lists: Sequence[Sequence[int]], block_size: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate documents (each followed by ``eos_id`` when given) and cut the stream into
    ``block_size`` blocks, dropping the remainder.  Returns (N_blocks, block_size) long."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[:n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def load_texts(cfg: PretrainConfig, task: Task | None = None) -> list[str]:
    """The corpus: ``cfg.data`` (records with a 'text' field) or the task's (default: movie reviews)."""
    if cfg.data:
        records = load_records(cfg.data, "text")
        return [r["text"] if isinstance(r, dict) else str(r) for r in records]
    task = task or movie_reviews.generate_task(seed=cfg.seed)
    return list(task.corpus)


def model_and_tokenizer(cfg: PretrainConfig, model_cfg: TinyModelConfig, texts: list[str]) -> tuple[Any, Any]:
    """'tiny': a tokenizer trained on ``texts`` (or ``cfg.tokenizer``) and a random-init model;
    otherwise the model folder (and its tokenizer unless ``cfg.tokenizer`` names another)."""
    if cfg.model == "tiny":
        if cfg.tokenizer:
            tokenizer = load_tokenizer(cfg.tokenizer)
        else:
            tokenizer = train_tokenizer(texts, vocab_size=model_cfg.vocab_size)
        return build_tiny_model(tokenizer, model_cfg, seed=cfg.seed), tokenizer
    path = check_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.tokenizer or str(path))
    model = load_causal_lm(str(path))
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def run(cfg: PretrainConfig, output_dir: Path, logger: MetricsLogger,
        model_cfg: TinyModelConfig | None = None, task: Task | None = None,
        checkpoint_dir: str | Path | None = None, resume: bool = False, **_: Any) -> dict[str, Any]:
    """Train a causal LM on the corpus and save it (safetensors + tokenizer) to ``output_dir``.

    Returns the summary: eval_perplexity_before, eval_perplexity, train_loss, tokens, wall_seconds.
    """
    t0 = time.perf_counter()
    cfg.validate()
    generator = setup_torch(cfg.seed)
    texts = load_texts(cfg, task)
    if not texts:
        raise DataError(cfg.data or "embedded task", "no text records to pretrain on")
    model, tokenizer = model_and_tokenizer(cfg, model_cfg or TinyModelConfig(), texts)
    model = place(model, resolve_device(cfg, PHASE))
    max_pos = getattr(model.config, "max_position_embeddings", cfg.block_size)
    if cfg.block_size > max_pos:
        raise ConfigError(f"pretrain.block_size={cfg.block_size}: expected <= the model's "
                          f"max_position_embeddings={max_pos}")

    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks = group_texts(ids, cfg.block_size, tokenizer.eos_token_id)      # (N, block_size)
    if len(blocks) < 2:
        raise DataError(cfg.data or "embedded task", f"corpus too small: {len(blocks)} block(s) "
                        f"of {cfg.block_size} tokens, need at least 2")
    train_idx, eval_idx = split_eval(list(range(len(blocks))), cfg.eval_fraction, cfg.seed)
    train_blocks, eval_blocks = blocks[train_idx], blocks[eval_idx]

    def collate(blocks_: torch.Tensor, idx: list[int]) -> dict[str, torch.Tensor]:
        x = blocks_[idx]                                                    # (B, block_size)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}

    def eval_ppl() -> float:
        return math.exp(eval_lm_loss(model, len(eval_blocks), 2 * cfg.batch_size,
                                     lambda idx: collate(eval_blocks, idx)))

    def loss_fn(idx: list[int]) -> tuple[torch.Tensor, int]:
        nll, n = lm_nll(model, **collate(train_blocks, idx))
        # token-mean over the GLOBAL batch (W·Σ_local/N_global, averaged over W ranks): exact even
        # when the ranks hold different numbers of blocks; nll / n in one process
        return nll * D.world_size() / max(D.global_count(n), 1), len(idx) * cfg.block_size

    ppl_before = eval_ppl()
    logger.log(PHASE, 0, {"eval/perplexity": ppl_before})
    result = train_loop(model, loss_fn, len(train_blocks), cfg, logger, PHASE, generator, checkpoint_dir, resume)
    ppl = eval_ppl()
    logger.log(PHASE, result.steps, {"eval/perplexity": ppl, "loss/eval": math.log(ppl)})
    save_trained(model, tokenizer, output_dir)  # rank 0 writes, every rank waits
    return {"eval_perplexity_before": ppl_before, "eval_perplexity": ppl, "train_loss": result.train_loss,
            "tokens": result.tokens, "blocks_train": len(train_blocks), "blocks_eval": len(eval_blocks),
            "steps": result.steps, "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
            "wall_seconds": time.perf_counter() - t0}
