"""Every policy loss, estimator and KL placement against the objective it claims, by exact enumeration
(benchmarks/loss_gradients.py builds the expectations from the trainer's own functions).

- Each registered policy loss: at θ = θ_old and at an off-policy θ where its clip (or soft gate) is
  active, the expected gradient of the code's surrogate equals autograd of the paper's surrogate
  objective (written as plain loops in ``paper_objective``); on-policy it is (1/T)·∇E[score].
- Each estimator × (kl_estimator, kl_penalty): only the pairs the docs call unbiased give the claimed
  multiple of ∇J; GRPO gives no multiple at all, with or without a KL.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from rlhf_core.ppo.advantages import ADVANTAGE_ESTIMATORS

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("loss_gradients", ROOT / "benchmarks" / "loss_gradients.py")
lg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lg)

UNBIASED_PAIRS = {("", "β = 0"), ("k1", "reward"), ("exact", "both")}


@pytest.fixture(scope="module")
def loss_rows():
    return lg.loss_table()


@pytest.fixture(scope="module")
def placement_rows():
    return lg.placement_table()


def test_every_registered_loss_is_in_the_table():
    assert {name for name, _ in lg.LOSSES.values()} == set(lg.POLICY_LOSSES)


def test_each_loss_trains_its_papers_surrogate_on_and_off_policy(loss_rows):
    for name, on, off, score, active in loss_rows:
        assert on < 1e-10 and off < 1e-10, (name, on, off)
        assert score < 1e-10, name  # on-policy: (1/T)·∇E[score] with a constant baseline


def test_the_off_policy_point_exercises_each_clip(loss_rows):
    """The off-policy comparison is not vacuous: every loss's clip or gate is active there."""
    act = {name: a for name, *_, a in loss_rows}
    for name, a in act.items():
        if "policy/clipfrac" in a:
            assert 0.1 < a["policy/clipfrac"] < 0.9, (name, a)
    assert act["dual_clip (c = 1.3)"]["policy/dual_clipfrac"] > 0.05
    assert act["sapo"]["policy/sapo_gate"] < 0.95  # the gate damps the off-policy gradient


def test_the_paper_objectives_differ_from_each_other_off_policy():
    """The comparison can fail: off policy, each paper surrogate's gradient differs from plain PPO's (on at
    least one of the three trees: clip-higher differs only where A > 0 and 1.2 < ρ < 1.28)."""
    gap = {name: 0.0 for name in lg.LOSSES if name != "ppo"}
    for seed in (0, 1, 2):
        tree = lg.Tree(seed=seed)
        grads = {}
        for name in lg.LOSSES:
            theta = lg.off_policy_theta(tree).requires_grad_()
            (grads[name],) = torch.autograd.grad(lg.paper_objective(tree, name, theta), theta)
        for name in gap:
            gap[name] = max(gap[name], float((grads[name] - grads["ppo"]).norm() / grads["ppo"].norm()))
    assert min(gap.values()) > 1e-3, gap


def test_only_the_claimed_pairs_are_unbiased(placement_rows):
    for estimator, ke, penalty, dev, direction in placement_rows:
        if estimator == "grpo":  # GRPO's std normalisation: no multiple of ∇J, even without a KL
            assert direction > 0.05, (ke, penalty, direction)
        elif (ke, penalty) in UNBIASED_PAIRS:
            assert dev < 1e-10, (estimator, ke, penalty, dev)
        else:
            assert dev > 0.1, (estimator, ke, penalty, dev)


def test_dr_grpo_both_is_unbiased_because_the_kl_term_follows_its_scale():
    """Without the estimator's return weight (1 − 1/k) on the KL loss term, exact/both with Dr. GRPO is
    biased (the audit's defect): the weight is what makes the split consistent."""
    batches = lg.Batches(lg.Tree(seed=1))
    dev, _ = lg.placement_deviation(batches, "dr_grpo", "exact", "both")
    assert dev < 1e-10
    estimator = ADVANTAGE_ESTIMATORS["dr_grpo"]
    weight = estimator.return_weight
    try:
        estimator.return_weight = None  # the KL loss term at weight 1, the reward half at 1 − 1/k
        biased, direction = lg.placement_deviation(batches, "dr_grpo", "exact", "both")
    finally:
        estimator.return_weight = weight
    assert biased > 0.05 and direction > 0.05


@pytest.mark.parametrize("pair", [("k1", "reward"), ("exact", "both")])
def test_whitened_rewards_rescale_both_halves_of_the_penalty_alike(pair):
    """whiten_rewards divides the reward-placed KL by σ_r; the loss-placed half is divided by the same σ_r,
    so (responses of equal length) the expected update stays an exact multiple of ∇J."""
    batches = lg.Batches(lg.Tree(seed=2))
    dev, direction = lg.placement_deviation(batches, "rloo", *pair, whiten_rewards=True)
    assert direction < 1e-10 and dev > 1e-3  # a multiple of ∇J, not ∇J itself (1/σ_r)


def test_docs_tables_are_this_computation(loss_rows, placement_rows):
    page = (ROOT / "docs" / "losses.md").read_text(encoding="utf-8")
    assert lg.markdown_losses(loss_rows) in page
    assert lg.markdown_placements(placement_rows) in page
