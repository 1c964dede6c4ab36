"""RolloutBuffer: holds one PPO iteration's experience and serves shuffled minibatches.

Gradient accumulation rule (why ``accumulation_weights`` exists): with token-mean losses,
averaging micro-batch losses (or summing them scaled by 1/num_micro) is *not* the minibatch
token-mean when micro-batches hold different numbers of valid tokens — a known source of
silent drift (HF transformers' gradient-accumulation loss bug, Oct 2024). Scaling micro-batch
k's loss by w_k = n_k / N (valid tokens in k over valid tokens in the minibatch) and summing
the backward passes reproduces the full-minibatch gradient exactly:
    Σ_k w_k · (Σ_{i∈k} ℓ_i / n_k) = Σ_i ℓ_i / N.
For the other aggregations n_k counts what their denominator counts (``losses.aggregation_units``):
the rows with a valid token (seq-mean-token-mean), the rows (seq-mean-token-sum-norm).

The trainer gets the same result the other way round: each micro-batch's terms are divided by the whole
minibatch's count directly (``objective.Denominators``, ``losses.aggregate(units=...)``), so no weights are
needed. ``accumulation_weights`` serves a loop whose micro-batch losses are each aggregated on their own.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .experience import Experience
from .losses import aggregation_units

__all__ = ["RolloutBuffer", "micro_batches", "accumulation_weights"]


def micro_batches(exp: Experience, micro_batch_size: int) -> Iterator[Experience]:
    """Split a minibatch into consecutive micro-batches of ``micro_batch_size`` rows.

    The last micro-batch is smaller when the size does not divide; pair with
    ``accumulation_weights`` so that the accumulated gradient is still exact.

    Raises:
        ValueError: micro_batch_size < 1.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    for start in range(0, len(exp), micro_batch_size):
        yield exp.index(slice(start, start + micro_batch_size))


def accumulation_weights(
    mask: torch.Tensor, micro_batch_size: int, aggregation: str = "token-mean"
) -> list[float]:
    """Loss scales for gradient accumulation over ``micro_batches(exp, micro_batch_size)``.

    Formula: w_k = n_k / N, n_k = Σ over micro-batch k of ``losses.aggregation_units`` (valid
    tokens for token-mean, rows with ≥ 1 valid token for seq-mean-token-mean, rows for
    seq-mean-token-sum-norm), N = Σ_k n_k. Then Σ_k w_k·loss_k has the same value and
    gradient as the loss over the whole minibatch. All weights are 0 when N = 0 (every
    micro loss is then 0 with zero gradient anyway).

    Args:
        mask: (B, T) the minibatch's mask.
        micro_batch_size: rows per micro-batch, as passed to ``micro_batches``.
        aggregation: the aggregation the losses use (``losses.AGGREGATIONS``).

    Shapes: mask (B, T) -> list of ceil(B / micro_batch_size) floats.
    """
    per_row = aggregation_units(mask, aggregation)  # (B,)
    counts = [int(c.sum()) for c in per_row.split(micro_batch_size)]
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


class RolloutBuffer:
    """Experience of one PPO iteration; ``minibatches`` shuffles it once per call (epoch)."""

    def __init__(self, experiences: Sequence[Experience] = ()) -> None:
        self._parts: list[Experience] = list(experiences)
        self._merged: Experience | None = None

    def add(self, exp: Experience) -> None:
        """Append a batch of rollouts (e.g. one per generation batch)."""
        self._parts.append(exp)
        self._merged = None

    def clear(self) -> None:
        """Drop everything (call after each PPO iteration)."""
        self._parts.clear()
        self._merged = None

    def __len__(self) -> int:
        return sum(len(e) for e in self._parts)

    @property
    def experience(self) -> Experience:
        """All rows as one Experience (concatenated once, cached until the next add/clear)."""
        if self._merged is None:
            self._merged = Experience.cat(self._parts)
        return self._merged

    def minibatches(self, num_mini_batches: int, generator: torch.Generator) -> Iterator[Experience]:
        """Yield ``num_mini_batches`` minibatches of a seeded random permutation of the rows.

        Every row appears exactly once per call; the same generator state gives the same split.

        Args:
            num_mini_batches: how many minibatches; must divide the number of rows.
            generator: a CPU ``torch.Generator`` (seed it once per run for reproducibility).

        Raises:
            ValueError: empty buffer, or the row count not divisible by ``num_mini_batches``.
        """
        n = len(self)
        if n == 0 or num_mini_batches < 1 or n % num_mini_batches != 0:
            raise ValueError(
                f"cannot split {n} rollouts into {num_mini_batches} equal minibatches "
                "(the batch size must be a positive multiple of num_mini_batches)"
            )
        exp = self.experience
        perm = torch.randperm(n, generator=generator, device=generator.device)  # (n,)
        for chunk in perm.split(n // num_mini_batches):
            yield exp.index(chunk)

    micro_batches = staticmethod(micro_batches)
