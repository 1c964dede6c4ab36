"""The optimizer plumbing every phase shares: the LR schedule and the guarded step.

One copy of each rule, used by the supervised loop (``phases/common.py``) and by PPO
(``ppo/trainer.py``):
- :func:`lr_factor`: linear warm-up, then constant / linear / cosine decay to 0 at ``total``.
- :func:`finish_step`: after the backward, clip and step — unless the loss was non-finite on
  some rank or the global gradient norm is; then the step is skipped with weights, optimizer
  state and schedule untouched (every rank decides alike).
- :func:`count_skip`: too many skipped steps in a row stop the run with one clear line (the last
  checkpoint stays intact, since the error comes before the next one is written).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import distributed as D, fsdp
from .errors import NumericError

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step (``torch.optim.lr_scheduler.LambdaLR``'s lambda).

    Formula: (s + 1)/warmup for s < warmup; then, with d = min(1, (s − warmup)/max(1, total − warmup)):
    constant 1, linear max(0, (total − s)/max(1, total − warmup)) (= 1 − d), cosine ½(1 + cos πd).

    Raises:
        ValueError: unknown ``schedule``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    span = max(1, total - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "linear":
            return max(0.0, (total - step) / span)
        done = min(1.0, (step - warmup) / span)
        return 1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * done))

    return factor


def make_optimizer(params: Sequence[nn.Parameter], lr: float, weight_decay: float, schedule: str, warmup: int,
                   total: int, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   decay_1d: bool = True, fused: bool | None = None
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` and its :func:`lr_factor` schedule over ``total`` steps.

    ``decay_1d=False`` exempts 1-d tensors (biases, norms) from weight decay. ``fused``: one
    kernel over all tensors instead of ~10 ops per tensor (CPU and CUDA; not for FSDP2 shards).
    """
    params = list(params)
    groups = ([{"params": params, "weight_decay": weight_decay}] if decay_1d else
              [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
               {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}])
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(schedule, warmup, total))


def can_fuse(params: Sequence[nn.Parameter]) -> bool:
    """Whether AdamW's fused kernel takes ``params``: floating CPU/CUDA tensors, no FSDP2 shards."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and not D.is_dtensor(p) for p in params)


def finish_step(params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                max_grad_norm: float, finite: bool = True) -> torch.Tensor | None:
    """The rest of an optimizer step once the backward (and any gradient reduction) is done.

    Clips the global gradient norm to ``max_grad_norm`` (0: no clipping; FSDP2 shards and
    replicated parameters counted once, :func:`rlhf_core.fsdp.clip_grad_norm`) and steps the
    optimizer and the schedule. When ``finite`` is False on any rank (a collective) or the norm is
    not finite, drops the gradients instead: weights, optimizer state and schedule stay untouched.

    Returns:
        The gradient norm before clipping, or None when the step was skipped.
    """
    finite = D.global_count(0 if finite else 1) == 0  # any rank non-finite: every rank skips
    norm = fsdp.clip_grad_norm(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if not finite or not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    scheduler.step()
    return norm


def count_skip(stepped: bool, skipped: int, in_row: int, limit: int, where: str) -> tuple[int, int]:
    """Update the (total, in a row) skipped-step counters; raise NumericError at ``limit`` in a row.

    Args:
        stepped: whether :func:`finish_step` stepped.
        where: how the error names the step (e.g. "sft step 5", "ppo iteration 4").
    """
    if stepped:
        return skipped, 0
    skipped, in_row = skipped + 1, in_row + 1
    if in_row >= limit:
        raise NumericError(f"{where}: {in_row} optimizer steps in a row had a non-finite loss or gradient; "
                           "stopped before writing another checkpoint")
    return skipped, in_row
