"""What PPO minimises on one micro-batch: the forward pass under the current parameters, the loss
(:func:`ppo_loss` or a user's ``loss_fn``) and, when ``ppo.kl_penalty`` puts it there, the KL
penalty's loss term.

Every term reduces its per-token values with ``ppo.loss_aggregation`` (``losses.aggregate``, the
constant L of seq-mean-token-sum-norm being ``ppo.response_length``); the trainer weights
micro-batches and ranks by the matching ``losses.aggregation_units``, so the accumulated gradient
is the whole minibatch's for each aggregation. A custom ``loss_fn`` receives the bound
``aggregate`` to use, or returns its per-token loss (B, T) and lets this module aggregate it.

The KL loss term is β·aggregate(kl_t) differentiated through kl_t: an estimator of the sampled
tokens (k1/k2/k3, from the logprobs with grad) or the exact per-state KL from ``kernels.fused_kl``
(its backward; one extra reference forward under no_grad). It is divided by the standard deviation
the advantages were whitened with, so β weighs the KL against the score the same way whether the
penalty sits in the rewards (whitened with the advantages) or in the loss: with the exact KL in
both places the update is then ∇(E[score] − β·E[Σ_t KL_t]) / σ_A (docs/kl.md).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from ..config import PPOConfig
from .experience import Experience
from .losses import aggregate, entropy_bonus, kl_penalty_loss, policy_loss, value_loss
from .policy import PolicyWithValue, response_logprobs, response_logprobs_and_kl
from .rewards import approx_kl

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def ppo_loss(*, logprobs: torch.Tensor, values: torch.Tensor | None, entropy: torch.Tensor, exp: Experience,
             config: PPOConfig, **kw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The default loss: policy_loss + vf_coef·value_loss − ent_coef·entropy, each reduced with
    ``config.loss_aggregation`` (no value term without a critic: ``values`` None).

    Args: current ``logprobs``/``values``/``entropy`` (B, T) with grad; ``exp`` the micro-batch's
    rollout (old logprobs/values, advantages, returns, mask); ``aggregate``: ``x (B, T) -> ()`` with the
    configured aggregation and this micro-batch's mask. A custom ``loss_fn`` gets the same keywords
    (accept ``**kw``) and returns (loss, stats), the stats 0-dim tensors; ``loss`` either a scalar built
    with ``aggregate`` or a per-token (B, T) tensor that is aggregated for it. The KL loss term is
    added after it."""
    agg = dict(aggregation=config.loss_aggregation, max_length=config.response_length)
    pg, stats = policy_loss(logprobs, exp.logprobs, exp.advantages, exp.mask, config.clip_range, **agg)
    ent, ent_stats = entropy_bonus(entropy, exp.mask, **agg)
    loss, stats = pg - config.ent_coef * ent, {**stats, **ent_stats}
    if values is not None:
        vf, vf_stats = value_loss(values, exp.values, exp.returns, exp.mask, config.clip_range_value, **agg)
        loss, stats = loss + config.vf_coef * vf, {**stats, **vf_stats}
    return loss, stats


def micro_batch_loss(policy: PolicyWithValue, part: Experience, config: PPOConfig, loss_fn: LossFn,
                     kl_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """One micro-batch's forward and loss.

    Args:
        kl_coef: β for the KL loss term, already divided by the advantages' whitening std (unused
            when ``config.kl_penalty == "reward"``).
    Returns:
        (loss, stats, outputs): ``outputs`` holds the forward's ``logprobs`` and ``values`` (B, T).
    """
    args = (policy, part.query_ids, part.query_mask, part.response_ids, part.mask, config.temperature,
            config.kernel_backend)
    kl = None  # (B, T) with grad: the KL penalty's loss term, when it has one
    if config.kl_penalty != "reward" and config.kl_estimator == "exact":
        logprobs, values, entropy, kl = response_logprobs_and_kl(*args)
    else:
        logprobs, values, entropy = response_logprobs(*args, with_values=policy.has_critic, with_entropy=True)
        if config.kl_penalty != "reward":
            kl = approx_kl(logprobs, part.ref_logprobs, config.kl_estimator)
    agg = functools.partial(aggregate, mask=part.mask, aggregation=config.loss_aggregation,
                            max_length=config.response_length)
    loss, stats = loss_fn(logprobs=logprobs, values=values, entropy=entropy, exp=part, config=config, aggregate=agg)
    if loss.dim() == 2:  # per-token terms: reduced here, the way the accumulation weights expect
        loss = agg(loss)
    elif loss.dim() != 0:
        raise ValueError(f"loss_fn returned a loss of shape {tuple(loss.shape)}; expected a scalar or (B, T)")
    if kl is not None:
        kl_loss, kl_stats = kl_penalty_loss(kl, part.mask, kl_coef, config.loss_aggregation, config.response_length)
        loss, stats = loss + kl_loss, {**stats, **kl_stats}
    return loss, stats, {"logprobs": logprobs, "values": values}
