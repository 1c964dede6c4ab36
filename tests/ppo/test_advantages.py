"""Tests for rlhf_core/ppo/advantages.py (and the masked reductions of ppo/utils.py it uses).

Every formula is checked against a naive float64 implementation written here with explicit
Python loops, plus a hand-worked case.
"""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.ppo.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_gae,
    estimator_declarations,
    grpo_return_weights,
    get_advantage_estimator,
    grpo_advantages,
    masked_whiten,
    register_advantage_estimator,
    reinforce_pp_returns,
    rloo_advantages,
)
from rlhf_core.ppo.utils import last_index, masked_mean, masked_sum, masked_var


def right_padded_mask(lengths, T):
    """(B, T) float64 mask with lengths[b] leading ones per row."""
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)


def naive_gae(rewards, values, lengths, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l} over the valid prefix, δ_t = r_t + γ V_{t+1} − V_t, V_L = 0."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        L = lengths[b]
        r = [float(rewards[b, t]) for t in range(L)]
        v = [float(values[b, t]) for t in range(L)] + [0.0]
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(L)]
        for t in range(L):
            adv[b, t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(L - t))
    return adv


# ---- masked reductions (ppo/utils.py) ----------------------------------------------------


def test_masked_reductions_against_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    lengths = [7, 3, 0, 1]
    mask = right_padded_mask(lengths, 7)
    vals = [float(x[b, t]) for b in range(4) for t in range(lengths[b])]
    n = len(vals)
    mu = sum(vals) / n
    var_b = sum((v - mu) ** 2 for v in vals) / n
    assert masked_sum(x, mask).item() == pytest.approx(sum(vals), abs=1e-12)
    assert masked_mean(x, mask).item() == pytest.approx(mu, abs=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(var_b, abs=1e-12)
    assert masked_var(x, mask).item() == pytest.approx(var_b * n / (n - 1), abs=1e-12)
    row_means = masked_mean(x, mask, dim=-1)
    assert row_means[0].item() == pytest.approx(sum(float(v) for v in x[0]) / 7, abs=1e-12)
    assert row_means[2].item() == 0.0  # empty row: 0, not NaN
    assert masked_var(x, mask, dim=-1)[3].item() == 0.0  # one token: biased fallback


def test_masked_reductions_ignore_garbage_in_padding():
    x = torch.tensor([[1.0, 3.0, float("nan"), -float("inf")]])
    mask = torch.tensor([[1, 1, 0, 0]])
    assert masked_mean(x, mask).item() == 2.0
    assert masked_var(x, mask, unbiased=False).item() == 1.0
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_last_index():
    mask = right_padded_mask([3, 0, 5, 1], 5)
    assert last_index(mask).tolist() == [2, -1, 4, 0]


# ---- GAE ------------------------------------------------------------------------------------


def test_gae_hand_worked_three_tokens():
    # γ = 0.9, λ = 0.8 (γλ = 0.72); r = [0, 0, 1], V = [0.5, 0.6, 0.7]; value after EOS is 0.
    #   δ2 = 1 + 0.9·0 − 0.7 = 0.3                    A2 = 0.3
    #   δ1 = 0 + 0.9·0.7 − 0.6 = 0.03                 A1 = 0.03 + 0.72·0.3 = 0.246
    #   δ0 = 0 + 0.9·0.6 − 0.5 = 0.04                 A0 = 0.04 + 0.72·0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]; the 4th column is padding (garbage ignored).
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3, 0.0]], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0, 0.0]], dtype=torch.float64), atol=1e-12, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_gae_matches_naive_double_loop(lengths, gamma, lam, seed):
    T = 9
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    mask = right_padded_mask(lengths, T)
    adv, ret = compute_gae(rewards, values, mask.bool(), gamma, lam)
    expected = naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, (expected + values) * mask, atol=1e-12, rtol=0)
    assert not torch.isnan(adv).any()
    assert (adv[mask == 0] == 0).all()


def test_gae_dtype_and_empty_rows():
    mask = torch.zeros(2, 4)
    adv, ret = compute_gae(torch.randn(2, 4), torch.randn(2, 4), mask, 1.0, 0.95)
    assert adv.dtype == torch.float32 and (adv == 0).all() and (ret == 0).all()
    adv16, _ = compute_gae(torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(2, 4), torch.ones(2, 4), 1.0, 0.95)
    assert adv16.dtype == torch.bfloat16


# ---- whitening ------------------------------------------------------------------------------


