"""rlhf-core: a from-scratch PPO/RLHF engine you can open up.

The functional core (plain tensors in, tensors out; each a small pure function you can replace):

    compute_gae, masked_whiten, approx_kl, kl_penalized_rewards, policy_loss, value_loss

Phases: ``rlhf pretrain|sft|reward|ppo|pipeline`` (see ``rlhf_core.cli``).
"""
from .ppo.advantages import compute_gae, get_advantage_estimator, masked_whiten, register_advantage_estimator
from .ppo.losses import get_policy_loss, policy_loss, policy_loss_term, register_policy_loss, value_loss
from .ppo.rewards import AdaptiveKLController, FixedKLController, approx_kl, kl_penalized_rewards

__version__ = "0.1.0"
__all__ = [
    "compute_gae", "masked_whiten", "approx_kl", "kl_penalized_rewards", "policy_loss", "value_loss",
    "register_advantage_estimator", "get_advantage_estimator", "register_policy_loss", "get_policy_loss",
    "policy_loss_term", "FixedKLController", "AdaptiveKLController",
]
