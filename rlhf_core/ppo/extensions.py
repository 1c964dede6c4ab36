"""The two places a user changes PPO itself, resolved from the config: the advantage estimator
(``ppo.advantage_estimator``: a registered name or ``file.py:function``) and the loss
(``ppo.loss_fn``: empty for :func:`objective.ppo_loss`, or ``file.py:function``).

Both are checked here, before a run writes anything (``pipeline.preflight`` and the trainer call
:func:`resolve_estimator`): an unknown name, a file that fails to import, or a group estimator
with ``group_size < 2`` is one ``ConfigError`` line naming the setting.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..config import PPOConfig
from ..errors import ConfigError
from ..user_code import is_user_spec, load_user_function
from .advantages import AdvantageEstimator, estimator_declarations, get_advantage_estimator
from .objective import LossFn, ppo_loss


@dataclass(frozen=True)
class Estimator:
    """An estimator and what the trainer does with it (``advantages.advantage_estimator``):
    ``whiten`` (after ``ppo.whiten_advantages`` overrides the declaration), ``critic``, ``groups``."""
    name: str
    fn: AdvantageEstimator
    whiten: bool
    critic: bool
    groups: bool

    def __call__(self, **kw):
        return self.fn(**kw)

    def check_policy(self, has_critic: bool) -> None:
        """Raise a one-line ConfigError when the policy's critic does not match the declaration."""
        if self.critic != has_critic:
            raise ConfigError(f"ppo.advantage_estimator={self.name!r} " + (
                "reads a critic's values: build the policy with a value head (value_model 'shared' or 'separate')"
                if self.critic else "is critic-free: build the policy with value_model='none' (no value head to "
                                    "build, train or save)"))

    def advantages(self, rewards: torch.Tensor, watch_kl: str = "", **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """``(advantages, returns)`` from the estimator. With ``watch_kl`` (the ``ppo.kl_penalty`` that put a
        KL penalty into ``rewards``), warn when the estimator never read ``rewards``: the penalty would be
        dropped (advantages.py, the contract). The estimator is called once: it may keep state."""
        watched = rewards.as_subclass(_Watched) if watch_kl else rewards
        _Watched.read = False
        advantages, returns = (t.as_subclass(torch.Tensor) for t in self.fn(rewards=watched, **kw))
        if watch_kl and not _Watched.read:
            warnings.warn(f"ppo.advantage_estimator={self.name!r} ignores the per-token rewards: the KL penalty in "
                          f"the reward (ppo.kl_penalty={watch_kl!r}) is dropped; use ppo.kl_penalty=loss or build "
                          "the advantages from `rewards`", stacklevel=3)
        return advantages, returns


class _Watched(torch.Tensor):
    """A tensor that records whether any torch operation read it (``_Watched.read``); results are plain
    tensors."""
    read = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.read = True
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def resolve_estimator(cfg: PPOConfig) -> Estimator:
    """The estimator ``cfg.advantage_estimator`` names, with its declarations and the whitening
    ``cfg.whiten_advantages`` asks for.

    Raises:
        ConfigError: unknown name, a ``file.py:function`` that does not load, or ``groups`` with
            ``cfg.group_size < 2``.
    """
    spec = cfg.advantage_estimator
    if is_user_spec(spec):
        return declared_estimator(load_user_function(spec, "ppo.advantage_estimator"), cfg, spec)
    try:
        return declared_estimator(get_advantage_estimator(spec), cfg, spec)
    except ValueError as e:
        raise ConfigError(f"ppo.advantage_estimator: {e} (or 'file.py:function')") from None


def declared_estimator(fn: AdvantageEstimator, cfg: PPOConfig, name: str = "") -> Estimator:
    """``fn`` with its declarations, ``cfg.whiten_advantages`` applied and its grouping checked.

    Raises:
        ConfigError: a group estimator with ``cfg.group_size < 2``.
    """
    name = name or getattr(fn, "__name__", "estimator")
    declared = estimator_declarations(fn)
    if declared["groups"] and cfg.group_size < 2:
        raise ConfigError(f"ppo.group_size={cfg.group_size}: advantage_estimator {name!r} compares the samples "
                          "of one prompt, expected >= 2")
    whiten = declared["whiten"] if cfg.whiten_advantages == "auto" else cfg.whiten_advantages == "true"
    return Estimator(name, fn, whiten, declared["critic"], declared["groups"])


def resolve_loss_fn(cfg: PPOConfig) -> LossFn:
    """:func:`objective.ppo_loss`, or the user's ``cfg.loss_fn`` (``file.py:function``).

    Raises:
        ConfigError: a value that is not ``file.py:function``, or one that does not load.
    """
    if not cfg.loss_fn:
        return ppo_loss
    if not is_user_spec(cfg.loss_fn):
        raise ConfigError(f"ppo.loss_fn={cfg.loss_fn!r}: expected '' (the PPO loss) or 'file.py:function'")
    return load_user_function(cfg.loss_fn, "ppo.loss_fn")
