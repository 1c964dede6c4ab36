"""Phase 2: a scalar reward model trained on preference pairs with the Bradley-Terry loss.

loss = −log σ(r(x, y_chosen) − r(x, y_rejected))   (Stiennon et al. 2020; Ouyang et al. 2022)

The model is ``AutoModelForSequenceClassification(num_labels=1)``: a backbone plus a scalar
``score`` head read at the last non-pad token (HF finds it through ``config.pad_token_id``, so
the pad token must differ from EOS). The input is the text ``prompt + response`` tokenized with
the reward model's own tokenizer (which may differ from the policy's), right padded, with the
EOS appended when the tokenizer has one: ``reward_sources.encode_for_reward``, the encoding PPO's
reward-model scores use too (``reward_sources.reward_scores``).

On the embedded task the held-out pairs are also judged against the gold scorer: the accuracy
that matters is agreement with the true judge, not with the (noisy) labels.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .. import distributed as D, fsdp
from ..config import RewardConfig
from ..data import movie_reviews
from ..data.loaders import load_records
from ..data.tasks import Task
from ..errors import ConfigError, DataError
from ..models import build_reward_model_from_lm, check_model_dir, load_tokenizer, place
from ..ppo.reward_sources import chat_pair, encode_for_reward, reward_forward
from ..tracking import MetricsLogger
from .common import eval_batches, resolve_device, save_trained, setup_torch, split_eval, train_loop

PHASE = "reward"


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss mean(−log σ(r_chosen − r_rejected)); logsigmoid keeps it finite."""
    return -F.logsigmoid(chosen - rejected).mean()


