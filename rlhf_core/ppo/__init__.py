"""PPO / RLHF functional core: rewards, advantages, losses, experience and buffer.

Math modules import only torch; every function takes plain tensors and floats.
"""

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_gae,
    get_advantage_estimator,
    masked_whiten,
    register_advantage_estimator,
    rloo_advantages,
)
from .buffer import RolloutBuffer, accumulation_weights, micro_batches
from .experience import Experience
from .losses import aggregate, entropy_bonus, explained_variance, kl_penalty_loss, policy_loss, value_loss
from .rewards import (AdaptiveKLController, FixedKLController, approx_kl, kl_in_rewards, kl_penalized_rewards,
                      sequence_kls)
from .utils import last_index, masked_mean, masked_sum, masked_var

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdaptiveKLController",
    "Experience",
    "FixedKLController",
    "RolloutBuffer",
    "accumulation_weights",
    "aggregate",
    "approx_kl",
    "compute_gae",
    "entropy_bonus",
    "explained_variance",
    "get_advantage_estimator",
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
    "rloo_advantages",
    "sequence_kls",
    "value_loss",
]
