"""Tests for rlhf_core/ppo/rewards.py: KL estimators, per-token rewards, KL controllers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.ppo.rewards import (
    AdaptiveKLController,
    FixedKLController,
    approx_kl,
    kl_penalized_rewards,
)

# ---- approx_kl ------------------------------------------------------------------------------


def test_estimators_match_formulas_float64():
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 4
    k1, k2, k3 = (approx_kl(logprobs, ref, e) for e in ("k1", "k2", "k3"))
    for b in range(3):
        for t in range(5):
            log_r = float(ref[b, t]) - float(logprobs[b, t])
            assert k1[b, t].item() == pytest.approx(-log_r, abs=1e-15)
            assert k2[b, t].item() == pytest.approx(0.5 * log_r**2, abs=1e-15)
            assert k3[b, t].item() == pytest.approx((math.exp(log_r) - 1) - log_r, abs=1e-14)


def test_hand_worked_values():
    # logprobs = log 0.5, ref = log 0.25 -> log r = −log 2
    # k1 = log 2 ≈ 0.693147; k2 = ½ log²2 ≈ 0.240227; k3 = (0.5 − 1) + log 2 ≈ 0.193147
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert approx_kl(lp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert approx_kl(lp, ref, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert approx_kl(lp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100.0))
def test_k3_nonnegative_and_finite(seed, scale):
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.randn(4, 16, generator=g) * scale
    ref = torch.randn(4, 16, generator=g) * scale
    k3 = approx_kl(logprobs, ref, "k3")
    assert torch.isfinite(k3).all() and (k3 >= 0).all()
    assert (approx_kl(logprobs, ref, "k2") >= 0).all()


def test_k3_clamps_log_ratio_before_exp():
    lp, ref = torch.tensor([[0.0]]), torch.tensor([[100.0]])  # log r = 100 -> clamped to 20
    assert approx_kl(lp, ref, "k3").item() == pytest.approx(math.expm1(20.0) - 20.0, rel=1e-6)


def test_k1_k3_sample_means_estimate_exact_kl():
    # Schulman: with a ~ p, E[k1] = E[k3] = KL(p‖q). Monte Carlo check within 5 standard errors.
    torch.manual_seed(1234)
    V, N = 12, 200_000
    p_logits, q_logits = torch.randn(V, dtype=torch.float64), torch.randn(V, dtype=torch.float64)
    p = torch.distributions.Categorical(logits=p_logits)
    q = torch.distributions.Categorical(logits=q_logits)
    exact = sum(float(p.probs[i]) * (math.log(p.probs[i]) - math.log(q.probs[i])) for i in range(V))
    a = p.sample((1, N))  # (1, N)
    logprobs, ref = p.log_prob(a), q.log_prob(a)  # (1, N)
    for est in ("k1", "k3"):
        k = approx_kl(logprobs, ref, est)
        stderr = k.std().item() / math.sqrt(N)
        assert abs(k.mean().item() - exact) < 5 * stderr, (est, k.mean().item(), exact)
    assert exact == pytest.approx(torch.distributions.kl_divergence(p, q).item(), abs=1e-12)


def test_unknown_estimator_names_choices():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        approx_kl(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ---- kl_penalized_rewards ---------------------------------------------------------------------


def test_score_on_last_valid_token_not_the_pad():
    # row 0: 3 tokens (EOS at t=2), row 1: truncated at T (no EOS, last valid t=4),
    # row 2: 1 token, row 3: no valid token (gets nothing, no NaN).
    T = 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, T, generator=g, dtype=torch.float64)
    ref = -torch.rand(4, T, generator=g, dtype=torch.float64)
    kl_coef = 0.1
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef, "k1")
    last = {0: 2, 1: 4, 2: 0}
    for b in range(4):
        for t in range(T):
            if mask[b, t]:
                k1 = float(logprobs[b, t]) - float(ref[b, t])
                expected = -kl_coef * k1 + (float(scores[b]) if t == last[b] else 0.0)
                assert kl[b, t].item() == pytest.approx(k1, abs=1e-15)
            else:
                expected = 0.0
                assert kl[b, t].item() == 0.0
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-15), (b, t)
    assert rewards[0, 3].item() == 0.0  # the pad right after EOS: TRL's bug would put 1.0 here
    # the sum of per-token rewards is score − kl_coef·Σ kl
    for b in range(3):
        assert rewards[b].sum().item() == pytest.approx(float(scores[b]) - kl_coef * kl[b].sum().item(), abs=1e-12)


def test_precomputed_kl_is_used_and_masked():
    mask = torch.tensor([[1, 1, 0]])
    exact_kl = torch.tensor([[0.5, 0.25, 7.0]])
    rewards, kl = kl_penalized_rewards(
        torch.tensor([1.0]), torch.zeros(1, 3), torch.zeros(1, 3), mask, kl_coef=0.2, kl=exact_kl
    )
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.25, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, -0.05 + 1.0, 0.0]]))


def test_garbage_logprobs_on_padding_do_not_leak():
    lp = torch.tensor([[-1.0, -float("inf")]])
    ref = torch.tensor([[-2.0, -float("inf")]])
    rewards, kl = kl_penalized_rewards(torch.tensor([1.0]), lp, ref, torch.tensor([[1, 0]]), 0.5, "k3")
    assert torch.isfinite(rewards).all() and torch.isfinite(kl).all()


# ---- controllers ------------------------------------------------------------------------------


def naive_adaptive(value, target, horizon, current, n_steps):
    err = current / target - 1.0
    err = max(-0.2, min(0.2, err))
    return value * (1.0 + err * n_steps / horizon)


def test_adaptive_controller_direction_and_formula():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=7.0, n_steps=256)  # above target -> β up
    assert ctl.value > 0.1
    assert ctl.value == pytest.approx(naive_adaptive(0.1, 6.0, 10_000, 7.0, 256), rel=1e-15)
    before = ctl.value
    ctl.update(current_kl=1.0, n_steps=256)  # below target -> β down, error clipped at −0.2
    assert ctl.value < before
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 256 / 10_000), rel=1e-15)
    v = ctl.value
    ctl.update(current_kl=6.0, n_steps=256)  # on target -> unchanged
    assert ctl.value == v


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(st.tuples(st.floats(0.0, 50.0), st.integers(1, 1024)), min_size=1, max_size=10),
)
def test_adaptive_controller_matches_naive_sequence(steps):
    ctl, value = AdaptiveKLController(0.05, target=3.0, horizon=5000), 0.05
    for current, n in steps:
        ctl.update(current, n)
        value = naive_adaptive(value, 3.0, 5000, current, n)
    assert ctl.value == pytest.approx(value, rel=1e-12)


def test_controllers_state_dict_roundtrip():
    ctl = AdaptiveKLController(0.1, 6.0, 10_000)
    ctl.update(9.0, 512)
    state = ctl.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    other = AdaptiveKLController(1.0, 1.0, 1.0)
    other.load_state_dict(state)
    assert (other.value, other.target, other.horizon) == (ctl.value, 6.0, 10_000.0)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05
    f2 = FixedKLController(0.0)
    f2.load_state_dict(fixed.state_dict())
    assert f2.value == 0.05


def test_adaptive_controller_rejects_bad_target():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
