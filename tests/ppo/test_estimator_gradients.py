"""The expected policy gradient each estimator produces, by enumeration, against autograd of the
objective it claims.

A one-token bandit: π = softmax(θ) over V = 3 answers with fixed rewards r(y), groups of k = 3 samples
(every one of the V^k groups enumerated with its probability). The update's first step sees ρ = 1, so
the code's loss (``policy_loss`` with token-mean over the group) has gradient −(1/k)·Σ_i A_i·∇log π(y_i).
Its expectation must be:
- RLOO (leave-one-out baseline, independent of y_i): −∇E_π[r], the unbiased REINFORCE gradient;
- Dr. GRPO (the group mean includes y_i itself): −(1 − 1/k)·∇E_π[r], the same direction, scaled;
- REINFORCE++ before its normalisation (returns of the per-token rewards): −∇E_π[r];
- GAE with V ≡ 0, γ = λ = 1: −∇E_π[r].
GRPO's division by the group's std makes its expectation no multiple of ∇E_π[r] in general (the test
shows it on this bandit): it trains another objective, as Liu et al. 2025 point out.
"""
import itertools

import pytest
import torch

from rlhf_core.ppo.advantages import compute_gae, grpo_advantages, reinforce_pp_returns, rloo_advantages
from rlhf_core.ppo.losses import policy_loss

V, K = 3, 3
THETA = torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64)
REWARD = torch.tensor([1.0, -0.4, 0.25], dtype=torch.float64)

ESTIMATORS = {
    "rloo": lambda r, m: rloo_advantages(r, m, K)[0],
    "dr_grpo": lambda r, m: grpo_advantages(r, m, K, scale=False)[0],
    "grpo": lambda r, m: grpo_advantages(r, m, K, scale=True)[0],
    "reinforce_pp": lambda r, m: reinforce_pp_returns(r, m, 1.0)[0],
    "gae_v0": lambda r, m: compute_gae(r, torch.zeros_like(r), m, 1.0, 1.0)[0],
}


def expected_gradient(estimator) -> torch.Tensor:
    """Σ over every group of P(group)·∇ loss(group), the loss as the trainer computes it."""
    total = torch.zeros(V, dtype=torch.float64)
    for group in itertools.product(range(V), repeat=K):
        theta = THETA.clone().requires_grad_(True)
        logp = torch.log_softmax(theta, -1)
        ys = torch.tensor(group)
        prob = float(torch.exp(logp[ys].sum()).detach())
        mask = torch.ones(K, 1, dtype=torch.float64)
        adv = estimator(REWARD[ys].view(K, 1), mask)  # (K, 1)
        lp = logp[ys].view(K, 1)
        loss, _ = policy_loss(lp, lp.detach(), adv, mask, clip_range=0.2)
        (grad,) = torch.autograd.grad(loss, theta)
        total += prob * grad
    return total


def objective_gradient() -> torch.Tensor:
    theta = THETA.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((torch.softmax(theta, -1) * REWARD).sum(), theta)
    return grad


@pytest.mark.parametrize("name, scale", [("rloo", 1.0), ("dr_grpo", 1 - 1 / K), ("reinforce_pp", 1.0),
                                         ("gae_v0", 1.0)])
def test_expected_gradient_is_the_claimed_multiple_of_grad_expected_reward(name, scale):
    torch.testing.assert_close(expected_gradient(ESTIMATORS[name]), -scale * objective_gradient(),
                               rtol=1e-12, atol=1e-12)


def test_grpo_std_normalisation_is_not_a_multiple_of_grad_expected_reward():
    g, target = expected_gradient(ESTIMATORS["grpo"]), -objective_gradient()
    off_axis = g - (g @ target / (target @ target)) * target  # the part no rescaling of ∇E[r] explains
    assert off_axis.norm() / g.norm() > 0.05  # 0.084 on this bandit (cosine 0.996)
