"""What PPO minimises: a sum of per-token terms, reduced once.

    loss = aggregate(ℓ^policy_t + vf_coef·ℓ^value_t − ent_coef·H_t + β_b·kl_t)

- ℓ^policy: the registered policy loss ``ppo.policy_loss`` (losses.py: ppo, dual_clip, gspo, cispo,
  sapo, or ``file.py:function``), per token; with a rollout correction (``ppo.rollout_correction``),
  multiplied by the token's detached weight w_t (``Experience.correction_weights``, correction.py).
- ℓ^value: the clipped value loss (only with a critic).
- H: the policy's entropy at each state (from the fused logprob kernel).
- β_b·kl_t: the KL penalty's loss term, when ``ppo.kl_penalty`` puts it there (``loss`` or ``both``):
  an estimator of the sampled token under the current parameters (k2/k3) or the exact per-state KL
  (``kernels.fused_kl``, its backward). β_b is the row's ``Experience.kl_coef``: β times the scale at
  which that row's return reaches its advantage (the estimator's ``return_weight``, and the whitening
  of the rewards and of the advantages), so the part of the penalty trained through the loss is
  weighed like the part in the rewards (docs/kl.md, docs/losses.md).

``aggregate`` (``ppo.loss_aggregation``) divides by the whole minibatch's count (``Denominators``,
summed over every micro-batch and rank), so each micro-batch's loss is its share of the minibatch
loss: the trainer sums the backward passes, with no weights, and the gradient is the one of the whole
minibatch in one process for any micro-batch size and world size. Every statistic is a share in the
same way (loss terms by the aggregation's units, diagnostics by valid tokens), so they sum too.

A whole-loss replacement (``ppo.loss_fn``, ``PPOTrainer(loss_fn=...)``) is still accepted: it gets the
forward's outputs and ``aggregate`` bound to these denominators, and replaces the policy, value and
entropy terms together; the KL loss term is added to it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import PPOConfig
from ..errors import UserCodeError, user_code
from ..user_code import is_user_spec, load_user_function
from .experience import Experience
from .losses import (aggregate, aggregation_units, get_policy_loss, ppo_clip_loss, ratio_stats, value_loss_terms)
from .policy import PolicyWithValue, response_logprobs, response_logprobs_and_kl
from .rewards import approx_kl

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Denominators:
    """What a minibatch's aggregates divide by, counted over every micro-batch and every rank.

    ``units``: the aggregation's units (``losses.aggregation_units``: valid tokens, non-empty rows, or
    rows); ``tokens``: valid loss tokens (the diagnostics are token means)."""
    units: float
    tokens: float

    @classmethod
    def of(cls, mask: torch.Tensor, aggregation: str, total: Callable[[float], float] = float) -> "Denominators":
        """The local counts of ``mask`` (B, T), passed through ``total`` (e.g. a sum over ranks)."""
        return cls(total(float(aggregation_units(mask, aggregation).sum())), total(float(mask.bool().sum())))


def policy_loss_options(config: PPOConfig) -> dict[str, float]:
    """The keyword floats every policy loss receives: ε_low / ε_high (``clip_range_low`` / ``_high``, each
    defaulting to ``clip_range``), the dual-clip c and SAPO's temperatures."""
    return {"clip_low": config.clip_range_low or config.clip_range,
            "clip_high": config.clip_range_high or config.clip_range,
            "dual_clip_c": config.dual_clip_c, "sapo_tau_pos": config.sapo_tau_pos,
            "sapo_tau_neg": config.sapo_tau_neg}


def default_policy_loss(config: PPOConfig) -> Callable[..., Any]:
    """The function ``config.policy_loss`` names (registered or ``file.py:function``)."""
    if is_user_spec(config.policy_loss):
        return load_user_function(config.policy_loss, "ppo.policy_loss")
    return get_policy_loss(config.policy_loss) if config.policy_loss else ppo_clip_loss


def _scalar_stats(stats: Any) -> bool:
    """A user function's stats: a dict of 0-dim tensors or numbers."""
    return isinstance(stats, dict) and all(isinstance(v, (torch.Tensor, float, int)) and
                                           torch.as_tensor(v).numel() == 1 for v in stats.values())


