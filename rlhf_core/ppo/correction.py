"""Rollout correction: importance weights for tokens a behavior policy μ sampled, trained as if π_old had.

Three policies stay apart: μ (what generated the tokens: the rollout engine's logprobs,
``Experience.behavior_logprobs``), π_old (the trainer's own forward before the update,
``Experience.logprobs``) and π_θ (being trained). PPO's ratio π_θ/π_old accounts for the update; the
rollout correction accounts for the sampling: a weight w, detached and computed once per rollout from
π_old and μ, multiplies each token's policy-loss term (objective.py). With a separate inference engine
(vLLM, SGLang) or a different precision μ ≠ π_old, and uncorrected PPO then follows E_μ, not E_π
(Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").

The importance ratio ρ = π_old/μ, at ``level``:
    token:    ρ_t = exp(log π_old(a_t|s_t) − log μ(a_t|s_t))
    sequence: ρ_i = exp(Σ_t (log π_old − log μ)), the product over the response, on each of its tokens
              (the product, as TRL's ``vllm_importance_sampling_mode=sequence_*`` and verl's
              ``rollout_is: sequence`` take it; verl's ``geometric`` mean is for rejection only)
The log-ratio is bounded to [−20, 20] before the exp (verl's safety bound) so no weight overflows.

Registered corrections (``--ppo.rollout_correction NAME``; ``register_rollout_correction``):
- ``tis``: w = min(ρ, C), truncated importance sampling (Yao et al. 2025; TRL ``*_truncate``).
- ``mis``: w = ρ·1[1/C ≤ ρ ≤ C], masked importance sampling: outliers drop out of the policy term
  (Liu, Li et al. 2025, "When Speed Kills Stability"; verl ``rollout_rs`` with its lower bound 1/C).
- ``icepop``: w = ρ·1[low ≤ ρ ≤ high], IcePop's two-sided mask (Ling Team 2025, Ring-1T,
  arXiv 2510.18855: M(k) = k on [α, β], 0 outside; α = 0.5, β = 5).
A masked token keeps its place in the aggregation's denominator (weight 0, as TRL's ``*_mask``):
the estimator then has a fixed denominator and the closed-form expectation docs/rollout.md proves
(verl drops masked tokens from the denominator too, a self-normalised estimator).

C = ∞ at sequence level is exact importance sampling: the expected gradient is ∇J under π_old;
the token-level ratio corrects each action but not the prefix that led to it, so it is biased
(docs/rollout.md gives both by enumeration).

Imports only torch.
"""
from __future__ import annotations

from typing import Callable

import torch

from .utils import masked_sum

__all__ = ["LEVELS", "ROLLOUT_CORRECTIONS", "RolloutCorrection", "get_rollout_correction", "icepop_weights",
           "importance_ratio", "logprob_gap", "masked_is_weights", "register_rollout_correction",
           "truncated_is_weights", "weight_stats"]

LEVELS = ("token", "sequence")
LOG_RATIO_BOUND = 20.0  # exp(±20) ≈ 5e8 / 2e-9: verl's safety bound on every IS weight

RolloutCorrection = Callable[..., torch.Tensor]
ROLLOUT_CORRECTIONS: dict[str, RolloutCorrection] = {}


def register_rollout_correction(name: str) -> Callable[[RolloutCorrection], RolloutCorrection]:
    """Decorator: register a rollout correction under ``name``.

    The function is called with keyword arguments (accept ``**kw``): ``ratio`` (B, T), the importance ratio
    π_old/μ at ``level`` (``importance_ratio``), ``old_logprobs`` and ``behavior_logprobs`` (B, T), ``mask``
    (B, T), ``level`` ("token" or "sequence") and the floats ``threshold`` (C), ``low`` and ``high``. It returns
    the weights w (B, T), ≥ 0, that multiply each token's policy-loss term (padding is ignored).

    Raises:
        ValueError: ``name`` is already registered.
    """
    def decorator(fn: RolloutCorrection) -> RolloutCorrection:
        if name in ROLLOUT_CORRECTIONS:
            raise ValueError(f"rollout correction {name!r} is already registered")
        ROLLOUT_CORRECTIONS[name] = fn
        return fn
    return decorator


