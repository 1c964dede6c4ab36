"""The objective as registered per-token terms: every policy loss through the trainer, accumulation,
DAPO's sampling and length terms, the degenerate batch, and the contracts of user code."""
import dataclasses

import pytest
import torch

from rlhf_core.config import PPOConfig
from rlhf_core.errors import ConfigError, UserCodeError
from rlhf_core.ppo import losses
from rlhf_core.ppo.experience import Experience
from rlhf_core.ppo.extensions import resolve_estimator, resolve_policy_loss
from rlhf_core.ppo.losses import policy_loss_term
from rlhf_core.ppo.experience_maker import compute_advantages, flat_groups, overlong_penalty

from .test_trainer import make_trainer, uneven_experience, weights

LOSS_FIELDS = {"ppo": {}, "dual_clip": {"dual_clip_c": 2.0}, "gspo": {"clip_range_low": 0.05, "clip_range_high": 0.06},
               "cispo": {"clip_range_low": 1.0, "clip_range_high": 0.28}, "sapo": {}}


def test_the_table_covers_every_registered_loss():
    assert set(LOSS_FIELDS) == set(losses.POLICY_LOSSES)


@pytest.mark.parametrize("name", sorted(LOSS_FIELDS))
def test_each_policy_loss_trains_and_logs(name):
    t = make_trainer(policy_loss=name, **LOSS_FIELDS[name])
    before = weights(t)
    metrics = t.step()
    assert all(isinstance(v, (int, float)) and abs(v) < float("inf") for v in metrics.values())
    assert metrics["perf/skipped_steps"] == 0 and metrics["check/first_ratio_dev"] < 1e-4
    assert any(not torch.equal(v, before[k]) for k, v in weights(t).items())


@pytest.mark.parametrize("name", sorted(LOSS_FIELDS))
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_each_policy_loss_accumulates_to_the_whole_minibatch_gradient(name, aggregation):
    """micro_batch_size=1 against the whole minibatch, rows of 6/1/4/2 tokens, with entropy and a KL loss
    term: the terms' shares sum to the minibatch's gradient and to its logged statistics."""
    grads, stats = [], []
    for micro in (0, 1):
        t = make_trainer(micro_batch_size=micro, loss_aggregation=aggregation, ent_coef=0.01, kl_estimator="k3",
                         kl_penalty="loss", policy_loss=name, **LOSS_FIELDS[name])
        exp = uneven_experience(t)
        with torch.no_grad():  # off-policy: the old logprobs moved, so the clips are exercised
            exp = dataclasses.replace(exp, logprobs=exp.logprobs + 0.3 * torch.randn_like(exp.logprobs) * exp.mask)
        stats.append(t.minibatch_step(exp))
        grads.append({n: p.grad.clone() for n, p in t.policy.named_trainable_parameters().items()})
    for key in ("loss/policy", "loss/kl", "policy/entropy", "policy/ratio", "policy/approx_kl"):
        assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-5, abs=1e-7), key
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_asymmetric_clip_is_what_the_loss_uses():
    """clip_range_low / clip_range_high default to clip_range and reach the loss as ε_low / ε_high."""
    lp = torch.log(torch.tensor([[1.25, 0.75]]))
    old, adv, mask = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    per_token, stats = losses.ppo_clip_loss(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask,
                                            clip_low=0.2, clip_high=0.28)
    # A > 0, ρ = 1.25 < 1.28: not clipped (it would be with a symmetric 0.2); A < 0, ρ = 0.75 < 0.8: clipped
    torch.testing.assert_close(per_token, torch.tensor([[-1.25, 0.8]]))
    assert float(stats["policy/clipfrac"]) == 0.5


def test_dual_clip_bounds_the_negative_advantage_loss():
    lp = torch.log(torch.tensor([[5.0, 5.0, 1.1]]))
    per_token, stats = losses.dual_clip_loss(logprobs=lp, old_logprobs=torch.zeros(1, 3),
                                             advantages=torch.tensor([[-1.0, 1.0, -1.0]]), mask=torch.ones(1, 3),
                                             clip_low=0.2, clip_high=0.2, dual_clip_c=3.0)
    torch.testing.assert_close(per_token, torch.tensor([[3.0, -1.2, 1.1]]))  # min(5, 3); clip 1.2; ρ
    assert float(stats["policy/dual_clipfrac"]) == pytest.approx(1 / 3)


