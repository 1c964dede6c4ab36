"""Advantage estimators: GAE, RLOO, GRPO, Dr. GRPO, REINFORCE++, whitening, and a registry to add your own.

References:
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (arXiv:1506.02438): GAE.
- Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al.
  2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
  Feedback in LLMs" (arXiv:2402.14740): RLOO, the leave-one-out baseline.
- Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), §4.1: GRPO, group mean/std.
- Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"
  (arXiv:2503.20783): Dr. GRPO, group mean only (and a constant loss normaliser,
  ``ppo.loss_aggregation=seq-mean-token-sum-norm``).
- Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models"
  (arXiv:2501.03262): token-level KL in the reward, returns normalised over the global batch.

The contract. Every estimator is called with keyword arguments only and must accept ``**kw``
for the ones it ignores:

- ``rewards`` (B, T): the per-token rewards, KL-penalised: the score on each row's last valid
  token and −β·KL_t on every token where ``ppo.kl_penalty`` puts the penalty in the reward.
  An estimator that builds its advantages from ``rewards`` gets the KL penalty with them.
- ``scores`` (B,): the raw reward-source scores, *no KL in them*. An estimator that uses only
  ``scores`` drops a KL penalty placed in the reward: run it with ``ppo.kl_penalty=loss`` or say
  in its docstring that it trains without a KL penalty (the trainer warns when the advantages
  do not move with the KL).
- ``values`` (B, T) or None (critic-free runs), ``mask`` (B, T), ``gamma``, ``lam``,
  ``group_size`` (rows come in contiguous groups of ``group_size`` samples of one prompt).

It returns ``(advantages, returns)``, both (B, T) and 0 on padding (``returns`` are the value
targets; a critic-free estimator's are only logged).

Each estimator declares how the trainer treats it (``register_advantage_estimator`` or, for a
function used as ``file.py:function``, the ``advantage_estimator`` decorator):
``whiten`` (advantages normalised to mean 0 / std 1 over the global batch after the estimator;
``ppo.whiten_advantages`` overrides it), ``critic`` (reads ``values``: the run builds and trains
a value head; False: no value head is built, trained or saved), ``groups`` (needs
``group_size >= 2``).  For example::

    @register_advantage_estimator("reinforce_mean", whiten=False, critic=False)
    def reinforce_mean(*, rewards, mask, **kw):
        seq = (rewards * mask).sum(-1, keepdim=True)           # (B, 1) score − β·Σ KL
        adv = (seq - seq.mean()) * mask                         # (B, T)
        return adv, adv

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
    "grpo_advantages",
    "reinforce_pp_returns",
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimator",
    "advantage_estimator",
    "estimator_declarations",
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
    seq_return, returns = _group_returns(rewards, mask, group_size, "rloo")  # (B/k, k), (B, T)
    baseline = (seq_return.sum(dim=1, keepdim=True) - seq_return) / (group_size - 1)  # (B/k, k)
    return _per_token(seq_return - baseline, mask), returns


def _group_returns(rewards: torch.Tensor, mask: torch.Tensor, group_size: int, name: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(R grouped (B/k, k), reward-to-go (B, T)) of the group estimators; checks the grouping."""
    B = rewards.shape[0]
    if group_size < 2 or B % group_size != 0:
        raise ValueError(f"{name} needs group_size >= 2 dividing the batch; got group_size={group_size}, batch={B}")
    r = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))  # (B, T)
    seq_return = masked_sum(r, mask, dim=-1).view(-1, group_size)  # (B/k, k)
    return seq_return, r.flip(-1).cumsum(-1).flip(-1) * mask.bool().to(r.dtype)  # reward-to-go


