"""Every (kl_estimator, kl_penalty) pair's gradient against autograd of the exact objective, by exact
enumeration of a tiny tree (benchmarks/kl_gradients.py builds it from the trainer's own functions).

Only the k1 reward and the exact KL in both places train E[score] − β·E[Σ_t KL(π(·|s_t)‖π_ref(·|s_t))]
without bias; docs/kl.md shows the deviation of every other pair, which must be what this computes.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("kl_gradients", ROOT / "benchmarks" / "kl_gradients.py")
kg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kg)

UNBIASED = {("k1", "reward"), ("exact", "both")}


@pytest.fixture(scope="module")
def rows():
    return kg.table()


def test_exactly_two_pairs_are_unbiased(rows):
    from rlhf_core.config import KL_PENALTIES
    assert {(e, p) for e, p, *_ in rows} == set(kg.PAIRS) and len(kg.PAIRS) == 9
    accepted = {(e, p) for e, places in KL_PENALTIES.items() for p in places}
    assert set(kg.PAIRS) - accepted == {("k1", "loss")}  # refused: its expected KL gradient is 0 at θ_old
    for e, p, whole, kl_part in rows:
        if (e, p) in UNBIASED:
            assert whole < 1e-9 and kl_part < 1e-9, (e, p, whole)
        else:
            assert whole > 0.1 and kl_part > 0.1, (e, p, whole)  # far from round-off: a real bias


def test_k3_reward_trains_the_difference_of_two_kls():
    """The k3 reward's gradient is that of −β·[KL(π‖ref) − KL(ref‖π)] (per state, through the
    policy gradient), not −β·∇KL(π‖ref): checked on the one-state tree (T = 1); longer responses below."""
    tree, beta = kg.Tree(length=1, seed=5), 0.5
    tree.scores = torch.zeros_like(tree.scores)
    _, got, _ = kg.deviation(tree, "k3", "reward", beta)
    theta = tree.theta.clone().requires_grad_()
    logp, logq = theta.log_softmax(-1), tree.ref.log_softmax(-1)
    forward, reverse = (logp.exp() * (logp - logq)).sum(), (logq.exp() * (logq - logp)).sum()
    (want,) = torch.autograd.grad(-beta * (forward - reverse), theta)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_k3_reward_on_a_longer_tree_trains_the_forward_sequence_kl_minus_direct_reverse_terms():
    """For responses of T = 3 tokens the k3 reward's expected gradient is
    −β·[∇KL_seq(π‖ref) − E_π Σ_t ∇_direct KL(ref‖π)(s_t)]: the score-function gradient of the sequence
    KL's value minus the direct (per-state) gradient of the reverse KL, which the sampled k3 carries
    (E_{a~π}[∇k3] = ∇_direct KL(ref‖π)). Not −β·∇[KL(π‖ref) − KL(ref‖π)] of the sequence."""
    tree, beta = kg.Tree(length=3, seed=7), 0.5
    tree.scores = torch.zeros_like(tree.scores)
    _, got, _ = kg.deviation(tree, "k3", "reward", beta)
    rows = tree.hidden.argmax(-1)  # (B·T,) each token's state
    b, t = tree.mask.shape

    def seq_prob(theta):
        return theta.log_softmax(-1)[rows, tree.targets].view(b, t).sum(-1).exp()  # (B,)

    def state_kls(theta):
        logp, logq = theta.log_softmax(-1), tree.ref.log_softmax(-1)
        return (logp.exp() * (logp - logq)).sum(-1), (logq.exp() * (logq - logp)).sum(-1)  # (S,) forward, reverse

    theta = tree.theta.clone().requires_grad_()
    forward, _ = state_kls(theta)
    kl_seq = (seq_prob(theta) * forward[rows].view(b, t).sum(-1)).sum()  # E_π[Σ_t KL(π‖ref)(s_t)], all of θ
    _, reverse = state_kls(theta)
    direct_reverse = (seq_prob(tree.theta) * reverse[rows].view(b, t).sum(-1)).sum()  # π(y) held fixed
    (want,) = torch.autograd.grad(-beta * (kl_seq - direct_reverse), theta)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    theta = tree.theta.clone().requires_grad_()
    forward, reverse = state_kls(theta)
    naive = (seq_prob(theta) * (forward - reverse)[rows].view(b, t).sum(-1)).sum()
    (wrong,) = torch.autograd.grad(-beta * naive, theta)
    assert (wrong - got).norm() > 0.3 * got.norm()  # the sequence-level difference is not what it trains


def test_exact_reward_alone_misses_the_last_state():
    """With the exact KL as a reward, a one-token response's KL penalty has no gradient at all."""
    tree = kg.Tree(length=1, seed=6)
    tree.scores = torch.zeros_like(tree.scores)
    _, got, true = kg.deviation(tree, "exact", "reward")
    assert got.abs().max() < 1e-12 and true.abs().max() > 1e-3


def test_docs_table_is_this_computation(rows):
    assert kg.markdown(rows) in (ROOT / "docs" / "kl.md").read_text(encoding="utf-8")
