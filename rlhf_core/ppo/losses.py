"""PPO losses. Each returns ``(loss, stats)``; stats are computed once, here, next to the loss.

References:
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347): the
  clipped surrogate, eq. 7.
- Huang et al. 2022, "The 37 Implementation Details of PPO" and "The N+ Implementation
  Details of RLHF with PPO" (2024): value clipping, clipfrac, the k3 approx_kl diagnostic.

Stats are detached 0-dim tensors (call ``.item()`` once per step when logging) and always
masked: summarize_from_feedback_details overwrote its pg_clipfrac with an unmasked value; TRL
averaged unwritten zero slots into its metrics (#7012). Names follow STYLE.md.

Aggregations (``aggregation=``):
- "token-mean": mean over all valid tokens of the minibatch (default; long responses weigh
  more, the convention of Dr. GRPO / TRL / CleanRL-style PPO-RLHF).
- "seq-mean-token-mean": mean over tokens within each row, then over the rows that have at
  least one valid token.
- "seq-mean-token-sum-norm": the sum over every valid token divided by (rows × L) with L a
  constant, the generation budget ``max_length`` (Dr. GRPO, Liu et al. 2025, "Understanding
  R1-Zero-Like Training": no per-response length normalisation, so no length bias).

The trainer accumulates micro-batches and ranks with the weights ``aggregation_units`` gives, so
every aggregation's gradient is the same for any micro-batch size and world size (buffer.py).

Imports only torch.
"""

from __future__ import annotations

from typing import Callable

import torch

from .utils import masked_mean, masked_var

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "aggregation_units",
    "policy_loss",
    "value_loss",
    "entropy_bonus",
    "kl_penalty_loss",
    "explained_variance",
    "first_step_invariants",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")


