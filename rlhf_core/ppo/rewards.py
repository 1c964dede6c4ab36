"""Per-token RLHF rewards: a KL penalty to the reference policy plus the sequence score.

RLHF optimises  E[score] − β·KL(π‖π_ref)  (Ziegler et al. 2019, "Fine-Tuning Language Models
from Human Preferences", arXiv:1909.08593). The KL is spread over the tokens as a per-token
penalty and the score is paid once, on the last valid token of each response.

KL estimators follow J. Schulman, "Approximating KL divergence" (2020),
http://joschu.net/blog/kl-approx.html. With samples a ~ π and log r = log π_ref(a) − log π(a):
    k1 = −log r              unbiased value, high variance, can be negative
    k2 = ½·(log r)²          biased value, low variance, ≥ 0
    k3 = (r − 1) − log r     unbiased value, low variance, ≥ 0
"Unbiased" is about the KL's *value*. What matters for training is the gradient each one gives
where it is placed: as a per-token reward only k1 gives the gradient of KL(π‖π_ref) (k3's is that
of KL(π‖π_ref) − KL(π_ref‖π)); the exact KL of a state does not depend on the action taken there,
so it trains only through a loss term (``kl_in_rewards(..., "both")``). docs/kl.md has every
(estimator, placement) pair's gradient, checked by exact enumeration (tests/ppo/test_kl_gradients.py).

Imports only torch: plain tensors and floats in and out.
"""

from __future__ import annotations

import torch

from .utils import last_index

__all__ = [
    "KL_ESTIMATORS",
    "approx_kl",
    "kl_in_rewards",
    "kl_penalized_rewards",
    "sequence_kls",
    "FixedKLController",
    "AdaptiveKLController",
]

KL_ESTIMATORS = ("k1", "k2", "k3")

# exp(20) ≈ 4.9e8 is far beyond any useful ratio; clamping keeps k3 finite in fp16/bf16/fp32
# where a diverged token would otherwise give exp(log r) = inf (OpenRLHF clamps the same way).
LOG_RATIO_CLAMP = 20.0


