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
  ``scores`` drops a KL penalty placed in the reward: it declares ``reads_rewards=False`` and the
  trainer refuses to run it with a KL penalty in the rewards (use ``ppo.kl_penalty=loss``).
- ``values`` (B, T) or None (critic-free runs), ``mask`` (B, T), ``gamma``, ``lam``,
  ``group_size``, and ``group_ids`` (B,): which prompt each row answers (the ``group_size`` rows of
  one prompt share an id). Group estimators read the groups from ``group_ids``, so a batch in any
  row order is grouped correctly, and one whose ids do not form whole groups is an error.

It returns ``(advantages, returns)``, both (B, T) and 0 on padding (``returns`` are the value
targets; a critic-free estimator's are only logged).

Each estimator declares how the trainer treats it (``register_advantage_estimator`` or, for a
function used as ``file.py:function``, the ``advantage_estimator`` decorator); every declaration
is required, an undeclared function is refused: ``whiten`` (advantages normalised to mean 0 / std 1
over the global batch after the estimator; ``ppo.whiten_advantages`` overrides it), ``critic``
(reads ``values``: the run builds and trains a value head; False: no value head is built, trained
or saved), ``groups`` (needs ``group_size >= 2``), ``reads_rewards`` (builds the advantages from
``rewards``), and optionally ``return_weight`` (∂A_i/∂R_i, the scale the KL loss term follows).
For example::

    @register_advantage_estimator("reinforce_mean", whiten=False, critic=False, groups=False,
                                  reads_rewards=True)
    def reinforce_mean(*, rewards, mask, **kw):
        seq = (rewards * mask).sum(-1, keepdim=True)           # (B, 1) score − β·Σ KL
        adv = (seq - seq.mean()) * mask                         # (B, T)
        return adv, adv

Imports only torch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .utils import masked_mean, masked_sum, masked_var

__all__ = [
    "compute_gae",
    "masked_whiten",
    "rloo_advantages",
    "grpo_advantages",
    "grpo_return_weights",
    "group_index",
    "reinforce_pp_returns",
    "ADVANTAGE_ESTIMATORS",
    "DECLARATIONS",
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


def group_index(batch: int, group_size: int, group_ids: torch.Tensor | None = None, name: str = "estimator"
                ) -> torch.Tensor:
    """The row order that lays a batch out as (B/k, k) groups: ``rows[order].view(-1, k)``.

    Without ``group_ids`` the rows must come in contiguous blocks of ``group_size`` (rows 0..k−1 share a
    prompt, then k..2k−1, ...). With ``group_ids`` (B,) the rows may come in any order: each id must
    appear exactly ``group_size`` times (a misordered or incomplete batch is an error, not a wrong number).

    Shapes: -> order (B,) int64, a permutation of the rows.

    Raises:
        ValueError: group_size < 2, a batch that does not split into whole groups, or group ids that
            do not each appear ``group_size`` times.
    """
    if group_size < 2 or batch % group_size != 0:
        raise ValueError(f"{name} needs group_size >= 2 dividing the batch; got group_size={group_size}, "
                         f"batch={batch}")
    if group_ids is None:
        return torch.arange(batch)
    ids = torch.as_tensor(group_ids).reshape(-1).cpu()
    if ids.numel() != batch:
        raise ValueError(f"{name}: {ids.numel()} group ids for a batch of {batch} rows")
    _, counts = torch.unique(ids, return_counts=True)
    if bool((counts != group_size).any()):
        bad = int(counts[counts != group_size][0])
        raise ValueError(f"{name}: a group id appears {bad} times in the batch; each group must have exactly "
                         f"group_size={group_size} rows")
    return torch.argsort(ids, stable=True)


def _group_returns(rewards: torch.Tensor, mask: torch.Tensor, group_size: int, name: str,
                   group_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R grouped (B/k, k), reward-to-go (B, T), the row order of ``group_index``)."""
    order = group_index(rewards.shape[0], group_size, group_ids, name).to(rewards.device)
    r = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))  # (B, T)
    seq_return = masked_sum(r, mask, dim=-1)[order].view(-1, group_size)  # (B/k, k)
    return seq_return, r.flip(-1).cumsum(-1).flip(-1) * mask.bool().to(r.dtype), order


def _per_token(grouped: torch.Tensor, order: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-sequence value laid out as groups (B/k, k) put back in row order and broadcast to every
    valid token: (B, T), 0 on padding."""
    per_row = torch.empty_like(grouped.reshape(-1))
    per_row[order] = grouped.reshape(-1)  # (B,)
    return per_row.unsqueeze(-1) * mask.bool().to(grouped.dtype)


def rloo_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, group_size: int, group_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out advantages (RLOO), one value per sequence.

    Formula: R_i = Σ_t m_t·r_{i,t} (= score_i − kl_coef·Σ_t kl_{i,t} for KL-penalised rewards);
    for the group G(i) of i, A_i = R_i − (1/(k−1))·Σ_{j∈G(i), j≠i} R_j, k = group_size,
    broadcast to every valid token of row i.

    Convention: the groups are given by ``group_ids`` (B,) (any row order), or, without them, by
    contiguous blocks of ``group_size`` rows (``group_index``). No discount (γ = 1). ``returns`` is
    the undiscounted reward-to-go Σ_{t'≥t} r_{t'} (equal to R_i on the first token), a sound
    target if a value head is trained alongside; padding is 0 in both outputs.

    Shapes: rewards (B, T), mask (B, T), group_ids (B,) -> advantages (B, T), returns (B, T); B % k == 0.

    Raises:
        ValueError: group_size < 2, not dividing the batch, or group ids that do not form whole groups.
    """
    seq_return, returns, order = _group_returns(rewards, mask, group_size, "rloo", group_ids)  # (B/k, k)
    baseline = (seq_return.sum(dim=1, keepdim=True) - seq_return) / (group_size - 1)  # (B/k, k)
    return _per_token(seq_return - baseline, order, mask), returns


def grpo_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
                    scale: bool = True, group_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (outcome supervision) and Dr. GRPO advantages, one value per sequence.

    Formula: R_i = Σ_t m_t·r_{i,t} (the score, minus β·Σ_t KL_t when the penalty is in the
    rewards); for the group G(i) of i (k = group_size rows),
        GRPO     (Shao et al. 2024, §4.1.2):  A_i = (R_i − mean_G(R)) / (std_G(R) + 1e-6)
        Dr. GRPO (Liu et al. 2025, eq. 3):    A_i = R_i − mean_G(R)            (``scale=False``)
    broadcast to every valid token of row i. std_G is the unbiased sample standard deviation
    (``torch.std``, as the DeepSeekMath and TRL implementations compute it); a group whose
    returns are all equal gets advantage 0.

    Convention: groups as in ``rloo_advantages``; ``returns`` = the undiscounted reward-to-go
    (logged only: GRPO has no critic).

    Shapes: rewards (B, T), mask (B, T), group_ids (B,) -> advantages (B, T), returns (B, T); B % k == 0.

    Raises:
        ValueError: group_size < 2, not dividing the batch, or group ids that do not form whole groups.
    """
    seq_return, returns, order = _group_returns(rewards, mask, group_size, "grpo", group_ids)  # (B/k, k)
    adv = seq_return - seq_return.mean(dim=1, keepdim=True)  # (B/k, k)
    if scale:
        adv = adv / (seq_return.std(dim=1, keepdim=True) + 1e-6)
    return _per_token(adv, order, mask), returns


def grpo_return_weights(rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
                        group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The scale the KL loss term of a GRPO / Dr. GRPO row takes: 1 − 1/k, how much of a change in
    row i's own return R_i reaches A_i = R_i − mean_G(R) (the group mean includes R_i).

    Dr. GRPO's expected update is exactly (1 − 1/k)·∇J, so with this weight ``kl_penalty=both`` stays
    unbiased (up to that factor; docs/losses.md). GRPO also divides by std_G(R), a reweighting of the
    groups that makes its update no multiple of ∇J with or without a KL; the KL term does not follow
    it: 1/std_G would weigh the KL of a nearly flat group without bound (on the enumerated tree of
    docs/losses.md the exact/both direction error is 58.7 % with 1/std_G, 18.2 % with 1 − 1/k alone).

    Shapes: rewards (B, T), mask (B, T) -> (B,) (the groups are checked as in ``group_index``).
    """
    group_index(rewards.shape[0], group_size, group_ids, "grpo")
    return torch.full((rewards.shape[0],), 1.0 - 1.0 / group_size, dtype=rewards.dtype, device=rewards.device)


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


DECLARATIONS = ("whiten", "critic", "groups", "reads_rewards")


def advantage_estimator(*, whiten: bool, critic: bool, groups: bool, reads_rewards: bool,
                        return_weight: Callable[..., torch.Tensor] | None = None
                        ) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: declare how the trainer treats an estimator (see the module docstring). Every
    declaration is required: an undeclared estimator is refused, not given GAE's defaults.

    Args:
        whiten: normalise its advantages over the global batch (``ppo.whiten_advantages`` overrides).
        critic: it reads ``values``; False: no value head is built, trained or saved.
        groups: it needs ``group_size >= 2`` samples per prompt (and reads ``group_ids``).
        reads_rewards: it builds the advantages from the per-token ``rewards`` (which carry the KL
            penalty where ``ppo.kl_penalty`` puts it in the reward). False (it reads ``scores`` only):
            a run with a KL penalty in the rewards is refused, since the penalty would be dropped.
        return_weight: ``(*, rewards, mask, group_size, group_ids, **kw) -> (B,)``, how much of a
            change in row i's own return R_i = Σ_t r_{i,t} reaches its advantage (∂A_i/∂R_i with batch
            or group statistics held fixed); default 1 (GAE, RLOO, REINFORCE++ before whitening). The
            KL loss term of each row is weighted by it, so that ``kl_penalty=both`` splits one penalty
            consistently between the rewards and the loss (GRPO and Dr. GRPO: 1 − 1/k).
    Returns:
        A decorator that sets the declarations as attributes of ``fn`` and returns ``fn``.
    """
    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        fn.whiten, fn.critic, fn.groups = bool(whiten), bool(critic), bool(groups)  # type: ignore[attr-defined]
        fn.reads_rewards, fn.return_weight = bool(reads_rewards), return_weight  # type: ignore[attr-defined]
        return fn
    return decorator


def estimator_declarations(fn: AdvantageEstimator) -> dict[str, Any]:
    """``{"whiten", "critic", "groups", "reads_rewards", "return_weight"}`` of an estimator.

    Raises:
        ValueError: ``fn`` lacks a declaration (decorate it with ``advantage_estimator``).
    """
    missing = [k for k in DECLARATIONS if not hasattr(fn, k)]
    if missing:
        name = getattr(fn, "__name__", repr(fn))
        raise ValueError(f"advantage estimator {name!r} does not declare {', '.join(missing)}: decorate it with "
                         "@advantage_estimator(whiten=..., critic=..., groups=..., reads_rewards=...)")
    return {**{k: getattr(fn, k) for k in DECLARATIONS}, "return_weight": getattr(fn, "return_weight", None)}


def register_advantage_estimator(name: str, *, whiten: bool, critic: bool, groups: bool, reads_rewards: bool,
                                 return_weight: Callable[..., torch.Tensor] | None = None
                                 ) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn`` under ``name`` in ``ADVANTAGE_ESTIMATORS`` with its declarations
    (every keyword of :func:`advantage_estimator`; all but ``return_weight`` required).

    Raises:
        ValueError: ``name`` is already registered (a silent overwrite hides typos).
    """

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = advantage_estimator(
            whiten=whiten, critic=critic, groups=groups, reads_rewards=reads_rewards, return_weight=return_weight)(fn)
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


@register_advantage_estimator("gae", whiten=True, critic=True, groups=False, reads_rewards=True)
def _gae(*, rewards, values, mask, gamma, lam, **kw):
    """GAE with the critic's values (see ``compute_gae``); whitened over the batch (N+ detail)."""
    return compute_gae(rewards, values, mask, gamma, lam)


@register_advantage_estimator("rloo", whiten=False, critic=False, groups=True, reads_rewards=True)
def _rloo(*, rewards, mask, group_size, group_ids=None, **kw):
    """RLOO from the KL-penalised rewards (see ``rloo_advantages``); not whitened. The baseline
    excludes row i, so ∂A_i/∂R_i = 1."""
    return rloo_advantages(rewards, mask, group_size, group_ids)


def _group_mean_weight(*, rewards, mask, group_size, group_ids=None, **kw):
    return grpo_return_weights(rewards, mask, group_size, group_ids)


@register_advantage_estimator("grpo", whiten=False, critic=False, groups=True, reads_rewards=True,
                              return_weight=_group_mean_weight)
def _grpo(*, rewards, mask, group_size, group_ids=None, **kw):
    """GRPO's group-normalised sequence return (see ``grpo_advantages``). From ``rewards``: with
    ``ppo.kl_penalty=reward`` the KL is in R_i; with ``loss`` (GRPO's own k3 placement) R_i is the score."""
    return grpo_advantages(rewards, mask, group_size, scale=True, group_ids=group_ids)


@register_advantage_estimator("dr_grpo", whiten=False, critic=False, groups=True, reads_rewards=True,
                              return_weight=_group_mean_weight)
def _dr_grpo(*, rewards, mask, group_size, group_ids=None, **kw):
    """Dr. GRPO: the group-mean baseline without the std (see ``grpo_advantages``); pair with
    ``ppo.loss_aggregation=seq-mean-token-sum-norm`` for the paper's whole recipe."""
    return grpo_advantages(rewards, mask, group_size, scale=False, group_ids=group_ids)


@register_advantage_estimator("reinforce_pp", whiten=True, critic=False, groups=False, reads_rewards=True)
def _reinforce_pp(*, rewards, mask, gamma, **kw):
    """REINFORCE++: discounted returns of the KL-penalised per-token rewards, normalised over the
    global batch by the trainer's whitening (see ``reinforce_pp_returns``)."""
    return reinforce_pp_returns(rewards, mask, gamma)
