"""Extend the PPO engine without copying the trainer: a new advantage estimator and a new loss.

1. ``reinforce_baseline``: REINFORCE with a running-mean baseline (no critic in the advantage),
   registered by name and selected with ``PPOConfig(advantage_estimator="reinforce_baseline")``.
2. ``kl_in_loss``: the clipped PPO loss plus a k3 KL-to-reference term inside the loss (as GRPO
   does) instead of in the reward, passed to ``PPOTrainer(loss_fn=...)``.

Run: ``python examples/custom_advantage.py`` (a few iterations on a tiny random model, CPU, ~10 s).
"""
from __future__ import annotations

import torch

from rlhf_core.config import PPOConfig, TinyModelConfig
from rlhf_core.testing import tiny_setup
from rlhf_core.ppo import approx_kl, masked_mean, policy_loss, register_advantage_estimator, value_loss
from rlhf_core.ppo.policy import PolicyWithValue
from rlhf_core.ppo.trainer import PPOTrainer

BASELINE = {"mean": 0.0, "decay": 0.9}


@register_advantage_estimator("reinforce_baseline")
def reinforce_baseline(*, rewards, mask, **kw):
    """A_t = (Σ_{t'≥t} r_t') − b, b an exponential moving average of the sequence returns."""
    returns = rewards.flip(-1).cumsum(-1).flip(-1) * mask  # (B, T) reward-to-go
    advantages = (returns - BASELINE["mean"]) * mask  # (B, T)
    seq_mean = float(returns[:, 0].mean())
    BASELINE["mean"] = BASELINE["decay"] * BASELINE["mean"] + (1 - BASELINE["decay"]) * seq_mean
    return advantages, returns


def kl_in_loss(*, logprobs, values, entropy, exp, config, beta: float = 0.05, **kw):
    """PPO clip + vf_coef·value loss + β·k3 KL(π‖π_ref) on the sampled tokens, token-mean."""
    pg, stats = policy_loss(logprobs, exp.logprobs, exp.advantages, exp.mask, config.clip_range)
    vf, vf_stats = value_loss(values, exp.values, exp.returns, exp.mask, config.clip_range_value)
    kl = masked_mean(approx_kl(logprobs, exp.ref_logprobs, "k3"), exp.mask)
    return pg + config.vf_coef * vf + beta * kl, {**stats, **vf_stats, "policy/kl_to_ref": kl.detach()}


def letter_e_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A toy reward a random model can move: the fraction of the response's characters that are 'e'."""
    return [r.count("e") / max(len(r), 1) for r in responses]


def main(n_iterations: int = 3) -> dict[str, float]:
    """Train a tiny random policy for ``n_iterations`` with both extensions; return the summary."""
    tokenizer, model, task = tiny_setup(n_eval_prompts=8, model_cfg=TinyModelConfig(hidden_size=32, num_layers=1))
    torch.manual_seed(0)
    policy = PolicyWithValue(model)
    cfg = PPOConfig(num_iterations=n_iterations, batch_size=8, num_mini_batches=2, response_length=8,
                    advantage_estimator="reinforce_baseline", kl_coef=0.0, learning_rate=1e-3, eval_every=0)
    trainer = PPOTrainer(cfg, policy, tokenizer, letter_e_reward, task.prompts, task.eval_prompts,
                         loss_fn=kl_in_loss)
    return trainer.train()


if __name__ == "__main__":
    print(main())