def test_gspo_uses_one_length_normalised_ratio_per_response():
    lp = torch.tensor([[0.2, -0.4, 9.0], [0.1, 0.1, 0.1]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    per_token, _ = losses.gspo_loss(logprobs=lp, old_logprobs=torch.zeros(2, 3), advantages=torch.ones(2, 3),
                                    mask=mask, clip_low=10.0, clip_high=10.0)
    s = torch.exp(torch.tensor([-0.1, 0.1]))  # geometric mean ratios; padding ignored
    torch.testing.assert_close(per_token[0, :2], -s[0].expand(2))
    torch.testing.assert_close(per_token[1], -s[1].expand(3))
    (per_token * mask).sum().backward()
    torch.testing.assert_close(lp.grad[0, :2], -s[0].expand(2))  # each token: s_i·∇log π (GSPO-token)


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """PPO zeroes the gradient of a token clipped at ρ > 1 + ε with A > 0; CISPO keeps it, weighted by the
    clipped, detached ratio."""
    lp = torch.log(torch.tensor([[2.0]])).requires_grad_()
    per_token, stats = losses.cispo_loss(logprobs=lp, old_logprobs=torch.zeros(1, 1), advantages=torch.ones(1, 1),
                                         mask=torch.ones(1, 1), clip_low=1.0, clip_high=0.28)
    per_token.sum().backward()
    assert float(lp.grad) == pytest.approx(-1.28) and float(stats["policy/clipfrac"]) == 1.0


def test_sapo_gate_is_ppo_on_policy_and_damped_off_policy():
    for ratio, want in ((1.0, -1.0), (3.0, None)):
        lp = torch.log(torch.tensor([[ratio]])).requires_grad_()
        per_token, _ = losses.sapo_loss(logprobs=lp, old_logprobs=torch.zeros(1, 1), advantages=torch.ones(1, 1),
                                        mask=torch.ones(1, 1), sapo_tau_pos=1.0, sapo_tau_neg=1.05)
        per_token.sum().backward()
        g = float(lp.grad)
        if want is not None:
            assert g == pytest.approx(want)  # −A·∇log π at ρ = 1
        else:  # −4σ(2)(1−σ(2))·3 ≈ −1.26 instead of PPO-unclipped −3
            s = torch.sigmoid(torch.tensor(2.0))
            assert g == pytest.approx(float(-4 * s * (1 - s) * 3))


# ---- the degenerate batch (the audit's defect 1) ---------------------------------------------------


def scored(scores, mask, seed=0, group_size=1):
    g = torch.Generator().manual_seed(seed)
    B, T = mask.shape
    lp = -torch.rand(B, T, generator=g) * mask
    return Experience(query_ids=torch.zeros(B, 1, dtype=torch.long), query_mask=torch.ones(B, 1, dtype=torch.long),
                      response_ids=torch.ones(B, T, dtype=torch.long), mask=mask, logprobs=lp,
                      ref_logprobs=lp + 0.1 * torch.randn(B, T, generator=g) * mask, scores=scores,
                      kl_exact=torch.rand(B, T, generator=g) * mask,
                      group_ids=torch.arange(B) // group_size)


@pytest.mark.parametrize("estimator, extra", [("reinforce_pp", {}), ("rloo", {"whiten_advantages": "true",
                                                                              "group_size": 2})])
def test_a_batch_with_no_score_spread_keeps_the_kl_weight_at_beta(estimator, extra):
    """All scores equal and the KL in the loss: the advantages have no spread. Before: divided by
    √(0 + 1e-8), the KL term weighed β·10⁴. Now σ_A counts as 1 and the check says so."""
    cfg = PPOConfig(advantage_estimator=estimator, kl_estimator="k3", kl_penalty="loss", kl_coef=0.5, **extra)
    mask = torch.ones(4, 5)
    exp, info = compute_advantages(scored(torch.zeros(4), mask, group_size=2), resolve_estimator(cfg), cfg, 0.5)
    assert info["check/degenerate_advantages"] == 1.0
    assert exp.advantages.abs().max() == 0
    torch.testing.assert_close(exp.kl_coef, torch.full((4,), 0.5))
    exp, info = compute_advantages(scored(torch.tensor([0.0, 1.0, 0.0, 3.0]), mask, group_size=2),
                                   resolve_estimator(cfg), cfg, 0.5)  # a spread: divided by σ_A as usual
    assert info["check/degenerate_advantages"] == 0.0 and float(exp.kl_coef[0]) != 0.5


def test_a_run_whose_scores_are_all_equal_takes_beta_sized_steps():
    def zero(prompts, responses):
        return [0.0] * len(responses)
    t = make_trainer(advantage_estimator="reinforce_pp", kl_estimator="k3", kl_penalty="loss", kl_coef=0.5,
                     max_grad_norm=0.0)
    t.reward = __import__("rlhf_core.ppo.reward_sources", fromlist=["x"]).checked_reward(zero)
    metrics = t.step()
    assert metrics["check/degenerate_advantages"] == 1.0
    assert metrics["policy/grad_norm"] < 10  # was ~1e4·β·‖∇KL‖ before the fix


# ---- DAPO: dynamic sampling, overlong shaping and filtering ------------------------------------------


def test_flat_groups_and_the_overlong_penalty_against_their_definitions():
    assert flat_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2).tolist() == [True, False, True]
    lengths = torch.tensor([4, 6, 7, 9, 10])
    got = overlong_penalty(lengths, max_length=10, buffer=4, penalty=2.0)
    want = [0.0 if n <= 6 else 2.0 * ((10 - 4) - n) / 4 for n in lengths.tolist()]  # DAPO eq. 13
    assert got.tolist() == pytest.approx(want)
    assert overlong_penalty(lengths, 10, 0).abs().sum() == 0


def parity(prompts, responses):
    """For prompts of even length, 1 for a response of an even number of characters; 0 for the other
    prompts: their groups are flat (no signal) and dynamic sampling must drop them."""
    return [float(len(r) % 2 == 0) if len(p) % 2 == 0 else 0.0 for p, r in zip(prompts, responses)]


def test_dynamic_sampling_drops_flat_groups_and_refills_the_batch():
    from rlhf_core.ppo.reward_sources import checked_reward
    t = make_trainer(advantage_estimator="grpo", group_size=4, batch_size=8, dynamic_sampling=True,
                     dynamic_sampling_max_rounds=6, response_length=2)
    t.reward = checked_reward(parity)
    seen = []
    real = t.update

    def capture(buffer):
        seen.append(buffer.experience)
        return real(buffer)
    t.update = capture
    metrics = t.step()
    exp = seen[0]
    assert len(exp) == 8 and metrics["dynamic/dropped_groups"] > 0 and metrics["dynamic/rounds"] > 1
    assert metrics["dynamic/refilled_with_flat"] == 0
    assert not flat_groups(exp.scores, 4).any()  # every group kept has a spread
    assert len(set(exp.group_ids.tolist())) == 2  # two whole groups, ids distinct across rounds


def test_dynamic_sampling_with_no_signal_runs_every_round_then_trains_on_flat_groups():
    from rlhf_core.ppo.reward_sources import checked_reward
    t = make_trainer(advantage_estimator="grpo", group_size=4, batch_size=8, dynamic_sampling=True,
                     dynamic_sampling_max_rounds=3)
    t.reward = checked_reward(lambda p, r: [0.0] * len(r))
    metrics = t.step()
    assert metrics["dynamic/rounds"] == 3 and metrics["dynamic/dropped_groups"] == 6
    assert metrics["dynamic/refilled_with_flat"] == 2


def test_dynamic_sampling_without_a_spread_problem_is_the_same_run():
    """With a reward whose groups always differ, dynamic sampling changes nothing, bit for bit."""
    a, b = make_trainer(advantage_estimator="grpo", group_size=4), make_trainer(
        advantage_estimator="grpo", group_size=4, dynamic_sampling=True)
    ma, mb = a.step(), b.step()
    assert mb["dynamic/dropped_groups"] == 0
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ma["objective/scores"] == mb["objective/scores"]


def test_overlong_filtering_keeps_truncated_responses_out_of_the_loss():
    """Every response truncated (response_length 2 and a model that rarely says EOS): with the filter no
    token is in the loss, so the weights do not move; without it they do."""
    t = make_trainer(response_length=2, overlong_filter=True, ent_coef=0.01)
    before = weights(t)
    metrics = t.step()
    assert metrics["check/truncated_fraction"] == 1.0
    assert all(torch.equal(v, before[k]) for k, v in weights(t).items())
    t = make_trainer(response_length=2, ent_coef=0.01)
    t.step()
    assert any(not torch.equal(v, before[k]) for k, v in weights(t).items())


def test_overlong_shaping_reaches_the_scores():
    metrics = make_trainer(response_length=4, overlong_buffer=2, overlong_penalty=1.0).step()
    assert metrics["response/overlong_penalty"] < 0  # truncated responses sit in the buffer's last token


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, needle", [
    ({"clip_range_low": 0.3, "clip_range_high": 0.2}, "ppo.clip_range_high=0.2 < ppo.clip_range_low=0.3"),
    ({"clip_range_high": 0.1}, "ppo.clip_range_high=0.1 < ppo.clip_range_low=0.2"),
    ({"dual_clip_c": 1.0}, "ppo.dual_clip_c=1.0: expected a number > 1"),
    ({"sapo_tau_neg": 0.0}, "ppo.sapo_tau_neg"),
    ({"dynamic_sampling": True}, "ppo.dynamic_sampling=True: expected false unless group_size >= 2"),
    ({"overlong_buffer": 300}, "ppo.overlong_buffer=300: expected an integer in [0, response_length=256)"),
    ({"kl_estimator": "k1", "kl_penalty": "loss"}, "expected KL gradient is exactly 0"),
])
def test_bad_loss_settings_are_one_line(fields, needle):
    with pytest.raises(ConfigError) as exc:
        PPOConfig(**fields).validate()
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_undeclared_and_critic_needing_losses_are_refused():
    with pytest.raises(ConfigError, match="ppo.policy_loss: unknown policy loss 'nope'; registered: cispo"):
        resolve_policy_loss(PPOConfig(policy_loss="nope"))
    with pytest.raises(ConfigError, match="has no declarations"):
        resolve_policy_loss(PPOConfig(), fn=lambda **kw: None)

    @policy_loss_term(sequence=False, critic=True)
    def needs_values(*, values, **kw):
        return values, {}
    with pytest.raises(ConfigError, match="reads a critic's values, but ppo.advantage_estimator='grpo'"):
        resolve_policy_loss(PPOConfig(advantage_estimator="grpo"), has_critic=False, fn=needs_values)