def test_masked_whiten_mean0_var1_on_valid():
    g = torch.Generator().manual_seed(1)
    x = 3.0 + 2.0 * torch.randn(5, 11, generator=g, dtype=torch.float64)
    mask = right_padded_mask([11, 4, 0, 7, 2], 11)
    w = masked_whiten(x, mask)
    vals = [float(w[b, t]) for b in range(5) for t in range(11) if mask[b, t]]
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / len(vals)
    assert abs(mu) < 1e-12 and var == pytest.approx(1.0, abs=1e-6)
    assert (w[mask == 0] == 0).all()
    # scale only: the mean is kept, the spread is 1
    ws = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(ws, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-9)
    assert masked_var(ws, mask, unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_masked_whiten_empty_mask_is_zero_not_nan():
    w = masked_whiten(torch.randn(3, 4), torch.zeros(3, 4))
    assert (w == 0).all()


# ---- RLOO and the registry -------------------------------------------------------------------


def test_rloo_matches_naive_loop():
    g = torch.Generator().manual_seed(2)
    k, B, T = 3, 6, 5
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [5, 2, 0, 4, 1, 3]
    mask = right_padded_mask(lengths, T)
    adv, ret = rloo_advantages(rewards, mask, group_size=k)
    R = [sum(float(rewards[b, t]) for t in range(lengths[b])) for b in range(B)]
    for b in range(B):
        group = range((b // k) * k, (b // k) * k + k)
        baseline = sum(R[j] for j in group if j != b) / (k - 1)
        for t in range(T):
            exp_adv = R[b] - baseline if t < lengths[b] else 0.0
            exp_ret = sum(float(rewards[b, s]) for s in range(t, lengths[b])) if t < lengths[b] else 0.0
            assert adv[b, t].item() == pytest.approx(exp_adv, abs=1e-12)
            assert ret[b, t].item() == pytest.approx(exp_ret, abs=1e-12)
    # first-token return is the sequence return R_i
    assert ret[0, 0].item() == pytest.approx(R[0], abs=1e-12)


def test_rloo_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.zeros(5, 3), torch.ones(5, 3), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.zeros(4, 3), torch.ones(4, 3), group_size=1)


# ---- GRPO, Dr. GRPO, REINFORCE++ from their papers ----------------------------------------------


def sequence_returns(rewards, lengths):
    return [sum(float(rewards[b, t]) for t in range(lengths[b])) for b in range(len(lengths))]


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_and_dr_grpo_match_the_papers(scale):
    """GRPO (Shao et al. 2024, §4.1.2): Â_i = (r_i − mean(r)) / std(r) over the G outputs of one question,
    on every token of output i; Dr. GRPO (Liu et al. 2025, eq. 3): Â_i = r_i − mean(r). std: the sample
    standard deviation (n − 1), as DeepSeekMath's and TRL's code compute it."""
    g = torch.Generator().manual_seed(7)
    k, T = 4, 5
    lengths = [5, 2, 3, 1, 4, 4, 5, 2]
    rewards = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    mask = right_padded_mask(lengths, T)
    adv, ret = grpo_advantages(rewards, mask, k, scale=scale)
    R = sequence_returns(rewards, lengths)
    for b in range(len(lengths)):
        group = [R[j] for j in range((b // k) * k, (b // k) * k + k)]
        mean = sum(group) / k
        std = (sum((x - mean) ** 2 for x in group) / (k - 1)) ** 0.5
        expected = (R[b] - mean) / (std + 1e-6) if scale else R[b] - mean
        for t in range(T):
            assert adv[b, t].item() == pytest.approx(expected if t < lengths[b] else 0.0, abs=1e-12)
            expected_ret = sum(float(rewards[b, s]) for s in range(t, lengths[b])) if t < lengths[b] else 0.0
            assert ret[b, t].item() == pytest.approx(expected_ret, abs=1e-12)
    same = grpo_advantages(torch.ones(4, 2, dtype=torch.float64), torch.ones(4, 2), 4)[0]
    assert torch.equal(same, torch.zeros(4, 2, dtype=torch.float64))  # equal returns: no signal, no NaN
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(rewards, mask, 3)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_returns_match_the_paper(gamma):
    """REINFORCE++ (Hu 2025, eqs. 5-7): r_t = 1[t = last]·score − β·KL_t, advantage_t = Σ_{s≥t} γ^{s−t} r_s,
    then normalised over the global batch (the trainer's whitening, declared by the estimator)."""
    g = torch.Generator().manual_seed(8)
    lengths = [4, 1, 0, 3]
    T = 4
    scores = [1.0, -0.5, 0.3, 2.0]
    kl = torch.rand(4, T, generator=g, dtype=torch.float64)
    beta = 0.1
    rewards = torch.zeros(4, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        for t in range(n):
            rewards[b, t] = -beta * float(kl[b, t]) + (scores[b] if t == n - 1 else 0.0)
    adv, ret = reinforce_pp_returns(rewards, right_padded_mask(lengths, T), gamma)
    for b, n in enumerate(lengths):
        for t in range(T):
            expected = sum(gamma ** (s - t) * float(rewards[b, s]) for s in range(t, n)) if t < n else 0.0
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-12)
    assert torch.equal(adv, ret)


def test_each_builtin_declares_its_normalization_and_critic():
    table = {name: {k: v for k, v in estimator_declarations(ADVANTAGE_ESTIMATORS[name]).items() if k != "return_weight"}
             for name in ("gae", "rloo", "grpo", "dr_grpo", "reinforce_pp")}
    assert table == {
        "gae": {"whiten": True, "critic": True, "groups": False, "reads_rewards": True},
        "rloo": {"whiten": False, "critic": False, "groups": True, "reads_rewards": True},
        "grpo": {"whiten": False, "critic": False, "groups": True, "reads_rewards": True},
        "dr_grpo": {"whiten": False, "critic": False, "groups": True, "reads_rewards": True},
        "reinforce_pp": {"whiten": True, "critic": False, "groups": False, "reads_rewards": True},
    }


def test_an_undeclared_estimator_is_refused_not_given_gae_defaults():
    with pytest.raises(ValueError, match="'f' does not declare whiten, critic, groups, reads_rewards"):
        def f(**kw):
            return None
        estimator_declarations(f)
    with pytest.raises(TypeError):  # every declaration is a required keyword
        register_advantage_estimator("_undeclared", whiten=False)(lambda **kw: None)


def test_group_return_weight_is_the_derivative_of_the_advantage_in_the_own_return():
    """Dr. GRPO's ∂A_i/∂R_i, by autograd of grpo_advantages itself, is the weight the KL loss term takes
    (GRPO takes the same: its 1/std_G is not followed, see grpo_return_weights)."""
    g = torch.Generator().manual_seed(11)
    k, T = 4, 3
    rewards = torch.randn(8, T, generator=g, dtype=torch.float64)
    mask = torch.ones(8, T, dtype=torch.float64)
    r = rewards.clone().requires_grad_()
    adv = grpo_advantages(r, mask, k, scale=False)[0][:, 0]  # (B,)
    want = torch.stack([torch.autograd.grad(adv[i], r, retain_graph=True)[0][i, 0] for i in range(8)])
    torch.testing.assert_close(grpo_return_weights(rewards, mask, k), want, rtol=1e-12, atol=1e-12)
    assert want.tolist() == pytest.approx([0.75] * 8)


def test_group_ids_group_a_shuffled_batch_and_refuse_a_broken_one():
    """A batch in any row order gives each row the advantage of its own group; ids that do not form whole
    groups are an error, not a silently wrong number."""
    g = torch.Generator().manual_seed(12)
    k, T = 3, 4
    rewards = torch.randn(9, T, generator=g, dtype=torch.float64)
    mask = right_padded_mask([4, 2, 3, 1, 4, 4, 2, 3, 1], T)
    ids = torch.arange(9) // k
    perm = torch.randperm(9, generator=g)
    for fn in (rloo_advantages, lambda r, m, k_, group_ids=None: grpo_advantages(r, m, k_, group_ids=group_ids)):
        ordered, _ = fn(rewards, mask, k, group_ids=ids)
        torch.testing.assert_close(ordered, fn(rewards, mask, k)[0])
        shuffled, _ = fn(rewards[perm], mask[perm], k, group_ids=ids[perm])
        torch.testing.assert_close(shuffled, ordered[perm])
        with pytest.raises(ValueError, match="appears 2 times"):
            fn(rewards[:8], mask[:8], 4, group_ids=torch.tensor([0, 0, 1, 1, 1, 1, 2, 2]))
    # the same shuffled batch without ids is silently misgrouped: what the ids prevent
    assert not torch.allclose(rloo_advantages(rewards[perm], mask[perm], k)[0], rloo_advantages(rewards, mask, k)[0][perm])


def test_registry_builtin_estimators_and_errors():
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = right_padded_mask([6, 3, 2, 0], 6)
    kw = dict(rewards=rewards, values=values, mask=mask, scores=torch.randn(4), gamma=1.0, lam=0.95, group_size=2)
    gae = get_advantage_estimator("gae")(**kw)
    torch.testing.assert_close(gae[0], compute_gae(rewards, values, mask, 1.0, 0.95)[0])
    rloo = get_advantage_estimator("rloo")(**kw)
    torch.testing.assert_close(rloo[0], rloo_advantages(rewards, mask, 2)[0])
    with pytest.raises(ValueError, match="gae.*rloo"):
        get_advantage_estimator("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("gae", whiten=True, critic=True, groups=False, reads_rewards=True)(
            lambda **kw: None)


def test_registry_new_estimator_in_a_few_lines():
    @register_advantage_estimator("_test_reinforce", whiten=False, critic=False, groups=False, reads_rewards=False)
    def reinforce(*, scores, mask, **kw):
        adv = scores.view(-1, 1) * mask  # (B, T)
        return adv, adv

    try:
        adv, _ = get_advantage_estimator("_test_reinforce")(
            rewards=None, values=None, mask=torch.ones(2, 3), scores=torch.tensor([1.0, -2.0]),
            gamma=1.0, lam=1.0, group_size=1,
        )
        assert adv.tolist() == [[1.0] * 3, [-2.0] * 3]
    finally:
        del ADVANTAGE_ESTIMATORS["_test_reinforce"]
