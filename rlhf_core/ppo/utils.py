"""Masked reductions shared by the PPO math modules.

Every PPO quantity is a (B, T) tensor whose padding must not leak into a statistic. These
helpers reduce over the positions where ``mask`` is 1 only, and stay finite (no NaN) when a
row, or the whole batch, has no valid token.

Convention: ``mask`` is a (B, T) bool/float tensor of 0s and 1s, right-padded; the last 1 of
a row is the EOS token or the truncation point. Padded positions of ``x`` may hold anything
(even NaN or -inf): they are selected away with ``torch.where``, never multiplied by 0,
because ``nan * 0 = nan``.

References: OpenRLHF ``models/utils.py`` (masked_mean), TRL ``core.py`` (masked_var).
"""

from __future__ import annotations

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "last_index"]


def _select(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where mask is 1, exact 0 elsewhere (garbage/NaN in padding cannot leak)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the valid positions.

    Formula: Σ_i m_i·x_i (padding selected away, not multiplied).

    Args:
        x: values, any shape.
        mask: same shape as ``x`` (or broadcastable), 1 where ``x`` counts.
        dim: reduce over this dimension only; ``None`` reduces over everything.

    Shapes: x (B, T), mask (B, T) -> () if dim is None, else x.shape without ``dim``.

    Returns:
        The masked sum, in ``x``'s dtype; 0 where nothing is valid.
    """
    xm = _select(x, mask)  # (B, T)
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the valid positions.

    Formula: Σ_i m_i·x_i / max(Σ_i m_i, 1); the ``max(·, 1)`` makes an all-padding
    reduction return 0 (with zero gradient) instead of 0/0 = NaN.

    Args:
        x: values, any shape.
        mask: same shape as ``x``, 1 where ``x`` counts (0/1 values).
        dim: reduce over this dimension only; ``None`` reduces over everything.

    Shapes: x (B, T), mask (B, T) -> () if dim is None, else x.shape without ``dim``.

    Returns:
        The masked mean in ``x``'s dtype; 0 where no position is valid.
    """
    count = masked_sum(torch.ones_like(x), mask, dim)  # () or (B,)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, dim: int | None = None
) -> torch.Tensor:
    """Variance of ``x`` over the valid positions.

    Formula: with n = Σ m_i and μ = masked_mean(x), var = Σ m_i (x_i − μ)² / n, multiplied
    by n / (n − 1) when ``unbiased`` (Bessel). When n ≤ 1 the Bessel factor is undefined;
    the biased value (0) is returned instead of raising (TRL raises there) so that a batch
    of one token cannot crash a run.

    Args:
        x: values, any shape.
        mask: same shape as ``x``, 1 where ``x`` counts.
        unbiased: apply Bessel's correction n / (n − 1).
        dim: reduce over this dimension only; ``None`` reduces over everything.

    Shapes: x (B, T), mask (B, T) -> () if dim is None, else x.shape without ``dim``.

    Returns:
        The masked variance in ``x``'s dtype; 0 where fewer than 2 positions are valid.
    """
    mean = masked_mean(x, mask, dim)  # () or (B,)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    var = masked_mean((x - mean) ** 2, mask, dim)  # () or (B,)
    if unbiased:
        n = masked_sum(torch.ones_like(x), mask, dim)  # () or (B,)
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1), var)
    return var


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row.

    This is where the sequence-level score goes (the EOS, or the last token of a response
    truncated at the length limit) — not the first pad after it (TRL issues #1893, #3750).

    Args:
        mask: (B, T) bool/float, 1 on valid response tokens.

    Shapes: mask (B, T) -> (B,) int64.

    Returns:
        For each row, the largest t with mask[b, t] = 1, or -1 for a row with no valid token.
    """
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask.bool(), pos, torch.full_like(pos, -1)).amax(dim=-1)  # (B,)
