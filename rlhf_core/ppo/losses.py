"""The terms of the PPO objective, per token, and the one reduction that turns them into a loss.

Every term is a function returning a (B, T) tensor of per-token values (and masked-mean
diagnostics): the policy loss (a registered variant, below), the value loss, the entropy and the
KL penalty. ``aggregate`` reduces a per-token tensor to a scalar; with ``units`` (what the whole
minibatch divides by, counted over every micro-batch and rank) each micro-batch's share comes out
directly, so accumulation and data parallelism need no weights (the pattern of OpenRLHF's
``aggregate_loss`` and verl's ``agg_loss``). ``objective.py`` sums the terms.

Policy losses (``POLICY_LOSSES``; ``--ppo.policy_loss NAME | file.py:function``), each a
minimisation target per token with ρ_t = π_θ(a_t|s_t)/π_old(a_t|s_t) and A_t the advantage:

- ``ppo``: max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)) (Schulman et al. 2017, eq. 7; DAPO's
  asymmetric "clip-higher", Yu et al. 2025, arXiv 2503.14476, when ε_high > ε_low).
- ``dual_clip``: the ppo term, bounded by −c·A where A < 0 (Ye et al. 2020, arXiv 1912.09729).
- ``gspo``: the ppo term with the sequence ratio s_i = exp(mean_t log ρ_{i,t}) in place of ρ
  (Zheng et al. 2025, arXiv 2507.18071; GSPO-token form).
- ``cispo``: −sg(clip(ρ, 1−ε_low, 1+ε_high))·A·log π_θ (MiniMax-M1, arXiv 2506.13585).
- ``sapo``: −(4/τ)·σ(τ·(ρ − 1))·A, τ = τ_pos for A > 0, τ_neg otherwise (Gao et al. 2025,
  arXiv 2511.20347).

docs/losses.md holds each one's expected gradient, proven by exact enumeration.

References: Huang et al. 2022/2024 ("The 37 Implementation Details of PPO", "The N+ Implementation
Details of RLHF with PPO"): value clipping, clipfrac, the k3 approx_kl diagnostic. Stats are detached
0-dim tensors, always masked (TRL averaged unwritten zero slots into its metrics, #7012).

Imports only torch.
"""

from __future__ import annotations

from typing import Callable

import torch

from .utils import masked_mean, masked_sum, masked_var

