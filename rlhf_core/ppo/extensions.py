"""The two places a user changes PPO itself, resolved from the config: the advantage estimator
(``ppo.advantage_estimator``: a registered name or ``file.py:function``) and the loss
(``ppo.loss_fn``: empty for :func:`objective.ppo_loss`, or ``file.py:function``).

Both are checked here, before a run writes anything (``pipeline.preflight`` and the trainer call
:func:`resolve_estimator`): an unknown name, a file that fails to import, or a group estimator
with ``group_size < 2`` is one ``ConfigError`` line naming the setting.
"""
from __future__ import annotations

from dataclasses import dataclass

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
