"""PPO / RLHF functional core: rewards, advantages, losses, experience and buffer.

Math modules import only torch; every function takes plain tensors and floats.
"""

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    advantage_estimator,
    compute_gae,
    estimator_declarations,
    get_advantage_estimator,
    grpo_advantages,
    grpo_return_weights,
    group_index,
    masked_whiten,
    register_advantage_estimator,
    reinforce_pp_returns,
    rloo_advantages,
)
from .buffer import RolloutBuffer, accumulation_weights, micro_batches
from .correction import (ROLLOUT_CORRECTIONS, get_rollout_correction, icepop_weights, importance_ratio,
                         masked_is_weights, register_rollout_correction, truncated_is_weights)
from .experience import Experience
from .losses import (AGGREGATIONS, POLICY_LOSSES, aggregate, aggregation_units, cispo_loss, dual_clip_loss,
                     entropy_bonus, explained_variance, get_policy_loss, gspo_loss, kl_penalty_loss, policy_loss,
                     policy_loss_term, ppo_clip_loss, register_policy_loss, sapo_loss, value_loss, value_loss_terms)
from .rewards import (AdaptiveKLController, FixedKLController, approx_kl, kl_in_rewards, kl_penalized_rewards,
                      sequence_kls)
from .utils import last_index, masked_mean, masked_sum, masked_var

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "POLICY_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "AdaptiveKLController",
    "Experience",
    "FixedKLController",
    "RolloutBuffer",
    "accumulation_weights",
    "advantage_estimator",
    "aggregate",
    "aggregation_units",
    "approx_kl",
    "cispo_loss",
    "compute_gae",
    "dual_clip_loss",
    "entropy_bonus",
    "estimator_declarations",
    "explained_variance",
    "get_advantage_estimator",
    "get_policy_loss",
    "get_rollout_correction",
    "group_index",
    "grpo_advantages",
    "grpo_return_weights",
    "gspo_loss",
    "icepop_weights",
    "importance_ratio",
    "kl_in_rewards",
    "kl_penalized_rewards",
    "kl_penalty_loss",
    "last_index",
    "masked_is_weights",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "micro_batches",
    "policy_loss",
    "policy_loss_term",
    "ppo_clip_loss",
    "register_advantage_estimator",
    "register_policy_loss",
    "register_rollout_correction",
    "reinforce_pp_returns",
    "rloo_advantages",
    "sapo_loss",
    "sequence_kls",
    "truncated_is_weights",
    "value_loss",
    "value_loss_terms",
]
