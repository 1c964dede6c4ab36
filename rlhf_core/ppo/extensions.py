"""The places a user changes PPO itself, resolved from the config: the advantage estimator
(``ppo.advantage_estimator``: a registered name or ``file.py:function``), the policy loss
(``ppo.policy_loss``: a registered name or ``file.py:function``), the whole loss (``ppo.loss_fn``:
empty for the objective's sum of terms, or ``file.py:function``) and the rollout correction
(``ppo.rollout_correction``: 'none', a registered name or ``file.py:function``).

All are checked here, before a run writes anything (``pipeline.preflight`` and the trainer call
these): an unknown name, a file that fails to import, an undeclared function, a group estimator with
``group_size < 2``, an estimator that ignores the per-token rewards while the KL penalty sits in
them, a policy loss that needs a critic on a critic-free run — each one ``ConfigError`` line naming
the setting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import PPOConfig
from ..errors import ConfigError
from ..user_code import is_user_spec, load_user_function
from .advantages import AdvantageEstimator, estimator_declarations, get_advantage_estimator
from .correction import RolloutCorrection, get_rollout_correction
from .losses import PolicyLoss, get_policy_loss, policy_loss_declarations
from .objective import LossFn


@dataclass(frozen=True)
class Estimator:
    """An estimator and what the trainer does with it (``advantages.advantage_estimator``):
    ``whiten`` (after ``ppo.whiten_advantages`` overrides the declaration), ``critic``, ``groups``,
    ``reads_rewards`` and ``return_weight`` (None: 1)."""
    name: str
    fn: AdvantageEstimator
    whiten: bool
    critic: bool
    groups: bool
    reads_rewards: bool = True
    return_weight: Callable[..., torch.Tensor] | None = None

    def __call__(self, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(**kw)

    def check_policy(self, has_critic: bool) -> None:
        """Raise a one-line ConfigError when the policy's critic does not match the declaration."""
        if self.critic != has_critic:
            raise ConfigError(f"ppo.advantage_estimator={self.name!r} " + (
                "reads a critic's values: build the policy with a value head (value_model 'shared' or 'separate')"
                if self.critic else "is critic-free: build the policy with value_model='none' (no value head to "
                                    "build, train or save)"))

    def row_weights(self, rewards: torch.Tensor, mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        """∂A_i/∂R_i per row (``return_weight``; ones when undeclared). Shapes: -> (B,)."""
        if self.return_weight is None:
            return torch.ones(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
        return self.return_weight(rewards=rewards, mask=mask, **kw).to(rewards.dtype)


@dataclass(frozen=True)
class PolicyLossSpec:
    """A policy loss and its declarations (``losses.policy_loss_term``)."""
    name: str
    fn: PolicyLoss
    sequence: bool
    critic: bool

    def __call__(self, **kw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.fn(**kw)


def resolve_estimator(cfg: PPOConfig) -> Estimator:
    """The estimator ``cfg.advantage_estimator`` names, with its declarations and the whitening
    ``cfg.whiten_advantages`` asks for.

    Raises:
        ConfigError: unknown name, a ``file.py:function`` that does not load or is undeclared,
            ``groups`` with ``cfg.group_size < 2``, or ``reads_rewards=False`` with a KL penalty in the
            rewards.
    """
    spec = cfg.advantage_estimator
    if is_user_spec(spec):
        return declared_estimator(load_user_function(spec, "ppo.advantage_estimator"), cfg, spec)
    try:
        return declared_estimator(get_advantage_estimator(spec), cfg, spec)
    except ValueError as e:
        raise ConfigError(f"ppo.advantage_estimator: {e} (or 'file.py:function')") from None


def declared_estimator(fn: AdvantageEstimator, cfg: PPOConfig, name: str = "") -> Estimator:
    """``fn`` with its declarations, ``cfg.whiten_advantages`` applied, its grouping and its use of the
    per-token rewards checked against the config.

    Raises:
        ConfigError: an undeclared function, a group estimator with ``cfg.group_size < 2``, or one that
            declares ``reads_rewards=False`` while ``cfg.kl_penalty`` puts a KL penalty in the rewards.
    """
    name = name or getattr(fn, "__name__", "estimator")
    try:
        declared = estimator_declarations(fn)
    except ValueError as e:
        raise ConfigError(f"ppo.advantage_estimator={name!r}: {e}") from None
    if declared["groups"] and cfg.group_size < 2:
        raise ConfigError(f"ppo.group_size={cfg.group_size}: advantage_estimator {name!r} compares the samples "
                          "of one prompt, expected >= 2")
    if not declared["reads_rewards"] and cfg.kl_penalty != "loss" and cfg.kl_coef > 0:
        raise ConfigError(f"ppo.advantage_estimator={name!r} declares reads_rewards=False: the KL penalty that "
                          f"ppo.kl_penalty={cfg.kl_penalty!r} puts in the per-token rewards would be dropped; use "
                          "--ppo.kl_penalty loss (with kl_estimator k2, k3 or exact) or --ppo.kl_coef 0")
    whiten = declared["whiten"] if cfg.whiten_advantages == "auto" else cfg.whiten_advantages == "true"
    return Estimator(name, fn, whiten, declared["critic"], declared["groups"], declared["reads_rewards"],
                     declared["return_weight"])


def resolve_policy_loss(cfg: PPOConfig, has_critic: bool | None = None, fn: PolicyLoss | None = None
                        ) -> PolicyLossSpec:
    """The policy loss ``cfg.policy_loss`` names (or ``fn``), with its declarations.

    Args:
        has_critic: whether the run has a value head (None: not known yet, not checked).
    Raises:
        ConfigError: unknown name, a ``file.py:function`` that does not load or is undeclared, or a loss
            that reads ``values`` on a critic-free run.
    """
    spec = cfg.policy_loss
    name = spec if fn is None else getattr(fn, "__name__", "policy_loss")
    if fn is None:
        if is_user_spec(spec):
            fn = load_user_function(spec, "ppo.policy_loss")
        else:
            try:
                fn = get_policy_loss(spec)
            except ValueError as e:
                raise ConfigError(f"ppo.policy_loss: {e} (or 'file.py:function')") from None
    try:
        declared = policy_loss_declarations(fn)
    except ValueError as e:
        raise ConfigError(f"ppo.policy_loss={name!r}: {e}") from None
    if declared["critic"] and has_critic is False:
        raise ConfigError(f"ppo.policy_loss={name!r} reads a critic's values, but "
                          f"ppo.advantage_estimator={cfg.advantage_estimator!r} is critic-free (no value head)")
    return PolicyLossSpec(name, fn, declared["sequence"], declared["critic"])


def resolve_loss_fn(cfg: PPOConfig) -> LossFn | None:
    """None (the objective's sum of registered terms), or the user's ``cfg.loss_fn`` (``file.py:function``),
    which replaces the policy, value and entropy terms together.

    Raises:
        ConfigError: a value that is not ``file.py:function``, or one that does not load.
    """
    if not cfg.loss_fn:
        return None
    if not is_user_spec(cfg.loss_fn):
        raise ConfigError(f"ppo.loss_fn={cfg.loss_fn!r}: expected '' (the PPO objective) or 'file.py:function'")
    return load_user_function(cfg.loss_fn, "ppo.loss_fn")


def resolve_rollout_correction(cfg: PPOConfig, whole_loss: bool | None = None) -> RolloutCorrection | None:
    """None (``ppo.rollout_correction`` 'none': π_old is the sampling policy), or the correction it names.

    Args:
        whole_loss: whether a whole-loss replacement is in use (None: ``cfg.loss_fn`` says).
    Raises:
        ConfigError: unknown name, a ``file.py:function`` that does not load, or a correction with a whole-loss
            replacement (``ppo.loss_fn``), which has no policy term for the weights to multiply: not supported yet.
    """
    spec = cfg.rollout_correction
    if spec == "none":
        return None
    if whole_loss if whole_loss is not None else bool(cfg.loss_fn):
        raise ConfigError(f"ppo.rollout_correction={spec!r} is not supported yet with a whole-loss replacement "
                          "(ppo.loss_fn): its weights multiply the objective's policy term, which loss_fn replaces; "
                          "name your policy term in ppo.policy_loss instead")
    if is_user_spec(spec):
        return load_user_function(spec, "ppo.rollout_correction")
    try:
        return get_rollout_correction(spec)
    except ValueError as e:
        raise ConfigError(f"ppo.rollout_correction: {e}, or 'none' (or 'file.py:function')") from None