def _user_loss(kind):
    @policy_loss_term(sequence=False, critic=False)
    def bad(*, logprobs, old_logprobs, advantages, mask, **kw):
        ratio = torch.exp(logprobs - old_logprobs)
        if kind == "shape":
            return (-advantages * ratio).sum(-1), {}
        if kind == "nan":
            return -advantages * ratio * float("nan"), {}
        if kind == "tuple":
            return -advantages * ratio
        return -advantages * ratio, {"policy/mine": "not a number"}
    return bad


@pytest.mark.parametrize("kind, needle", [("shape", "returned a per-token loss of shape (4,); expected (B, T)"),
                                          ("nan", "non-finite per-token loss"), ("tuple", "returned Tensor"),
                                          ("stats", "stats that are not a dict of scalars")])
def test_a_user_loss_breaking_its_contract_at_run_time_is_one_line(kind, needle):
    from rlhf_core.ppo.trainer import PPOTrainer  # noqa: F401 (the trainer names the iteration)
    t = make_trainer()
    t.policy_loss = resolve_policy_loss(t.cfg, fn=_user_loss(kind))
    with pytest.raises(UserCodeError) as exc:
        t.step()
    msg = str(exc.value)
    assert "ppo iteration 1" in msg and "'bad'" in msg and needle in msg and "\n" not in msg
