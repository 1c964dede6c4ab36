"""Training-loop plumbing shared by the supervised phases (pretrain, SFT, reward model).

The loops stay plain PyTorch: AdamW, linear warm-up then linear decay to 0, gradient clipping,
seeded shuffling, tokens/s next to the loss (nanoGPT habit). Each phase supplies one function
``loss_fn(indices) -> (loss, n_tokens)``; everything else (batches, logging, progress, evaluation,
checkpoints and exact resume) lives here. The optimizer, the LR schedule and the rule for
non-finite steps are ``rlhf_core/optim.py``'s, shared with PPO.
"""
from __future__ import annotations

import itertools
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .. import distributed as D, fsdp
from ..checkpoint import capture_state, load_for_resume, restore_state, save_checkpoint
from ..config import TrainCommon
from ..data.batching import chunks
from ..errors import ConfigError
from ..models import module_device, save_model
from ..optim import count_skip, finish_step, make_optimizer
from ..tracking import MetricsLogger, progress
from .. import precision, signals
from ..precision import check_bf16


def num_threads() -> int:
    """Intra-op threads: ``RLHF_NUM_THREADS`` if set, else every core — but 1 on a <= 2-core machine.

    OpenMP workers spin at every op's barrier; when another process takes one of only two cores,
    each op waits for the descheduled worker (measured here: 2 threads 0.43 s/step vs 1 thread
    0.021 s on a busy 2-core VM, while an idle one gains only 1.3x from the second thread).
    """
    if os.environ.get("RLHF_NUM_THREADS"):
        return max(1, int(os.environ["RLHF_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if cores > 2 else 1


def setup_torch(seed: int) -> torch.Generator:
    """Seed python/torch, use every core this process may run on; return a seeded CPU generator."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads())
    return torch.Generator().manual_seed(seed)


def resolve_device(cfg: Any, phase: str) -> torch.device:
    """``cfg.device`` ('auto' | 'cuda' | 'cpu') as this rank's torch device; one-line ConfigError
    when a GPU is asked for and torch sees none, or bf16 on a device without it (``precision.check_bf16``)."""
    try:
        device = D.device(cfg.device)
    except D.DistributedError as e:
        raise ConfigError(f"{phase}.device: {e}") from None
    if getattr(cfg, "mixed_precision", "no") == "bf16":
        check_bf16(device, f"{phase}.mixed_precision")
    return device


def split_eval(items: Sequence[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded shuffle, then hold out ``ceil(eval_fraction * n)`` items (at least 1, at most n-1)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, math.ceil(eval_fraction * len(items))), max(len(items) - 1, 0))
    held = [items[i] for i in order[:n_eval]]
    return [items[i] for i in order[n_eval:]], held


def num_training_steps(n_train: int, cfg: TrainCommon) -> int:
    """Optimizer steps for ``cfg.epochs`` passes over ``n_train`` items, capped by ``cfg.max_steps``."""
    steps = max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))
    return min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps


def batch_indices(n: int, batch_size: int, total_steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """``total_steps`` batches of indices into ``n`` items; a fresh permutation each epoch,
    the short tail of an epoch is dropped so every step sees ``min(batch_size, n)`` items."""
    bs = min(batch_size, n)
    produced = 0
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - bs + 1, bs):
            if produced == total_steps:
                return
            produced += 1
            yield perm[start:start + bs]


def lm_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labels != -100, and the number of such tokens.

    Shapes: input_ids, attention_mask, labels (B, T); position t predicts labels[:, t+1].
    """
    dev = module_device(model)
    logits = model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev)).logits[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:].to(dev)                                                  # (B, T-1)
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                            targets.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, int((targets != -100).sum())


def eval_batches(model: nn.Module, n: int, batch_size: int) -> list[list[int]]:
    """This rank's evaluation batches: a contiguous share of ``chunks(n, batch_size)`` under
    torchrun (all of them for an FSDP2 model, whose every forward is a collective). The batches
    themselves are the one-process ones, so each one's result is bitwise the same."""
    batches = list(chunks(n, batch_size))
    return batches if fsdp.is_sharded(model) else list(D.shard(batches))


@torch.no_grad()
def eval_lm_loss(model: nn.Module, n: int, batch_size: int,
                 collate: Callable[[list[int]], dict[str, torch.Tensor]]) -> float:
    """Mean token NLL over ``n`` items collated by ``collate(indices)`` (model put back in train mode).

    Under torchrun the batches are split over ranks (:func:`eval_batches`) and their sums gathered
    and added in batch order: every rank returns exactly the one-process value.
    """
    was_training = model.training
    model.eval()
    sums = []
    for idx in eval_batches(model, n, batch_size):
        nll, k = lm_nll(model, **collate(idx))
        sums.append([float(nll), k])
    if not fsdp.is_sharded(model):
        sums = D.all_gather_rows(torch.tensor(sums, dtype=torch.float64).reshape(-1, 2)).tolist()
    model.train(was_training)
    total, count = 0.0, 0
    for nll, k in sums:
        total, count = total + nll, count + int(k)
    return total / max(count, 1)


def save_trained(model: nn.Module, tokenizer: Any, output_dir: str | Path, **save_kwargs: Any) -> None:
    """Rank 0 saves ``model`` + ``tokenizer`` (``models.save_model``, atomic); every rank calls this
    and waits until it is written. An FSDP2 model is first gathered into a full state dict on
    rank 0's CPU (a collective) and saved from it (full models only: fsdp2 refuses LoRA)."""
    state = fsdp.full_state_dict(model) if fsdp.is_sharded(model) else None  # {} on the other ranks
    if D.is_main():
        save_model(model, tokenizer, output_dir, state_dict=state, **save_kwargs)
    D.barrier()


@dataclass
class LoopResult:
    """What a training loop reports: mean loss over its last logging window, steps, tokens, seconds."""
    train_loss: float
    steps: int
    tokens: int
    seconds: float


def _resume_loop(checkpoint_dir: Any, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, sched: Any,
                 cfg: TrainCommon) -> dict[str, Any] | None:
    """Load the newest valid checkpoint into params/optimizer/schedule/RNGs; its loop counters (None: none)."""
    found = load_for_resume(checkpoint_dir, cfg.to_dict(), f"{cfg._section}.", type(cfg)().to_dict())
    if found is None:
        return None
    restore_state(*found, params, opt, sched, {})
    return found[1]["loop"]


def train_loop(model: nn.Module, loss_fn: Callable[[list[int]], tuple[torch.Tensor, int]],
               n_train: int, cfg: TrainCommon, logger: MetricsLogger, phase: str,
               generator: torch.Generator, checkpoint_dir: str | Path | None = None,
               resume: bool = False) -> LoopResult:
    """Run AdamW over seeded batches of ``n_train`` items until the step budget is spent.

    ``loss_fn(indices)`` returns (mean loss of the batch, tokens processed); metrics
    ``loss/train``, ``lr``, ``perf/tokens_per_s``, ``perf/skipped_steps`` are logged every
    ``cfg.log_every`` steps. A non-finite loss or gradient skips the step (weights, optimizer and
    schedule untouched); ``cfg.max_skipped_steps`` in a row raise NumericError. With
    ``checkpoint_dir`` a checkpoint is written every ``cfg.save_every`` steps and at the end;
    ``resume`` loads the newest valid one first, and the batch order is replayed from the seeded
    ``generator`` (used only here), so the resumed loop sees the batches the first run would have.
    With ``cfg.parallel == "fsdp2"`` under torchrun, ``model`` is sharded in place here (evaluate
    it on every rank afterwards; save it with :func:`save_trained`).
    """
    total = num_training_steps(n_train, cfg)
    if cfg.parallel == "fsdp2":  # in place, before the optimizer sees the (now sharded) parameters
        fsdp.wrap_fsdp2(model, mixed_precision_bf16=cfg.mixed_precision == "bf16")
        if D.world_size() == 1:
            warnings.warn(f"{phase}.parallel='fsdp2' without torchrun: one process trains the whole model "
                          "unsharded, in fp32", stacklevel=2)
    sharded = fsdp.is_sharded(model)
    opt, sched = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.learning_rate,
                                cfg.weight_decay, "linear", int(cfg.warmup_ratio * total), total,
                                betas=(0.9, 0.95), decay_1d=False)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    model.train()
    loop = {"step": 0, "tokens": 0, "skipped": 0, "in_row": 0, "window": [], "tail": []}
    if resume and checkpoint_dir is not None:
        loop = _resume_loop(Path(checkpoint_dir), named, opt, sched, cfg) or loop
    t0 = last_log = time.perf_counter()
    window_tokens = 0
    batches = itertools.islice(batch_indices(n_train, cfg.batch_size, total, generator), loop["step"], None)
    for step, idx in enumerate(progress(batches, total=total - loop["step"], desc=phase), start=loop["step"] + 1):
        # torchrun: each rank takes its contiguous shard of the global batch (rlhf_core/distributed.py)
        with precision.autocast(cfg, module_device(model)):  # bf16 forward on one device (mixed_precision)
            loss, n_tok = loss_fn(list(D.shard(idx)))
        n_tok = int(D.global_count(n_tok))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not sharded:  # FSDP2's backward already reduce-scattered the mean over ranks
            D.all_reduce_gradients(params, average=True)  # DDP's mean over ranks; no-op in one process
        stepped = finish_step(params, opt, sched, cfg.max_grad_norm, bool(torch.isfinite(loss))) is not None
        loop["skipped"], loop["in_row"] = count_skip(stepped, loop["skipped"], loop["in_row"],
                                                     cfg.max_skipped_steps, f"{phase} step {step}")
        if stepped:
            loop["window"].append(D.reduce_metrics({"loss": float(loss.detach())})["loss"])
        loop["step"], loop["tokens"], window_tokens = step, loop["tokens"] + n_tok, window_tokens + n_tok
        if step % cfg.log_every == 0 or step == total:
            now = time.perf_counter()
            logger.log(phase, step, {"loss/train": sum(loop["window"]) / max(len(loop["window"]), 1),
                                     "lr": sched.get_last_lr()[0], "perf/skipped_steps": loop["skipped"],
                                     "perf/tokens_per_s": window_tokens / max(now - last_log, 1e-9)})
            loop["tail"], loop["window"], window_tokens, last_log = loop["window"], [], 0, now
        stop = signals.stop_requested()  # SIGTERM: checkpoint this step, then stop (every rank alike)
        due = stop or step == total or (cfg.save_every > 0 and step % cfg.save_every == 0)
        if checkpoint_dir is not None and due:
            tensors, meta = capture_state(named, opt, sched, {})  # every rank: gathers per-rank RNG states
            if D.is_main():
                save_checkpoint(checkpoint_dir, step, tensors, {**meta, "config": cfg.to_dict(), "loop": loop},
                                keep=cfg.keep_checkpoints)
        if stop and step < total:
            raise signals.preempted(phase, step, checkpoint_dir)
    tail = loop["tail"]
    return LoopResult(train_loss=sum(tail) / max(len(tail), 1), steps=total, tokens=loop["tokens"],
                      seconds=time.perf_counter() - t0)
