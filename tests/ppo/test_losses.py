"""Tests for rlhf_core/ppo/losses.py against naive float64 loops and hand-worked cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.ppo.losses import aggregate, entropy_bonus, explained_variance, policy_loss, value_loss


def right_padded_mask(lengths, T):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)


def naive_policy_loss(logprobs, old, adv, lengths, eps, aggregation, max_length=None):
    B = logprobs.shape[0]
    per_row, all_terms = [], []
    for b in range(B):
        terms = []
        for t in range(lengths[b]):
            rho = math.exp(float(logprobs[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            terms.append(max(-a * rho, -a * min(max(rho, 1 - eps), 1 + eps)))
        all_terms += terms
        if terms:
            per_row.append(sum(terms) / len(terms))
    if aggregation == "token-mean":
        return sum(all_terms) / len(all_terms) if all_terms else 0.0
    if aggregation == "seq-mean-token-sum-norm":  # Dr. GRPO: Σ over every token / (rows · constant L)
        return sum(all_terms) / (B * (max_length or logprobs.shape[1]))
    return sum(per_row) / len(per_row) if per_row else 0.0


def random_batch(seed, lengths, T, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logprobs = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return logprobs, old, adv, right_padded_mask(lengths, T)


# ---- policy loss ------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 8), min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
    aggregation=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
    max_length=st.sampled_from([None, 12]),
)
def test_policy_loss_matches_naive(lengths, seed, aggregation, max_length):
    logprobs, old, adv, mask = random_batch(seed, lengths, 8)
    loss, stats = policy_loss(logprobs, old, adv, mask, 0.2, aggregation=aggregation, max_length=max_length)
    expected = naive_policy_loss(logprobs, old, adv, lengths, 0.2, aggregation, max_length)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    n = sum(lengths)
    clipped = k3 = ratio = 0.0
    for b, L in enumerate(lengths):
        for t in range(L):
            lr = float(logprobs[b, t]) - float(old[b, t])
            rho, a = math.exp(lr), float(adv[b, t])
            clipped += -a * min(max(rho, 0.8), 1.2) > -a * rho
            k3 += (rho - 1) - lr
            ratio += rho
    assert stats["policy/clipfrac"].item() == pytest.approx(clipped / n if n else 0.0, abs=1e-12)
    assert stats["policy/approx_kl"].item() == pytest.approx(k3 / n if n else 0.0, abs=1e-12)
    assert stats["policy/ratio"].item() == pytest.approx(ratio / n if n else 0.0, abs=1e-12)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_ratio_one_gives_minus_mean_advantage():
    _, old, adv, mask = random_batch(0, [5, 2, 0, 7], 7)
    loss, stats = policy_loss(old.clone(), old, adv, mask, 0.2)
    expected = -sum(float(adv[b, t]) for b in range(4) for t in range(7) if mask[b, t]) / 14
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["policy/clipfrac"].item() == 0.0 and stats["policy/approx_kl"].item() == 0.0
    assert stats["policy/ratio"].item() == pytest.approx(1.0, abs=1e-15)


def test_zero_gradient_on_clipped_tokens():
    eps = 0.2
    # token 0: A > 0, ρ = 1.5 > 1+ε  -> clipped, grad 0
    # token 1: A < 0, ρ = 0.5 < 1−ε  -> clipped, grad 0
    # token 2: A > 0, ρ = 0.5 < 1−ε  -> unclipped branch is larger, grad −A·ρ/n ≠ 0
    # token 3: A < 0, ρ = 1.5 > 1+ε  -> unclipped, grad −A·ρ/n ≠ 0
    rho = torch.tensor([[1.5, 0.5, 0.5, 1.5]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 2.0, -3.0]], dtype=torch.float64)
    old = torch.full((1, 4), -1.0, dtype=torch.float64)
    logprobs = (old + rho.log()).requires_grad_(True)
    loss, stats = policy_loss(logprobs, old, adv, torch.ones(1, 4), eps)
    loss.backward()
    grad = logprobs.grad[0]
    assert grad[0].item() == 0.0 and grad[1].item() == 0.0
    assert grad[2].item() == pytest.approx(-2.0 * 0.5 / 4, abs=1e-15)
    assert grad[3].item() == pytest.approx(3.0 * 1.5 / 4, abs=1e-15)
    assert stats["policy/clipfrac"].item() == 0.5


def test_policy_loss_empty_mask_and_garbage_padding():
    logprobs = torch.tensor([[-1.0, -float("inf")], [float("nan"), -2.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -float("inf")], [-1.0, -float("inf")]])
    adv = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    mask = torch.tensor([[1, 0], [0, 0]])
    loss, stats = policy_loss(logprobs, old, adv, mask, 0.2)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[1].abs().sum() == 0
    loss0, _ = policy_loss(logprobs, old, adv, torch.zeros(2, 2), 0.2)
    assert loss0.item() == 0.0


def test_unknown_aggregation():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "sum")


def test_config_offers_exactly_the_aggregations_the_losses_know():
    from rlhf_core.config import LOSS_AGGREGATIONS
    from rlhf_core.ppo.losses import AGGREGATIONS
    assert LOSS_AGGREGATIONS == AGGREGATIONS


# ---- value loss -------------------------------------------------------------------------------


def test_value_clipping_picks_the_larger_loss():
    # ε = 0.1, V_old = 0. Token 0: V = 0.5, R = 1.0 -> unclipped (0.5)² = 0.25, clipped
    # (0.1 − 1)² = 0.81 -> 0.81 (clipped active, no gradient). Token 1: V = 0.5, R = 0 ->
    # unclipped 0.25, clipped 0.01 -> 0.25. loss = ½·(0.81 + 0.25)/2 = 0.265.
    values = torch.tensor([[0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=torch.float64)
    returns = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.1)
    assert loss.item() == pytest.approx(0.265, abs=1e-15)
    assert stats["val/clipfrac"].item() == 0.5
    assert stats["val/error"].item() == pytest.approx(0.25, abs=1e-15)
    assert stats["val/mean"].item() == pytest.approx(0.5, abs=1e-15)
    loss.backward()
    # token 0 clipped: zero gradient; token 1: d/dV ½·(V−R)²/2 = (0.5 − 0)/2
    assert values.grad[0, 0].item() == 0.0
    assert values.grad[0, 1].item() == pytest.approx(0.25, abs=1e-15)


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_value_loss_matches_naive(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    B, T, eps = len(lengths), 6, 0.2
    values, old, returns = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    mask = right_padded_mask(lengths, T)
    loss, _ = value_loss(values, old, returns, mask, eps)
    terms = []
    for b, L in enumerate(lengths):
        for t in range(L):
            v, vo, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
            vc = vo + min(max(v - vo, -eps), eps)
            terms.append(max((v - r) ** 2, (vc - r) ** 2))
    expected = 0.5 * sum(terms) / len(terms) if terms else 0.0
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    unclipped, _ = value_loss(values, old, returns, mask, None)
    plain = [(float(values[b, t]) - float(returns[b, t])) ** 2 for b, L in enumerate(lengths) for t in range(L)]
    assert unclipped.item() == pytest.approx(0.5 * sum(plain) / len(plain) if plain else 0.0, abs=1e-12)


# ---- entropy and explained variance -----------------------------------------------------------


def test_entropy_bonus_is_masked_mean():
    ent = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
    bonus, stats = entropy_bonus(ent, torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert bonus.item() == 2.0 and stats["policy/entropy"].item() == 2.0


def test_explained_variance():
    g = torch.Generator().manual_seed(4)
    returns = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = returns + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    lengths = [5, 3, 0]
    mask = right_padded_mask(lengths, 5)
    R = [float(returns[b, t]) for b, L in enumerate(lengths) for t in range(L)]
    E = [float(returns[b, t] - values[b, t]) for b, L in enumerate(lengths) for t in range(L)]

    def var(xs):
        mu = sum(xs) / len(xs)
        return sum((x - mu) ** 2 for x in xs) / len(xs)

    assert explained_variance(values, returns, mask).item() == pytest.approx(1 - var(E) / var(R), abs=1e-12)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0, abs=1e-15)
    assert explained_variance(values, torch.ones(3, 5), mask).item() == 0.0  # undefined -> 0
