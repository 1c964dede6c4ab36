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
    assert {(e, p) for e, p, *_ in rows} == set(kg.PAIRS) and len(kg.PAIRS) == 9
    for e, p, whole, kl_part in rows:
        if (e, p) in UNBIASED:
            assert whole < 1e-9 and kl_part < 1e-9, (e, p, whole)
        else:
            assert whole > 0.1 and kl_part > 0.1, (e, p, whole)  # far from round-off: a real bias


def test_k3_reward_trains_the_difference_of_two_kls():
    """The k3 reward's gradient is that of −β·[KL(π‖ref) − KL(ref‖π)] (per state, through the
    policy gradient), not −β·∇KL(π‖ref): checked on the one-state tree (T = 1)."""
    tree, beta = kg.Tree(length=1, seed=5), 0.5
    tree.scores = torch.zeros_like(tree.scores)
    _, got, _ = kg.deviation(tree, "k3", "reward", beta)
    theta = tree.theta.clone().requires_grad_()
    logp, logq = theta.log_softmax(-1), tree.ref.log_softmax(-1)
    forward, reverse = (logp.exp() * (logp - logq)).sum(), (logq.exp() * (logq - logp)).sum()
    (want,) = torch.autograd.grad(-beta * (forward - reverse), theta)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_exact_reward_alone_misses_the_last_state():
    """With the exact KL as a reward, a one-token response's KL penalty has no gradient at all."""
    tree = kg.Tree(length=1, seed=6)
    tree.scores = torch.zeros_like(tree.scores)
    _, got, true = kg.deviation(tree, "exact", "reward")
    assert got.abs().max() < 1e-12 and true.abs().max() > 1e-3


def test_docs_table_is_this_computation(rows):
    assert kg.markdown(rows) in (ROOT / "docs" / "kl.md").read_text(encoding="utf-8")