__all__ = [
    "AGGREGATIONS",
    "POLICY_LOSSES",
    "PolicyLoss",
    "aggregate",
    "aggregation_units",
    "cispo_loss",
    "dual_clip_loss",
    "entropy_bonus",
    "explained_variance",
    "first_step_invariants",
    "get_policy_loss",
    "gspo_loss",
    "kl_penalty_loss",
    "policy_loss",
    "policy_loss_declarations",
    "policy_loss_term",
    "ppo_clip_loss",
    "ratio_stats",
    "register_policy_loss",
    "sapo_loss",
    "value_loss",
    "value_loss_terms",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")


def aggregate(x: torch.Tensor, mask: torch.Tensor, aggregation: str = "token-mean",
              max_length: int | None = None, units: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    Formula, with U the number of units the aggregation divides by:
        token-mean               Σ_{b,t} m·x / U,              U = valid tokens
        seq-mean-token-mean      Σ_b (Σ_t m·x / Σ_t m) / U,    U = rows with a valid token
        seq-mean-token-sum-norm  Σ_{b,t} m·x / (U·L),          U = rows, L = ``max_length`` (default T)
    U defaults to this batch's own count (``aggregation_units(mask).sum()``). Passing the count of
    the whole minibatch (every micro-batch, every rank) makes the result this micro-batch's share:
    the shares sum to the minibatch's aggregate, value and gradient. 0 (zero gradient) when U = 0.

    Args:
        x: per-token values.
        mask: 1 on valid tokens.
        aggregation: one of ``AGGREGATIONS``.
        max_length: L of seq-mean-token-sum-norm, a constant (the trainer passes
            ``ppo.response_length``).
        units: U, the denominator's count; default this batch's.

    Shapes: x (B, T), mask (B, T) -> ().

    Raises:
        ValueError: unknown ``aggregation``.
    """
    _check_aggregation(aggregation)
    if units is None:
        units = aggregation_units(mask, aggregation).sum()
    units = torch.as_tensor(units, dtype=x.dtype, device=x.device).clamp_min(1)
    if aggregation == "seq-mean-token-mean":
        row_mean = masked_mean(x, mask, dim=-1)  # (B,) 0 on empty rows
        return row_mean.sum() / units
    total = masked_sum(x, mask)  # ()
    if aggregation == "seq-mean-token-sum-norm":
        return total / (units * (max_length or x.shape[-1]))
    return total / units


def aggregation_units(mask: torch.Tensor, aggregation: str = "token-mean") -> torch.Tensor:
    """What each row counts for in ``aggregate``'s denominator: its valid tokens (token-mean),
    1 if it has any valid token (seq-mean-token-mean), 1 (seq-mean-token-sum-norm, whose L is a
    constant).

    Shapes: mask (B, T) -> (B,) int64.
    """
    _check_aggregation(aggregation)
    valid = mask.bool()
    if aggregation == "token-mean":
        return valid.sum(dim=-1)
    if aggregation == "seq-mean-token-mean":
        return valid.any(dim=-1).long()
    return torch.ones(mask.shape[0], dtype=torch.long, device=mask.device)


# --------------------------------------------------------------------------- the policy-loss registry

PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def policy_loss_term(*, sequence: bool, critic: bool) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator: declare what a policy loss needs (required for every policy loss, registered or
    named as ``file.py:function``).

    Args:
        sequence: it reads whole responses (a sequence-level ratio): a micro-batch always holds
            whole rows, so this is informational, shown in docs/losses.md.
        critic: it reads ``values``; refused on a critic-free policy.

    The function is called with keyword arguments (accept ``**kw``): ``logprobs`` (B, T) with grad,
    ``old_logprobs``, ``advantages``, ``mask`` (B, T), ``values`` (B, T) or None, and the floats
    ``clip_low``, ``clip_high``, ``dual_clip_c``, ``sapo_tau_pos``, ``sapo_tau_neg``. It returns
    ``(per_token (B, T), stats)``: the per-token loss to minimise (padding is ignored) and masked-mean
    diagnostics (0-dim tensors, keys ``policy/...``).
    """
    def decorator(fn: PolicyLoss) -> PolicyLoss:
        fn.sequence, fn.critic = bool(sequence), bool(critic)  # type: ignore[attr-defined]
        return fn
    return decorator


def policy_loss_declarations(fn: PolicyLoss) -> dict[str, bool]:
    """``{"sequence", "critic"}`` of a policy loss.

    Raises:
        ValueError: the function was not declared with ``policy_loss_term`` / ``register_policy_loss``.
    """
    if not all(hasattr(fn, k) for k in ("sequence", "critic")):
        name = getattr(fn, "__name__", repr(fn))
        raise ValueError(f"policy loss {name!r} has no declarations: decorate it with "
                         "@policy_loss_term(sequence=..., critic=...)")
    return {"sequence": fn.sequence, "critic": fn.critic}  # type: ignore[attr-defined]


def register_policy_loss(name: str, *, sequence: bool, critic: bool) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator: declare ``fn`` (``policy_loss_term``) and register it under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    def decorator(fn: PolicyLoss) -> PolicyLoss:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = policy_loss_term(sequence=sequence, critic=critic)(fn)
        return fn
    return decorator


def get_policy_loss(name: str) -> PolicyLoss:
    """A registered policy loss by name.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; registered: {', '.join(sorted(POLICY_LOSSES))}") from None


def _ratio_and_advantages(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                          mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log ρ, ρ, A) with padding set to log ρ = 0 and A = 0 before any exp, so garbage log-probs
    there (−inf, NaN) cannot produce NaN values or gradients. A is detached."""
    valid = mask.bool()  # (B, T)
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
    adv = torch.where(valid, advantages, torch.zeros_like(advantages)).detach()  # (B, T)
    return log_ratio, torch.exp(log_ratio), adv


def _clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), mask of tokens where the clipped branch is strictly
    larger: their gradient is 0)."""
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    return torch.maximum(unclipped, clipped), clipped > unclipped


@register_policy_loss("ppo", sequence=False, critic=False)
def ppo_clip_loss(*, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, clip_low: float, clip_high: float, **kw
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, per token (Schulman et al. 2017, eq. 7), with DAPO's decoupled bounds.

    Formula: ℓ_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε_low, 1 + ε_high)), ρ_t = exp(log π_θ − log π_old).
    ε_low = ε_high is PPO; ε_high > ε_low is DAPO's clip-higher (Yu et al. 2025, §3.1: ε_low 0.2,
    ε_high 0.28), which leaves low-probability tokens room to grow.

    Shapes: (B, T) each -> per_token (B, T).
    Stats: "policy/clipfrac" = masked fraction of tokens whose clipped branch is strictly larger
    (gradient 0 there).
    """
    _, ratio, adv = _ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
    per_token, clipped = _clipped_surrogate(ratio, adv, clip_low, clip_high)
    return per_token, {"policy/clipfrac": masked_mean(clipped.to(ratio.dtype), mask).detach()}