def _checked(name: str, out: Any, logprobs: torch.Tensor, mask: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A policy loss's output, or a one-line UserCodeError naming the function and what was wrong."""
    where = f"ppo.policy_loss {name!r}"
    if not (isinstance(out, tuple) and len(out) == 2):
        raise UserCodeError(f"{where} returned {type(out).__name__}; expected (per_token (B, T), stats dict)")
    per_token, stats = out
    if not isinstance(per_token, torch.Tensor) or per_token.shape != mask.shape:
        got = tuple(per_token.shape) if isinstance(per_token, torch.Tensor) else type(per_token).__name__
        raise UserCodeError(f"{where} returned a per-token loss of shape {got}; expected (B, T) = {tuple(mask.shape)}")
    if not _scalar_stats(stats):
        raise UserCodeError(f"{where} returned stats that are not a dict of scalars")
    valid = mask.bool()
    if not bool(torch.isfinite(per_token[valid]).all()) and bool(torch.isfinite(logprobs[valid]).all()):
        raise UserCodeError(f"{where} returned a non-finite per-token loss from finite log-probabilities")
    return per_token, stats


def loss_terms(*, logprobs: torch.Tensor, values: torch.Tensor | None, entropy: torch.Tensor,
               kl: torch.Tensor | None, exp: Experience, config: PPOConfig, policy_loss: Callable[..., Any]
               ) -> tuple[dict[str, tuple[float, torch.Tensor]], dict[str, torch.Tensor]]:
    """The objective's per-token terms and the policy/value diagnostics of one micro-batch.

    Args: current ``logprobs``/``values`` (None without a critic)/``entropy``, and ``kl`` (the KL loss
    term's per-token KL under the current parameters, or None) (B, T) with grad; ``exp`` the micro-batch's
    rollout; ``policy_loss`` a policy-loss function (losses.py contract).

    Returns:
        terms: name -> (coefficient, per-token values (B, T)): "policy" (1; w_t·ℓ_t with a rollout
            correction's weights), "value" (vf_coef, with a
            critic), "entropy" (−ent_coef), "kl" (1, already β_b·kl_t, when ``kl`` is given).
        stats: masked-mean diagnostics over this micro-batch's loss tokens.
    """
    mask = exp.loss_tokens
    name = getattr(policy_loss, "name", getattr(policy_loss, "__name__", "policy_loss"))
    with user_code(f"ppo.policy_loss {name!r}"):
        out = policy_loss(logprobs=logprobs, old_logprobs=exp.logprobs, advantages=exp.advantages, mask=mask,
                          values=values, **policy_loss_options(config))
    per_token, stats = _checked(name, out, logprobs, mask)
    if exp.correction_weights is not None:  # w_t·ℓ_t: the tokens were sampled from μ, not π_old
        per_token = exp.correction_weights.to(per_token.dtype) * per_token
    stats = {k: torch.as_tensor(v).detach().reshape(()) for k, v in stats.items()}
    terms = {"policy": (1.0, per_token), "entropy": (-config.ent_coef, entropy)}
    stats.update(ratio_stats(logprobs, exp.logprobs, mask))
    if values is not None:
        vf, vf_stats = value_loss_terms(values, exp.values, exp.returns, mask, config.clip_range_value)
        terms["value"] = (config.vf_coef, vf)
        stats.update(vf_stats)
    if kl is not None:
        if exp.kl_coef is None:
            raise ValueError("a KL loss term needs Experience.kl_coef, the per-row weight that "
                             "experience_maker.compute_advantages sets")
        terms["kl"] = (1.0, exp.kl_coef.to(kl.dtype).unsqueeze(-1) * kl)  # (B, T) β_b·kl_t
        terms["kl_raw"] = (0.0, kl)  # logged as loss/kl (the KL itself, not weighted)
    return terms, stats


_TERM_STATS = {"policy": "loss/policy", "value": "loss/value", "entropy": "policy/entropy", "kl_raw": "loss/kl"}


def reduce_terms(terms: dict[str, tuple[float, torch.Tensor]], mask: torch.Tensor, config: PPOConfig,
                 units: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``aggregate(Σ_k c_k·term_k)`` once, and each term's own aggregate as a stat (``loss/policy``,
    ``loss/value``, ``policy/entropy``, ``loss/kl``), all divided by ``units`` (default: this batch's)."""
    agg = functools.partial(aggregate, mask=mask, aggregation=config.loss_aggregation,
                            max_length=config.response_length, units=units)
    total = sum(c * t for c, t in terms.values() if c != 0)
    loss = agg(total) if isinstance(total, torch.Tensor) else torch.zeros((), device=mask.device)
    return loss, {_TERM_STATS[k]: agg(t.detach()) for k, (_, t) in terms.items() if k in _TERM_STATS}


def ppo_loss(*, logprobs: torch.Tensor, values: torch.Tensor | None, entropy: torch.Tensor, exp: Experience,
             config: PPOConfig, policy_loss: Callable[..., Any] | None = None, **kw: Any
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective without its KL term on one batch, aggregated over that batch alone:
    aggregate(ℓ^policy + vf_coef·ℓ^value − ent_coef·H), the policy loss ``config.policy_loss`` (or
    ``policy_loss``). What a custom ``loss_fn`` replaces; the stats are this batch's."""
    terms, stats = loss_terms(logprobs=logprobs, values=values, entropy=entropy, kl=None, exp=exp, config=config,
                              policy_loss=policy_loss or default_policy_loss(config))
    loss, term_stats = reduce_terms(terms, exp.loss_tokens, config)
    return loss, {**term_stats, **stats}


def forward(policy: PolicyWithValue, part: Experience, config: PPOConfig
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The training forward of one micro-batch: (logprobs, values, entropy, kl), each (B, T), ``kl`` the
    KL loss term's per-token KL (None when the penalty is only in the rewards)."""
    args = (policy, part.query_ids, part.query_mask, part.response_ids, part.mask, config.temperature,
            config.kernel_backend)
    if config.kl_penalty != "reward" and config.kl_estimator == "exact":
        return response_logprobs_and_kl(*args)
    logprobs, values, entropy = response_logprobs(*args, with_values=policy.has_critic, with_entropy=True)
    kl = approx_kl(logprobs, part.ref_logprobs, config.kl_estimator) if config.kl_penalty != "reward" else None
    return logprobs, values, entropy, kl


def micro_batch_loss(policy: PolicyWithValue, part: Experience, config: PPOConfig,
                     policy_loss: Callable[..., Any], den: Denominators, loss_fn: LossFn | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """One micro-batch's forward and its share of the minibatch loss.

    Args:
        policy_loss: the policy-loss function; den: the whole minibatch's counts; loss_fn: a whole-loss
            replacement (None: the objective's terms).
    Returns:
        (loss, stats, outputs): ``loss`` and every stat are this micro-batch's shares (they sum over the
        micro-batches and ranks to the minibatch's values); ``outputs`` holds the forward's ``logprobs``
        and ``values`` (B, T).
    """
    logprobs, values, entropy, kl = forward(policy, part, config)
    mask = part.loss_tokens
    share = float(mask.bool().sum()) / max(den.tokens, 1.0)  # this micro-batch's share of the tokens
    if loss_fn is None:
        terms, stats = loss_terms(logprobs=logprobs, values=values, entropy=entropy, kl=kl, exp=part, config=config,
                                  policy_loss=policy_loss)
        loss, term_stats = reduce_terms(terms, mask, config, den.units)
    else:
        agg = functools.partial(aggregate, mask=mask, aggregation=config.loss_aggregation,
                                max_length=config.response_length, units=den.units)
        where = f"ppo.loss_fn {getattr(loss_fn, '__name__', 'loss_fn')!r}"
        with user_code(where):
            out = loss_fn(logprobs=logprobs, values=values, entropy=entropy, exp=part, config=config, aggregate=agg)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise UserCodeError(f"{where} returned {type(out).__name__}; expected (loss, stats dict)")
        loss, stats = out
        if isinstance(loss, torch.Tensor) and loss.shape == mask.shape:  # per-token terms: reduced here
            loss = agg(loss)
        elif not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise UserCodeError(f"{where} returned a loss of shape {got}; expected a scalar built with `aggregate` "
                                f"or a per-token loss of shape (B, T) = {tuple(mask.shape)}")
        if not _scalar_stats(stats):
            raise UserCodeError(f"{where} returned stats that are not a dict of scalars")
        term_stats = {}
        if kl is not None:
            kl_loss, term_stats = reduce_terms({"kl": (1.0, kl * part.kl_coef.unsqueeze(-1)), "kl_raw": (0.0, kl)},
                                               mask, config, den.units)
            loss = loss + kl_loss
    stats = {**{k: share * float(v) for k, v in stats.items()}, **{k: float(v) for k, v in term_stats.items()}}
    return loss, stats, {"logprobs": logprobs, "values": values}
