"""Advantage estimators: GAE, RLOO, whitening, and a registry to add your own.

References:
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (arXiv:1506.02438): GAE.
- Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al.
  2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
  Feedback in LLMs" (arXiv:2402.14740): RLOO, the leave-one-out baseline.

Adding an estimator (the trainer looks it up by name in ``ADVANTAGE_ESTIMATORS``)::

    @register_advantage_estimator("grpo")
    def grpo(*, rewards, mask, scores, group_size, **kw):
        s = scores.view(-1, group_size)                                  # (B/G, G)
        adv = ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)).view(-1, 1)
        adv = adv * mask                                                 # (B, T)
        return adv, adv

Every estimator is called with keyword arguments only — ``rewards`` (B, T), ``values``
(B, T) or None, ``mask`` (B, T), ``scores`` (B,), ``gamma``, ``lam``, ``group_size`` — and
must accept ``**kw`` for the ones it ignores. It returns ``(advantages, returns)``, both
(B, T) and 0 on padding.

Imports only torch.
"""

from __future__ import annotations

from typing import Callable

import torch

from .utils import masked_mean, masked_sum, masked_var

__all__ = [
    "compute_gae",
    "masked_whiten",
    "rloo_advantages",
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimator",
    "register_advantage_estimator",
    "get_advantage_estimator",
]

AdvantageEstimator = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over right-padded token sequences.

    Formula (Schulman et al. 2016, eq. 16), for valid tokens t:
        δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t
        A_t = δ_t + γλ·m_{t+1}·A_{t+1}  =  Σ_{l≥0} (γλ)^l δ_{t+l}  (sum up to the last valid token)
        returns_t = A_t + V_t

    Convention: the value after the last valid token is 0 (the episode ends at the EOS or
    truncation point); positions with mask 0 get advantage 0 and return 0; rewards and values
    on padding are ignored. The mask is assumed right-padded: a 0 inside a row ends the
    episode there. Computed in ``rewards``' dtype as a reversed loop over T, vectorised over B.

    Args:
        rewards: per-token rewards (from ``kl_penalized_rewards``).
        values: V(s_t) from the value head at rollout time.
        mask: 1 on valid response tokens.
        gamma: discount γ.
        lam: GAE λ.

    Shapes: rewards (B, T), values (B, T), mask (B, T) -> advantages (B, T), returns (B, T).

    Returns:
        advantages: (B, T), 0 on padding.
        returns: (B, T) advantages + values on valid tokens, 0 on padding (value-loss target).
    """
    dtype = rewards.dtype
    valid = mask.bool()  # (B, T)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    m = valid.to(dtype)  # (B, T)
    r = torch.where(valid, rewards, zero)  # (B, T)
    v = torch.where(valid, values.to(dtype), zero)  # (B, T)
    B, T = r.shape
    last_gae = torch.zeros(B, dtype=dtype, device=r.device)  # (B,) A_{t+1}
    next_value = torch.zeros(B, dtype=dtype, device=r.device)  # (B,) V_{t+1}·m_{t+1}
    next_mask = torch.zeros(B, dtype=dtype, device=r.device)  # (B,) m_{t+1}
    advantages = [zero] * T
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
        last_gae = (delta + gamma * lam * next_mask * last_gae) * m[:, t]  # (B,)
        advantages[t] = last_gae
        next_value, next_mask = v[:, t], m[:, t]
    adv = torch.stack(advantages, dim=1) if T > 0 else torch.zeros_like(r)  # (B, T)
    returns = (adv + v) * m  # (B, T)
    return adv, returns


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    moments: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Normalise ``x`` to mean 0, variance 1 over the valid positions of the whole batch.

    Formula: μ = masked_mean(x), σ² = masked_var(x, unbiased=False),
        x̂ = (x − μ)/√(σ² + 1e-8), and x̂ + μ when ``shift_mean`` is False.

    ``shift_mean=False`` is what ``whiten_rewards`` uses (as TRL and the N+ reference do). It is
    not a pure rescaling: each valid entry becomes x/σ + μ·(1 − 1/σ), so every valid token gains
    the same constant μ·(1 − 1/σ) — for per-token rewards, a bonus or penalty per response token.

    Convention: statistics over valid tokens only, population (biased) variance so that the
    output has variance exactly 1 (up to eps) on the valid tokens; padding returned as 0. An
    all-padding input returns all zeros.

    Args:
        x: values to whiten (typically advantages).
        mask: 1 on valid tokens.
        shift_mean: subtract the mean (True) or keep it (False).
        moments: ``(x, mask) -> (μ, σ²)``; default this batch's masked mean and population
            variance. The trainer passes ``distributed.global_masked_moments`` so that under
            torchrun the statistics are those of the global batch (the one-process result).

    Shapes: x (B, T), mask (B, T) -> (B, T).

    Returns:
        The whitened tensor, in ``x``'s dtype, 0 on padding.
    """
    if moments is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=False)  # (), ()
    else:
        mean, var = moments(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)  # (B, T)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