@register_policy_loss("dual_clip", sequence=False, critic=False)
def dual_clip_loss(*, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, clip_low: float, clip_high: float, dual_clip_c: float, **kw
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", eq. 5).

    Formula: ℓ_t = ppo's ℓ_t where A_t ≥ 0; min(ppo's ℓ_t, −c·A_t) where A_t < 0, c = ``dual_clip_c`` > 1.
    In maximisation form: max(min(ρA, clip(ρ)A), c·A) for A < 0: a token whose ratio has grown far past
    1 with a negative advantage stops pulling (its loss is bounded by c·|A|, gradient 0).

    Shapes: (B, T) each -> per_token (B, T).
    Stats: "policy/clipfrac" (the ppo clip), "policy/dual_clipfrac" (masked fraction of tokens where the
    lower bound −c·A is the one in force).
    """
    _, ratio, adv = _ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
    per_token, clipped = _clipped_surrogate(ratio, adv, clip_low, clip_high)
    bound = -dual_clip_c * adv  # (B, T) > 0 where A < 0
    dual = (adv < 0) & (bound < per_token)  # (B, T)
    per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
    stats = {"policy/clipfrac": masked_mean(clipped.to(ratio.dtype), mask).detach(),
             "policy/dual_clipfrac": masked_mean(dual.to(ratio.dtype), mask).detach()}
    return per_token, stats


@register_policy_loss("gspo", sequence=True, critic=False)
def gspo_loss(*, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_low: float, clip_high: float, **kw
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071, eqs. 5–7, 10–11).

    Formula: s_i = (π_θ(y_i)/π_old(y_i))^{1/|y_i|} = exp((1/|y_i|)·Σ_t log ρ_{i,t}), the length-normalised
    sequence ratio; per token (the paper's GSPO-token form) s_{i,t} = sg[s_i]·π_θ(a_t)/sg[π_θ(a_t)], whose
    value is s_i and whose gradient is s_i·∇log π_θ(a_t); then
        ℓ_{i,t} = max(−A_{i,t}·s_{i,t}, −A_{i,t}·clip(s_{i,t}, 1 − ε_low, 1 + ε_high)).
    With a per-sequence advantage and ``loss_aggregation=seq-mean-token-mean`` the aggregated loss is the
    paper's −(1/G)·Σ_i min(s_i·A_i, clip(s_i)·A_i) in value and gradient (∇s_i = s_i·(1/|y_i|)·Σ_t
    ∇log π_θ); token-mean weighs each response by its length. The paper's bounds are ε_low = 3e-4,
    ε_high = 4e-4 (``--ppo.clip_range_low 3e-4 --ppo.clip_range_high 4e-4``): the sequence ratio is a
    geometric mean and moves far less than a token's.

    Shapes: (B, T) each -> per_token (B, T), the same value on every valid token of a row.
    Stats: "policy/clipfrac" = masked fraction of tokens (so of responses, by length) clipped;
    "policy/seq_ratio" = masked mean of s_i.
    """
    log_ratio, _, adv = _ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
    valid = mask.bool()
    seq_log_ratio = log_ratio.sum(-1) / valid.sum(-1).clamp_min(1)  # (B,)
    lp = torch.where(valid, logprobs, torch.zeros_like(logprobs))  # (B, T)
    token_ratio = torch.exp(seq_log_ratio.detach().unsqueeze(-1) + lp - lp.detach())  # (B, T) value s_i
    per_token, clipped = _clipped_surrogate(token_ratio, adv, clip_low, clip_high)
    stats = {"policy/clipfrac": masked_mean(clipped.to(token_ratio.dtype), mask).detach(),
             "policy/seq_ratio": masked_mean(token_ratio, mask).detach()}
    return per_token, stats