def get_rollout_correction(name: str) -> RolloutCorrection:
    """A registered rollout correction by name.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    try:
        return ROLLOUT_CORRECTIONS[name]
    except KeyError:
        known = ", ".join(sorted(ROLLOUT_CORRECTIONS))
        raise ValueError(f"unknown rollout correction {name!r}; registered: {known}") from None


def importance_ratio(old_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor,
                     level: str = "token") -> torch.Tensor:
    """ρ = π_old/μ per token or per response, 1 on padding.

    Formula: token ρ_t = exp(clamp(log π_old_t − log μ_t, ±20)); sequence ρ_i = exp(clamp(Σ_t m_t·(log π_old_t
    − log μ_t), ±20)) on every token of row i.

    Shapes: (B, T) each -> (B, T), detached.

    Raises:
        ValueError: unknown ``level``.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown rollout correction level {level!r}; choose token or sequence")
    valid = mask.bool()
    with torch.no_grad():
        log_ratio = torch.where(valid, old_logprobs - behavior_logprobs, torch.zeros_like(old_logprobs))  # (B, T)
        if level == "sequence":
            log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)  # (B, T) the row's log-product
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        return torch.where(valid, ratio, torch.ones_like(ratio))


@register_rollout_correction("tis")
def truncated_is_weights(*, ratio: torch.Tensor, threshold: float, **kw) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025): w = min(ρ, C), C = ``threshold`` (math.inf: plain IS).

    Shapes: ratio (B, T) -> (B, T).
    """
    return ratio.clamp(max=threshold)


def _kept_in(ratio: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """ρ where low ≤ ρ ≤ high, 0 elsewhere. Shapes: (B, T) -> (B, T)."""
    return torch.where((ratio >= low) & (ratio <= high), ratio, torch.zeros_like(ratio))


@register_rollout_correction("mis")
def masked_is_weights(*, ratio: torch.Tensor, threshold: float, **kw) -> torch.Tensor:
    """Masked importance sampling (Liu, Li et al. 2025): w = ρ·1[1/C ≤ ρ ≤ C], C = ``threshold``.

    Shapes: ratio (B, T) -> (B, T).
    """
    return _kept_in(ratio, 1.0 / threshold, threshold)


@register_rollout_correction("icepop")
def icepop_weights(*, ratio: torch.Tensor, low: float, high: float, **kw) -> torch.Tensor:
    """IcePop (Ring-1T, arXiv 2510.18855): w = ρ·1[low ≤ ρ ≤ high] (the paper's α = 0.5, β = 5).

    Shapes: ratio (B, T) -> (B, T).
    """
    return _kept_in(ratio, low, high)


def weight_stats(weights: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor, level: str) -> dict[str, float]:
    """The correction's diagnostics as sums, counts and extremes, so that they add up over ranks.

    Units: valid tokens (token level) or non-empty responses (sequence level: a row counts once).
    Returns: "units" (n), "weight_sum" (Σ w), "weight_max", "ratio_max", "ratio_min" (0, 0 and inf when n = 0),
    "truncated" (#{0 < w < ρ}), "masked" (#{w = 0}) over the units.

    Shapes: (B, T) each.
    """
    valid = mask.bool()
    units = valid if level == "token" else (valid & (valid.cumsum(-1) == 1))  # (B, T) a row's first token
    w, r = weights[units].double(), ratio[units].double()  # (n,)
    empty = len(w) == 0
    return {"units": float(len(w)), "weight_sum": float(w.sum()),
            "weight_max": 0.0 if empty else float(w.max()), "ratio_max": 0.0 if empty else float(r.max()),
            "ratio_min": float("inf") if empty else float(r.min()),
            "truncated": float(((w > 0) & (w < r)).sum()), "masked": float((w == 0).sum())}


def logprob_gap(logprobs: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """(Σ |Δ|, max |Δ|, n) of Δ = logprobs − other over the n valid tokens: the rollout/trainer mismatch
    ``check/logprob_gap`` (mean Σ/n) and ``check/logprob_gap_max`` report.

    Shapes: (B, T) each -> three floats.
    """
    with torch.no_grad():
        gap = torch.where(mask.bool(), (logprobs - other).abs(), torch.zeros_like(logprobs))  # (B, T)
        return float(masked_sum(gap, mask)), float(gap.max()) if gap.numel() else 0.0, float(mask.bool().sum())