def _per_token(grouped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-sequence value (B/k, k) broadcast to every valid token: (B, T), 0 on padding."""
    return grouped.reshape(-1, 1) * mask.bool().to(grouped.dtype)


def grpo_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
                    scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (outcome supervision) and Dr. GRPO advantages, one value per sequence.

    Formula: R_i = Σ_t m_t·r_{i,t} (the score, minus β·Σ_t KL_t when the penalty is in the
    rewards); for the group G(i) of i (k = group_size rows),
        GRPO     (Shao et al. 2024, §4.1.2):  A_i = (R_i − mean_G(R)) / (std_G(R) + 1e-6)
        Dr. GRPO (Liu et al. 2025, eq. 3):    A_i = R_i − mean_G(R)            (``scale=False``)
    broadcast to every valid token of row i. std_G is the unbiased sample standard deviation
    (``torch.std``, as the DeepSeekMath and TRL implementations compute it); a group whose
    returns are all equal gets advantage 0.

    Convention: contiguous groups as in ``rloo_advantages``; ``returns`` = the undiscounted
    reward-to-go (logged only: GRPO has no critic).

    Shapes: rewards (B, T), mask (B, T) -> advantages (B, T), returns (B, T); B % k == 0.

    Raises:
        ValueError: group_size < 2 or not dividing the batch.
    """
    seq_return, returns = _group_returns(rewards, mask, group_size, "grpo")  # (B/k, k), (B, T)
    adv = seq_return - seq_return.mean(dim=1, keepdim=True)  # (B/k, k)
    if scale:
        adv = adv / (seq_return.std(dim=1, keepdim=True) + 1e-6)
    return _per_token(adv, mask), returns


def reinforce_pp_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, eqs. 5–7): per-token returns of the KL-penalised rewards.

    Formula: r_t = 1[t = last]·score − β·KL_t (the trainer's ``rewards`` with the penalty in the
    reward), G_t = Σ_{s≥t} γ^{s−t}·r_s, advantage_t = G_t. The paper then normalises the
    advantages over the whole global batch, A_t = (G_t − mean(G)) / std(G): the estimator
    declares ``whiten=True`` and the trainer's global whitening does it.

    Computed as GAE with V ≡ 0 and λ = 1 (δ_t = r_t, so A_t = G_t).

    Shapes: rewards (B, T), mask (B, T) -> advantages (B, T) (not yet normalised), returns (B, T);
    both G_t on valid tokens, 0 on padding.
    """
    returns, _ = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)  # V ≡ 0, λ = 1: A_t = G_t
    return returns, returns


def advantage_estimator(whiten: bool = True, critic: bool = True, groups: bool = False
                        ) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: declare how the trainer treats an estimator (see the module docstring).

    Args:
        whiten: normalise its advantages over the global batch (``ppo.whiten_advantages`` overrides).
        critic: it reads ``values``; False: no value head is built, trained or saved.
        groups: it needs ``group_size >= 2`` samples per prompt.
    Returns:
        A decorator that sets ``fn.whiten``, ``fn.critic``, ``fn.groups`` and returns ``fn``.
    """
    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        fn.whiten, fn.critic, fn.groups = bool(whiten), bool(critic), bool(groups)  # type: ignore[attr-defined]
        return fn
    return decorator


def estimator_declarations(fn: AdvantageEstimator) -> dict[str, bool]:
    """``{"whiten", "critic", "groups"}`` of an estimator; an undeclared function is treated like
    GAE (whitened, with a critic, no groups)."""
    return {"whiten": getattr(fn, "whiten", True), "critic": getattr(fn, "critic", True),
            "groups": getattr(fn, "groups", False)}


def register_advantage_estimator(name: str, *, whiten: bool = True, critic: bool = True, groups: bool = False
                                 ) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn`` under ``name`` in ``ADVANTAGE_ESTIMATORS`` with its declarations
    (``whiten``, ``critic``, ``groups``: see :func:`advantage_estimator`).

    Args:
        name: the key a config selects the estimator with.

    Returns:
        A decorator that stores the function and returns it (declared).

    Raises:
        ValueError: ``name`` is already registered (a silent overwrite hides typos).
    """

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = advantage_estimator(whiten, critic, groups)(fn)
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


@register_advantage_estimator("gae", whiten=True, critic=True)
def _gae(*, rewards, values, mask, gamma, lam, **kw):
    """GAE with the critic's values (see ``compute_gae``); whitened over the batch (N+ detail)."""
    return compute_gae(rewards, values, mask, gamma, lam)


@register_advantage_estimator("rloo", whiten=False, critic=False, groups=True)
def _rloo(*, rewards, mask, group_size, **kw):
    """RLOO from the KL-penalised rewards (see ``rloo_advantages``); not whitened."""
    return rloo_advantages(rewards, mask, group_size)


@register_advantage_estimator("grpo", whiten=False, critic=False, groups=True)
def _grpo(*, rewards, mask, group_size, **kw):
    """GRPO's group-normalised sequence return (see ``grpo_advantages``). From ``rewards``: with
    ``ppo.kl_penalty=reward`` the KL is in R_i; with ``loss`` (GRPO's own k3 placement) R_i is the score."""
    return grpo_advantages(rewards, mask, group_size, scale=True)


@register_advantage_estimator("dr_grpo", whiten=False, critic=False, groups=True)
def _dr_grpo(*, rewards, mask, group_size, **kw):
    """Dr. GRPO: the group-mean baseline without the std (see ``grpo_advantages``); pair with
    ``ppo.loss_aggregation=seq-mean-token-sum-norm`` for the paper's whole recipe."""
    return grpo_advantages(rewards, mask, group_size, scale=False)


@register_advantage_estimator("reinforce_pp", whiten=True, critic=False)
def _reinforce_pp(*, rewards, mask, gamma, **kw):
    """REINFORCE++: discounted returns of the KL-penalised per-token rewards, normalised over the
    global batch by the trainer's whitening (see ``reinforce_pp_returns``)."""
    return reinforce_pp_returns(rewards, mask, gamma)