def approx_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from the log-probs of the sampled tokens.

    Formula: log r = ref_logprobs − logprobs, then
        k1 = −log r,   k2 = ½·(log r)²,   k3 = (exp(log r) − 1) − log r,
    where for k3 log r is first clamped to [−20, 20] (in both terms, so k3 ≥ 0 still holds).

    Convention: tokens are sampled from π (the policy that produced ``logprobs``); the mean
    of k1 or k3 over such tokens is an unbiased estimate of KL(π‖π_ref).

    Args:
        logprobs: log π(a_t | s_t) of the sampled tokens.
        ref_logprobs: log π_ref(a_t | s_t) of the same tokens.
        estimator: "k1", "k2" or "k3".

    Shapes: logprobs (B, T), ref_logprobs (B, T) -> (B, T). Padding is not masked here.

    Returns:
        kl: (B, T) per-token estimate, in the inputs' dtype.

    Raises:
        ValueError: unknown ``estimator``.
    """
    log_ratio = ref_logprobs - logprobs  # (B, T)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: −kl_coef·KL on every valid token, plus the score on the last one.

    Formula: r_t = −kl_coef·m_t·kl_t + score·[t = last valid index of the row].

    Convention: the score lands on the last valid token of each row (the EOS, or the last
    token of a response truncated without EOS) — not on the pad after it, which is TRL's bug
    (issues #1893, #3750) and makes the reward invisible to a masked GAE. A row with no valid
    token gets no reward at all (all zeros).

    Args:
        scores: sequence-level scores from the reward function / model.
        logprobs: log π(a_t | s_t) of the sampled response tokens (the rollout policy).
        ref_logprobs: log π_ref(a_t | s_t) of the same tokens.
        mask: 1 on valid response tokens (right-padded).
        kl_coef: the KL penalty coefficient β (e.g. ``controller.value``).
        estimator: "k1", "k2" or "k3" (see ``approx_kl``); ignored when ``kl`` is given.
        kl: optional precomputed per-token KL, e.g. the exact full-vocabulary
            KL(π‖π_ref) from ``kernels.fused_kl``; used instead of the estimator.

    Shapes: scores (B,), logprobs (B, T), ref_logprobs (B, T), mask (B, T), kl (B, T)
        -> rewards (B, T), kl (B, T).

    Returns:
        rewards: (B, T) per-token rewards, 0 on padding.
        kl: (B, T) the per-token KL that was penalised, 0 on padding (log it as objective/kl).
    """
    if kl is None:
        kl = approx_kl(logprobs, ref_logprobs, estimator)  # (B, T)
    valid = mask.bool()  # (B, T)
    kl = torch.where(valid, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last = last_index(mask)  # (B,) -1 for empty rows
    pos = torch.arange(mask.shape[-1], device=mask.device)  # (T,)
    at_last = pos.unsqueeze(0) == last.unsqueeze(1)  # (B, T); all False when last = -1
    score_t = scores.to(rewards.dtype).unsqueeze(1)  # (B, 1)
    rewards = rewards + torch.where(at_last, score_t, torch.zeros_like(rewards))  # (B, T)
    return rewards, kl


def kl_in_rewards(kl: torch.Tensor, mask: torch.Tensor, penalty: str) -> torch.Tensor:
    """The per-token KL that a penalty placement puts into the rewards.

    Formula: "reward" → kl_t; "loss" → 0 (the penalty is a loss term only); "both" → kl_{t+1},
    the *next* state's KL (0 after a row's last valid token): the reward of a_t carries
    −β·KL(s_{t+1}), the KL that a_t leads to, while s_t's own KL — which a_t cannot change —
    is trained through the loss (its direct gradient). With the exact per-state KL this makes
    "both" the unbiased gradient of E[score] − β·E[Σ_t KL(π(·|s_t)‖π_ref(·|s_t))].

    Shapes: kl (B, T), mask (B, T) right-padded -> (B, T), 0 on padding.

    Raises:
        ValueError: unknown ``penalty``.
    """
    valid = mask.bool()  # (B, T)
    kl = torch.where(valid, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))  # (B, T)
    if penalty == "reward":
        return kl
    if penalty == "loss":
        return torch.zeros_like(kl)
    if penalty == "both":
        return torch.nn.functional.pad(kl[:, 1:], (0, 1)) * valid  # (B, T) kl_{t+1}; padding stays 0
    raise ValueError(f"unknown KL penalty placement {penalty!r}; choose reward, loss or both")


def sequence_kls(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_exact: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-response KL to the reference, three ways, on the same rollout: "exact" (Σ_t of the
    full-vocabulary KL of each state), "k1" and "k3" (Σ_t of the estimates from the sampled tokens).
    The gap between them is how far an estimator is from the truth on this batch.

    Shapes: logprobs, ref_logprobs, kl_exact, mask (B, T) -> {"exact", "k1", "k3"}: (B,) each.
    """
    valid = mask.bool()
    zero = torch.zeros((), dtype=kl_exact.dtype, device=kl_exact.device)
    return {"exact": torch.where(valid, kl_exact, zero).sum(-1),
            **{k: torch.where(valid, approx_kl(logprobs, ref_logprobs, k), zero).sum(-1) for k in ("k1", "k3")}}


class FixedKLController:
    """A constant KL coefficient: ``update`` is a no-op.

    Args:
        kl_coef: the KL penalty coefficient β.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep β fixed (same signature as ``AdaptiveKLController.update``)."""

    def state_dict(self) -> dict[str, float]:
        """Plain floats, for the JSON checkpoint state."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore β from ``state_dict()``."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient that steers the observed KL toward a target.

    Ziegler et al. 2019 (arXiv:1909.08593, eq. 2), a multiplicative proportional controller:
        e = clip(current_kl / target − 1, −0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)
    so β grows when the KL is above target and shrinks when below, by at most 20 % per horizon.

    Args:
        init_kl_coef: starting β.
        target: target KL per sequence (nats), same unit as ``current_kl``.
        horizon: number of samples over which the error is corrected (e.g. 10_000).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β toward the target.

        Args:
            current_kl: the KL observed in this batch (mean per sequence).
            n_steps: number of samples (episodes) seen since the last update, i.e. batch size.
        """
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, float]:
        """Plain floats, for the JSON checkpoint state."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from ``state_dict()``; target and horizon are optional (a config may change them)."""
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