def aggregate(x: torch.Tensor, mask: torch.Tensor, aggregation: str = "token-mean",
              max_length: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    Formula: token-mean = Σ m·x / Σ m; seq-mean-token-mean = (1/|S|) Σ_{b∈S} Σ_t m·x / Σ_t m,
    S = rows with at least one valid token; seq-mean-token-sum-norm = Σ m·x / (B·L), B the rows,
    L = ``max_length`` (default T, the padded width). Each is 0 (with zero gradient) on an empty mask.

    Args:
        x: per-token values.
        mask: 1 on valid tokens.
        aggregation: one of ``AGGREGATIONS``.
        max_length: L of seq-mean-token-sum-norm: a constant (the trainer passes
            ``ppo.response_length``), so that every micro-batch divides by the same number.

    Shapes: x (B, T), mask (B, T) -> ().

    Raises:
        ValueError: unknown ``aggregation``.
    """
    _check_aggregation(aggregation)
    if aggregation == "token-mean":
        return masked_mean(x, mask)
    if aggregation == "seq-mean-token-mean":
        row_mean = masked_mean(x, mask, dim=-1)  # (B,)
        nonempty = mask.bool().any(dim=-1)  # (B,)
        return masked_mean(row_mean, nonempty)
    rows, length = x.shape[0], max_length or x.shape[-1]
    total = torch.where(mask.bool(), x, torch.zeros_like(x)).sum()  # ()
    return total / max(rows * length, 1)


def aggregation_units(mask: torch.Tensor, aggregation: str = "token-mean") -> torch.Tensor:
    """What each row counts for in ``aggregate``'s denominator: its valid tokens (token-mean),
    1 if it has any valid token (seq-mean-token-mean), 1 (seq-mean-token-sum-norm, whose L is a
    constant).

    Σ over a micro-batch's rows / Σ over the minibatch's is that micro-batch's share of the
    minibatch loss (``buffer.accumulation_weights``, and each rank's share under torchrun).

    Shapes: mask (B, T) -> (B,) int64.
    """
    _check_aggregation(aggregation)
    valid = mask.bool()
    if aggregation == "token-mean":
        return valid.sum(dim=-1)
    if aggregation == "seq-mean-token-mean":
        return valid.any(dim=-1).long()
    return torch.ones(mask.shape[0], dtype=torch.long, device=mask.device)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    aggregation: str = "token-mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate policy loss (to minimise).

    Formula: ρ_t = exp(logprobs_t − old_logprobs_t),
        loss = aggregate(max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε))), ε = clip_range.

    Convention: ``aggregation="token-mean"`` averages over all valid tokens of the minibatch.
    On padding the log-ratio is set to 0 before exp, so garbage log-probs there (−inf, NaN)
    cannot produce NaN values or gradients.

    Args:
        logprobs: log π_θ(a_t|s_t) under the current parameters (requires grad).
        old_logprobs: log π_old(a_t|s_t) recorded at rollout.
        advantages: A_t (usually whitened); not differentiated.
        mask: 1 on valid response tokens.
        clip_range: ε.
        aggregation, max_length: see ``aggregate``.

    Shapes: logprobs, old_logprobs, advantages, mask (B, T) -> loss ().

    Returns:
        loss: scalar.
        stats: "loss/policy"; "policy/clipfrac" = masked fraction of tokens where the clipped
            branch is strictly larger (so its gradient is 0); "policy/approx_kl" = masked mean
            of k3 = (ρ − 1) − log ρ, an estimate of KL(π_old‖π_θ) on tokens sampled from π_old;
            "policy/ratio" = masked mean of ρ.
    """
    valid = mask.bool()  # (B, T)
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = torch.where(valid, advantages, torch.zeros_like(advantages)).detach()  # (B, T)
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    loss = aggregate(per_token, mask, aggregation, max_length)
    with torch.no_grad():
        stats = {
            "loss/policy": loss.detach(),
            "policy/clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "policy/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "policy/ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None,
    aggregation: str = "token-mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (to minimise).

    Formula: V_clip = clip(V, V_old − ε_v, V_old + ε_v),
        loss = ½·aggregate(max((V − R)², (V_clip − R)²)), ε_v = clip_range;
    with ``clip_range=None`` the loss is ½·aggregate((V − R)²).

    Convention: the max makes the loss pessimistic, as in OpenAI baselines / TRL; token-mean
    by default. Padding contributes nothing (selected away, so no NaN from garbage there).

    Args:
        values: V_θ(s_t) under the current parameters (requires grad).
        old_values: V(s_t) recorded at rollout.
        returns: the targets R_t (from ``compute_gae``); not differentiated.
        mask: 1 on valid response tokens.
        clip_range: ε_v, or None for no clipping.
        aggregation, max_length: see ``aggregate``.

    Shapes: values, old_values, returns, mask (B, T) -> loss ().

    Returns:
        loss: scalar.
        stats: "loss/value"; "val/clipfrac" = masked fraction where the clipped loss is
            strictly larger; "val/mean" = masked mean of V; "val/error" = masked mean of (V − R)².
    """
    valid = mask.bool()  # (B, T)
    zero = torch.zeros_like(values)
    values_m = torch.where(valid, values, zero)  # (B, T)
    old = torch.where(valid, old_values, zero).detach()  # (B, T)
    target = torch.where(valid, returns, zero).detach()  # (B, T)
    loss_unclipped = (values_m - target).square()  # (B, T)
    if clip_range is None:
        loss_clipped = loss_unclipped
    else:
        v_clipped = old + (values_m - old).clamp(-clip_range, clip_range)  # (B, T)
        loss_clipped = (v_clipped - target).square()  # (B, T)
    per_token = torch.maximum(loss_unclipped, loss_clipped)  # (B, T)
    loss = 0.5 * aggregate(per_token, mask, aggregation, max_length)
    with torch.no_grad():
        stats = {
            "loss/value": loss.detach(),
            "val/clipfrac": masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask),
            "val/mean": masked_mean(values_m, mask),
            "val/error": masked_mean(loss_unclipped, mask),
        }
    return loss, stats


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, aggregation: str = "token-mean", max_length: int | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean policy entropy over valid tokens; the trainer subtracts ent_coef times it.

    Formula: H = aggregate(entropy_t), entropy_t = −Σ_a π(a|s_t) log π(a|s_t)
    (per token, e.g. from ``kernels.fused_logprobs(..., return_entropy=True)``).

    Shapes: entropy (B, T), mask (B, T) -> ().

    Returns:
        bonus: scalar mean entropy (differentiable); stats: {"policy/entropy"}.
    """
    bonus = aggregate(entropy, mask, aggregation, max_length)
    return bonus, {"policy/entropy": bonus.detach()}


def kl_penalty_loss(
    kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, aggregation: str = "token-mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KL penalty as a loss term (to minimise), differentiated through ``kl``.

    Formula: loss = kl_coef·aggregate(kl_t), with kl_t computed under the current parameters:
    an estimator of the sampled tokens (k1/k2/k3 from logprobs with grad; k3 is GRPO's
    placement) or the exact per-state KL (``kernels.fused_kl``, whose backward gives its gradient).
    Which of these trains the objective E[score] − β·KL(π‖π_ref) without bias is in docs/kl.md.

    Shapes: kl (B, T) with grad, mask (B, T) -> loss ().

    Returns:
        loss: scalar; stats: {"loss/kl": the aggregated KL (not multiplied by kl_coef)}.
    """
    mean_kl = aggregate(kl, mask, aggregation, max_length)
    return kl_coef * mean_kl, {"loss/kl": mean_kl.detach()}


def first_step_invariants(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
                          ) -> tuple[float, float]:
    """(Σ |log ρ_t|, max |ρ_t − 1|) over valid tokens: on the first minibatch of an iteration no weight has
    moved, so both must be ~0 (``check/logprob_gap`` = the sum over the minibatch's tokens,
    ``check/first_ratio_dev`` = the max; rlhf_core/checks.py).

    Shapes: (B, T) each -> two floats.
    """
    with torch.no_grad():
        log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
        dev = float(torch.expm1(log_ratio).abs().max()) if log_ratio.numel() else 0.0
        return float(log_ratio.abs().sum()), dev


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       variance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                       ) -> torch.Tensor:
    """How much of the variance of the returns the value head explains.

    Formula: 1 − Var[R − V] / Var[R] over valid tokens (1 = perfect, 0 = no better than the
    mean, < 0 = worse). Logged as "val/explained_variance".

    Convention: returns 0 when Var[R] = 0 (undefined; CleanRL logs NaN there) so that logs
    stay finite.

    ``variance(x, mask)``: the population variance over valid tokens, by default of this batch
    (``masked_var(unbiased=False)``); the trainer passes the global one under torchrun
    (``distributed.global_masked_moments``), so the result is that of the whole global batch.

    Shapes: values (B, T), returns (B, T), mask (B, T) -> () detached.
    """
    var = variance or (lambda x, m: masked_var(x, m, unbiased=False))
    with torch.no_grad():
        var_r = var(returns, mask)  # ()
        var_err = var(returns - values, mask)  # ()
        ev = 1.0 - var_err / var_r.clamp_min(torch.finfo(var_r.dtype).tiny)
        return torch.where(var_r > 0, ev, torch.zeros_like(ev))