def rloo_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out advantages (RLOO), one value per sequence.

    Formula: R_i = Σ_t m_t·r_{i,t} (= score_i − kl_coef·Σ_t kl_{i,t} for KL-penalised rewards);
    for the group G(i) of i, A_i = R_i − (1/(k−1))·Σ_{j∈G(i), j≠i} R_j, k = group_size,
    broadcast to every valid token of row i.

    Convention: rows come in contiguous blocks of ``group_size`` samples of the same prompt
    (rows 0..k−1 share a prompt, then k..2k−1, ...). No discount (γ = 1). ``returns`` is the
    undiscounted reward-to-go Σ_{t'≥t} r_{t'} (equal to R_i on the first token), a sound
    target if a value head is trained alongside; padding is 0 in both outputs.

    Args:
        rewards: per-token rewards (from ``kl_penalized_rewards``).
        mask: 1 on valid tokens.
        group_size: samples per prompt k ≥ 2.

    Shapes: rewards (B, T), mask (B, T) -> advantages (B, T), returns (B, T); B % k == 0.

    Returns:
        advantages: (B, T) the row's A_i on valid tokens, 0 on padding.
        returns: (B, T) reward-to-go on valid tokens, 0 on padding.

    Raises:
        ValueError: group_size < 2 or not dividing the batch.
    """
    B = rewards.shape[0]
    if group_size < 2 or B % group_size != 0:
        raise ValueError(f"rloo needs group_size >= 2 dividing the batch; got group_size={group_size}, batch={B}")
    m = mask.bool().to(rewards.dtype)  # (B, T)
    r = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))  # (B, T)
    seq_return = masked_sum(r, mask, dim=-1).view(-1, group_size)  # (B/k, k)
    baseline = (seq_return.sum(dim=1, keepdim=True) - seq_return) / (group_size - 1)  # (B/k, k)
    adv = (seq_return - baseline).reshape(B, 1) * m  # (B, T)
    returns = r.flip(-1).cumsum(-1).flip(-1) * m  # (B, T) reward-to-go
    return adv, returns


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn`` under ``name`` in ``ADVANTAGE_ESTIMATORS``.

    Args:
        name: the key a config selects the estimator with.

    Returns:
        A decorator that stores the function and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered (a silent overwrite hides typos).
    """

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """Look up a registered estimator by name.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        known = ", ".join(sorted(ADVANTAGE_ESTIMATORS))
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {known}") from None


@register_advantage_estimator("gae")
def _gae(*, rewards, values, mask, gamma, lam, **kw):
    """GAE with the critic's values (see ``compute_gae``)."""
    return compute_gae(rewards, values, mask, gamma, lam)


@register_advantage_estimator("rloo")
def _rloo(*, rewards, mask, group_size, **kw):
    """RLOO; values, gamma and lam unused (see ``rloo_advantages``)."""
    return rloo_advantages(rewards, mask, group_size)