@register_policy_loss("cispo", sequence=False, critic=False)
def cispo_loss(*, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, clip_low: float, clip_high: float, **kw
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO, Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585, eqs. 4–5).

    Formula: ℓ_t = −sg(r̂_t)·A_t·log π_θ(a_t|s_t), r̂_t = clip(ρ_t, 1 − ε_low, 1 + ε_high): the
    importance weight is clipped and detached, but no token's gradient is dropped (PPO's clip zeroes
    the gradient of clipped tokens; here the token still trains, with weight r̂). The paper sets no
    lower bound (ε_low large: ``--ppo.clip_range_low 1``) and tunes ε_high. The loss's value is the
    paper's objective, −sg(r̂)·A·log π (not a ratio surrogate).

    Shapes: (B, T) each -> per_token (B, T).
    Stats: "policy/clipfrac" = masked fraction of tokens whose weight was truncated (r̂ ≠ ρ).
    """
    _, ratio, adv = _ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()  # (B, T) r̂
    lp = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))  # (B, T)
    truncated = (weight != ratio.detach()).to(ratio.dtype)
    return -weight * adv * lp, {"policy/clipfrac": masked_mean(truncated, mask).detach()}


@register_policy_loss("sapo", sequence=False, critic=False)
def sapo_loss(*, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, sapo_tau_pos: float, sapo_tau_neg: float, **kw
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO, Soft Adaptive Policy Optimization (Gao et al. 2025, arXiv 2511.20347, eqs. 6–8).

    Formula: ℓ_t = −f_τ(ρ_t)·A_t, f_τ(x) = (4/τ)·σ(τ·(x − 1)), τ = τ_pos where A_t > 0 else τ_neg
    (the paper: τ_neg > τ_pos, negative tokens attenuated faster). The gradient is
    −4·σ(τ(ρ−1))·(1 − σ(τ(ρ−1)))·ρ·A·∇log π_θ: exactly PPO's −A·∇log π_θ at ρ = 1, smoothly
    damped as ρ leaves 1 (a soft trust region instead of a hard clip).

    Shapes: (B, T) each -> per_token (B, T).
    Stats: "policy/sapo_gate" = masked mean of the gradient's damping 4σ(1−σ) (1 on-policy).
    """
    _, ratio, adv = _ratio_and_advantages(logprobs, old_logprobs, advantages, mask)
    tau = torch.where(adv > 0, torch.full_like(adv, sapo_tau_pos), torch.full_like(adv, sapo_tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0))  # (B, T)
    damping = 4.0 * gate * (1.0 - gate)
    return -(4.0 / tau) * gate * adv, {"policy/sapo_gate": masked_mean(damping, mask).detach()}


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    aggregation: str = "token-mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate policy loss (to minimise), aggregated: ``ppo_clip_loss`` with
    ε_low = ε_high = ``clip_range``, reduced by ``aggregate``.

    Formula: ρ_t = exp(logprobs_t − old_logprobs_t),
        loss = aggregate(max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε))), ε = clip_range.

    Shapes: logprobs, old_logprobs, advantages, mask (B, T) -> loss ().

    Returns:
        loss: scalar.
        stats: "loss/policy"; "policy/clipfrac"; "policy/approx_kl" = masked mean of
            k3 = (ρ − 1) − log ρ, an estimate of KL(π_old‖π_θ) on tokens sampled from π_old;
            "policy/ratio" = masked mean of ρ.
    """
    per_token, stats = ppo_clip_loss(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                                     mask=mask, clip_low=clip_range, clip_high=clip_range)
    loss = aggregate(per_token, mask, aggregation, max_length)
    return loss, {"loss/policy": loss.detach(), **stats, **ratio_stats(logprobs, old_logprobs, mask)}


def ratio_stats(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """"policy/approx_kl" (masked mean of k3 = (ρ − 1) − log ρ) and "policy/ratio" (masked mean of ρ),
    the token-level diagnostics every policy loss gets. Shapes: (B, T) each -> 0-dim tensors."""
    with torch.no_grad():
        log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
        return {"policy/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
                "policy/ratio": masked_mean(torch.exp(log_ratio), mask)}


# --------------------------------------------------------------------------- value, entropy, KL


def value_loss_terms(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                     clip_range: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss per token (to minimise).

    Formula: V_clip = clip(V, V_old − ε_v, V_old + ε_v), ℓ_t = ½·max((V − R)², (V_clip − R)²);
    with ``clip_range=None``, ℓ_t = ½·(V − R)². The max makes it pessimistic (OpenAI baselines, TRL).

    Shapes: values, old_values, returns, mask (B, T) -> per_token (B, T) (padding selected away).

    Stats: "val/clipfrac" = masked fraction where the clipped loss is strictly larger; "val/mean" =
        masked mean of V; "val/error" = masked mean of (V − R)².
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
    with torch.no_grad():
        stats = {"val/clipfrac": masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask),
                 "val/mean": masked_mean(values_m, mask), "val/error": masked_mean(loss_unclipped, mask)}
    return 0.5 * torch.maximum(loss_unclipped, loss_clipped), stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None,
    aggregation: str = "token-mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (to minimise): ``aggregate`` of ``value_loss_terms``.

    Formula: loss = ½·aggregate(max((V − R)², (clip(V, V_old ± ε_v) − R)²)); ½·aggregate((V − R)²)
    with ``clip_range=None``.

    Shapes: values, old_values, returns, mask (B, T) -> loss ().

    Returns:
        loss: scalar; stats: "loss/value" and those of ``value_loss_terms``.
    """
    per_token, stats = value_loss_terms(values, old_values, returns, mask, clip_range)
    loss = aggregate(per_token, mask, aggregation, max_length)
    return loss, {"loss/value": loss.detach(), **stats}


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, aggregation: str = "token-mean", max_length: int | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Aggregated policy entropy; the objective subtracts ent_coef times it.

    Formula: H = aggregate(entropy_t), entropy_t = −Σ_a π(a|s_t) log π(a|s_t)
    (per token, e.g. from ``kernels.fused_logprobs(..., return_entropy=True)``).

    Shapes: entropy (B, T), mask (B, T) -> ().

    Returns:
        bonus: scalar (differentiable); stats: {"policy/entropy"}.
    """
    bonus = aggregate(entropy, mask, aggregation, max_length)
    return bonus, {"policy/entropy": bonus.detach()}


def kl_penalty_loss(
    kl: torch.Tensor, mask: torch.Tensor, kl_coef: float | torch.Tensor, aggregation: str = "token-mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KL penalty as a loss term (to minimise), differentiated through ``kl``.

    Formula: loss = aggregate(β_b·kl_{b,t}), with kl_t computed under the current parameters: an
    estimator of the sampled tokens (k2/k3 from logprobs with grad; k3 is GRPO's placement) or the
    exact per-state KL (``kernels.fused_kl``, whose backward gives its gradient). β is a float or one
    weight per row (B,): the trainer scales each row's β like that row's return in its advantage
    (objective.py). Which placement trains E[score] − β·KL(π‖π_ref) without bias is in docs/kl.md.

    Shapes: kl (B, T) with grad, mask (B, T), kl_coef () or (B,) -> loss ().

    Returns:
        loss: scalar; stats: {"loss/kl": the aggregated KL (not multiplied by β)}.
    """
    beta = torch.as_tensor(kl_coef, dtype=kl.dtype, device=kl.device)
    if beta.dim() == 1:
        beta = beta.unsqueeze(-1)  # (B, 1)
    mean_kl = aggregate(kl, mask, aggregation, max_length)
    return aggregate(beta * kl, mask, aggregation, max_length), {"loss/kl": mean_kl.detach()}


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
