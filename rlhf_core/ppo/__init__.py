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
    masked_whiten,
    register_advantage_estimator,
    reinforce_pp_returns,
    rloo_advantages,
)
from .buffer import RolloutBuffer, accumulation_weights, micro_batches
from .experience import Experience
from .losses import (AGGREGATIONS, aggregate, aggregation_units, entropy_bonus, explained_variance, kl_penalty_loss,
                     policy_loss, value_loss)
from .rewards import (AdaptiveKLController, FixedKLController, approx_kl, kl_in_rewards, kl_penalized_rewards,
                      sequence_kls)
from .utils import last_index, masked_mean, masked_sum, masked_var

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "AdaptiveKLController",
    "Experience",
    "FixedKLController",
    "RolloutBuffer",
    "accumulation_weights",
    "advantage_estimator",
    "aggregate",
    "aggregation_units",
    "approx_kl",
    "compute_gae",
    "entropy_bonus",
    "estimator_declarations",
    "explained_variance",
    "get_advantage_estimator",
    "grpo_advantages",
    "kl_in_rewards",
    "kl_penalized_rewards",
    "kl_penalty_loss",
    "last_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "micro_batches",
    "policy_loss",
    "register_advantage_estimator",
    "reinforce_pp_returns",
    "rloo_advantages",
    "sequence_kls",
    "value_loss",
]