def render_preference(record: dict, tokenizer: Any) -> dict:
    """A conversational preference (``prompt`` a list of turns) as the text the reward model reads:
    ``reward_sources.chat_pair`` for each answer, so training sees the layout PPO scores. Plain
    records are returned as they are."""
    if not isinstance(record["prompt"], list):
        return record
    prompt, chosen = chat_pair(tokenizer, record["prompt"], record["chosen"])
    _, rejected = chat_pair(tokenizer, record["prompt"], record["rejected"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_preferences(cfg: RewardConfig, task: Task | None = None) -> tuple[list[dict[str, str]], Task | None]:
    """(prompt/chosen/rejected records, the task they come from: None for the user's own file)."""
    if cfg.data:
        return list(load_records(cfg.data, "preference")), None
    task = task or movie_reviews.generate_task(seed=cfg.seed)
    return [dict(r) for r in task.preferences], task


def encode_pairs(records: list[dict[str, str]], tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) per record."""
    prompts = [r["prompt"] for r in records]
    chosen = encode_for_reward(tokenizer, prompts, [r["chosen"] for r in records], max_length)
    rejected = encode_for_reward(tokenizer, prompts, [r["rejected"] for r in records], max_length)
    return list(zip(chosen, rejected))


def pair_rewards(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]],
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen and rejected together.  Returns (r_chosen (B,), r_rejected (B,))."""
    r = reward_forward(model, [p[0] for p in pairs] + [p[1] for p in pairs], pad_id)   # (2B,)
    return r[:len(pairs)], r[len(pairs):]


@torch.no_grad()
def evaluate(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], pad_id: int,
             batch_size: int, gold: list[bool | None] | None = None) -> dict[str, float]:
    """Held-out loss, accuracy vs labels (r_chosen > r_rejected), mean margin, and accuracy vs the
    gold judge (``gold[i]``: True when gold prefers chosen, None on a gold tie: not counted).
    Under torchrun each rank scores its share of the batches; the rewards are gathered in pair
    order, so every rank returns exactly the one-process metrics."""
    was_training = model.training
    model.eval()
    rewards = [torch.stack(pair_rewards(model, [pairs[i] for i in idx], pad_id), 1)  # (b, 2)
               for idx in eval_batches(model, len(pairs), batch_size)]  # torchrun: this rank's share
    model.train(was_training)
    both = torch.cat(rewards) if rewards else torch.zeros(0, 2, device=model.device)  # (n_local, 2)
    if not fsdp.is_sharded(model):
        both = D.all_gather_rows(both)  # (n, 2) in pair order: the one-process tensor
    chosen, rejected = both[:, 0], both[:, 1]
    margin = chosen - rejected
    out = {"loss": float(pairwise_loss(chosen, rejected)), "accuracy_labels": float((margin > 0).float().mean()),
           "margin": float(margin.mean())}
    if gold is not None:
        hits = [bool(m > 0) == g for m, g in zip(margin.tolist(), gold) if g is not None]
        out["accuracy_gold"] = sum(hits) / max(len(hits), 1)
    return out


def gold_labels(records: list[dict[str, str]], gold_fn: Callable[[str, str], float]) -> list[bool | None]:
    """Per record: does the gold judge ``gold_fn(prompt, response)`` prefer 'chosen'? (None on a tie)."""
    out: list[bool | None] = []
    for r in records:
        c, j = gold_fn(r["prompt"], r["chosen"]), gold_fn(r["prompt"], r["rejected"])
        out.append(None if c == j else c > j)
    return out


def run(cfg: RewardConfig, output_dir: Path, logger: MetricsLogger, task: Task | None = None,
        checkpoint_dir: Path | None = None, resume: bool = False, **_: Any) -> dict[str, Any]:
    """Train a reward model on preference pairs; save the classifier + its tokenizer to ``output_dir``.

    The data is ``cfg.data`` or, when empty, the task's preferences (default: the movie-review
    task); the held-out pairs of a task are also scored against its gold judge.
    Returns the summary: eval_accuracy (vs gold when a judge is known, else vs labels; named in
    eval_accuracy_against), eval_accuracy_labels, eval_margin, eval_loss, train_loss, wall_seconds.
    """
    t0 = time.perf_counter()
    cfg.validate()
    generator = setup_torch(cfg.seed)
    if not cfg.model:
        raise ConfigError("reward.model is empty: expected a backbone folder (e.g. phase 0's output)")
    path = check_model_dir(cfg.model, "reward backbone")
    tokenizer = load_tokenizer(cfg.tokenizer or str(path))
    model = place(build_reward_model_from_lm(str(path), mode=cfg.mode, lora=cfg, tokenizer=tokenizer),
                  resolve_device(cfg, PHASE))
    records, source = load_preferences(cfg, task)
    records = [render_preference(r, tokenizer) for r in records]
    if len(records) < 2:
        raise DataError(cfg.data or "embedded task", f"need at least 2 preference records, got {len(records)}")
    train_recs, held_recs = split_eval(records, cfg.eval_fraction, cfg.seed)
    train, held = encode_pairs(train_recs, tokenizer, cfg.max_length), encode_pairs(held_recs, tokenizer, cfg.max_length)
    gold = gold_labels(held_recs, source.gold_score) if source is not None else None
    pad_id, eval_bs = tokenizer.pad_token_id, 2 * cfg.batch_size

    def loss_fn(idx: list[int]) -> tuple[torch.Tensor, int]:
        batch = [train[i] for i in idx]
        chosen, rejected = pair_rewards(model, batch, pad_id)
        share = len(idx) * D.world_size() / max(D.global_count(len(idx)), 1)  # pair-mean over the global batch
        return pairwise_loss(chosen, rejected) * share, sum(len(c) + len(r) for c, r in batch)

    def log_eval(step: int) -> dict[str, float]:
        ev = evaluate(model, held, pad_id, eval_bs, gold)
        logger.log(PHASE, step, {"loss/eval": ev["loss"], "eval/accuracy": ev.get("accuracy_gold", ev["accuracy_labels"]),
                                 "eval/accuracy_labels": ev["accuracy_labels"], "eval/margin": ev["margin"]})
        return ev

    before = log_eval(0)
    result = train_loop(model, loss_fn, len(train), cfg, logger, PHASE, generator, checkpoint_dir, resume)
    ev = log_eval(result.steps)
    save_trained(model, tokenizer, output_dir, merge=True)
    return {"eval_accuracy": ev.get("accuracy_gold", ev["accuracy_labels"]),
            "eval_accuracy_against": "gold" if gold is not None else "labels",
            "eval_accuracy_labels": ev["accuracy_labels"], "eval_margin": ev["margin"], "eval_loss": ev["loss"],
            "eval_accuracy_before": before.get("accuracy_gold", before["accuracy_labels"]),
            "train_loss": result.train_loss, "steps": result.steps,
            "tokens_per_s": result.tokens / max(result.seconds, 1e-9), "wall_seconds": time.perf_counter() - t0}
