"""PPOTrainer: accumulation equivalence, determinism, skipped steps, hooks, LoRA, the phase run."""
import functools
import json
import sys
from pathlib import Path

import pytest
import torch

from rlhf_core.config import PPOConfig, TinyModelConfig
from rlhf_core.errors import ConfigError
from rlhf_core.models import build_tiny_model
from rlhf_core.optim import lr_factor
from rlhf_core.ppo.extensions import resolve_estimator
from rlhf_core.ppo.policy import PolicyWithValue
from rlhf_core.ppo.trainer import PPOTrainer, ppo_loss
from rlhf_core.testing import tiny_setup
from rlhf_core.tracking import MeanMetrics, MetricsLogger

TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
REQUIRED = ["loss/policy", "loss/value", "policy/approx_kl", "policy/clipfrac", "policy/entropy",
            "val/explained_variance", "objective/kl", "objective/scores", "objective/rlhf_reward",
            "perf/episodes_per_s", "perf/tokens_per_s", "perf/skipped_steps", "time/rollout", "time/update",
            "time/generate", "time/score"]


@functools.lru_cache(maxsize=1)
def setup():
    tok, _, task = tiny_setup(n_eval_prompts=8, model_cfg=TINY)
    return tok, task


def e_reward(prompts, responses):
    return [r.count("e") / max(len(r), 1) for r in responses]


def make_trainer(model_seed=0, lora=False, **overrides) -> PPOTrainer:
    tok, task = setup()
    model = build_tiny_model(tok, TINY, model_seed)
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(overrides.get("seed", 0))
    fields = dict(batch_size=8, num_mini_batches=2, ppo_epochs=2, response_length=6, num_iterations=2,
                  learning_rate=1e-3, eval_every=0)
    fields.update(overrides)
    loss_fn = fields.pop("loss_fn", None)
    cfg = PPOConfig(**fields)
    policy = PolicyWithValue(model, value_model="shared" if resolve_estimator(cfg).critic else "none")
    return PPOTrainer(cfg, policy, tok, e_reward, task.prompts, task.eval_prompts, loss_fn=loss_fn)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.policy.state_dict().items()}


@pytest.mark.parametrize("estimator, penalty", [("k1", "reward"), ("k3", "loss"), ("exact", "both")])
def test_micro_batch_accumulation_equals_full_minibatch(estimator, penalty):
    kl = dict(kl_estimator=estimator, kl_penalty=penalty)
    full, micro = make_trainer(micro_batch_size=0, **kl), make_trainer(micro_batch_size=2, **kl)
    full.step(), micro.step()
    a, b = weights(full), weights(micro)
    assert any(not torch.equal(v, weights(make_trainer())[k]) for k, v in a.items())  # it did train
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def uneven_experience(trainer, lengths=(6, 1, 4, 2)):
    """A scored minibatch of 4 rows with uneven response lengths and random advantages/returns."""
    from dataclasses import replace
    from rlhf_core.ppo.rollout import encode_prompts, score
    tok, task = setup()
    query_ids, query_mask = encode_prompts(tok, task.prompts[:4], 16)
    g = torch.Generator().manual_seed(4)
    T = max(lengths)
    response_ids = torch.randint(3, 100, (4, T), generator=g)
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    exp = score(trainer.policy, query_ids, query_mask, response_ids, mask, torch.zeros(4))
    return replace(exp, advantages=torch.randn(4, T, generator=g) * mask, returns=torch.randn(4, T, generator=g) * mask,
                   kl_coef=torch.rand(4, generator=g))


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_every_aggregation_accumulates_to_the_whole_minibatch_gradient(aggregation):
    """micro_batch_size=1 against the whole minibatch on rows of 6, 1, 4 and 2 tokens: the micro-batches
    are weighted by what the aggregation divides by (tokens, rows with tokens, rows)."""
    grads, losses = [], []
    for micro in (0, 1):
        t = make_trainer(micro_batch_size=micro, loss_aggregation=aggregation, ent_coef=0.01,
                         kl_estimator="k3", kl_penalty="loss")
        stats = t.minibatch_step(uneven_experience(t))
        grads.append({n: p.grad.clone() for n, p in t.policy.named_trainable_parameters().items()})
        losses.append(stats["loss/policy"])
    assert losses[0] != 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_same_seed_identical_weights_other_seed_differs():
    runs = [make_trainer(seed=s) for s in (0, 0, 1)]
    for t in runs:
        t.step(), t.step()
    w = [weights(t) for t in runs]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert any(not torch.equal(w[0][k], w[2][k]) for k in w[0])


def test_step_reports_every_metric_finite():
    metrics = make_trainer().step()
    missing = [k for k in REQUIRED if k not in metrics]
    assert not missing
    assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values())
    assert metrics["perf/skipped_steps"] == 0


def test_kl_metrics_measure_the_same_rollout_three_ways():
    """objective/kl_exact, _k1, _k3 every iteration whatever the penalty uses; objective/kl is the
    penalty's own (fed to the controller); a loss-placed penalty logs its loss term."""
    for estimator, penalty in (("k1", "reward"), ("exact", "both"), ("k3", "loss")):
        trainer = make_trainer(kl_estimator=estimator, kl_penalty=penalty)
        trainer.step()
        m = trainer.step()  # iteration 2: the policy has moved, the three measures differ
        assert m["objective/kl_exact"] > 0 and m["objective/kl_exact"] != m["objective/kl_k1"]
        assert m["objective/kl"] == pytest.approx(m[f"objective/kl_{estimator}"], rel=1e-5, abs=1e-7)
        assert ("loss/kl" in m) == (penalty != "reward")


def test_exact_kl_in_the_loss_trains_through_the_fused_kernel():
    """kl_penalty='loss' with the exact KL and nothing else to learn (zero reward, vf_coef 0): the
    KL loss term's gradient (kernels.fused_kl's backward) pulls a perturbed policy back to π_ref."""
    trainer = make_trainer(kl_estimator="exact", kl_penalty="loss", vf_coef=0.0, kl_coef=1.0, learning_rate=1e-2,
                           num_iterations=4)
    with torch.no_grad():  # π ≠ π_ref: the reference is a copy made before this
        head = trainer.policy.model.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    trainer.reward = lambda prompts, responses, batch=0: torch.zeros(len(responses))
    metrics = [trainer.step() for _ in range(4)]
    assert metrics[0]["loss/kl"] > 0.01 and metrics[0]["objective/scores"] == 0
    assert metrics[-1]["objective/kl_exact"] < 0.7 * metrics[0]["objective/kl_exact"]


def test_unsupported_kl_pair_is_one_line():
    from rlhf_core.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^ppo.kl_penalty='both' with ppo.kl_estimator='k3': expected one of "
                                          r"reward, loss \('both' needs 'exact'"):
        PPOConfig(kl_estimator="k3", kl_penalty="both").validate()


def nan_loss(**kw):
    loss, stats = ppo_loss(**kw)
    return loss * float("nan"), stats


def nan_grad_loss(**kw):
    loss, stats = ppo_loss(**kw)
    return loss + torch.sqrt(kw["logprobs"].sum() * 0.0), stats  # finite loss, NaN gradient (d√x at 0)


@pytest.mark.parametrize("loss_fn", [nan_loss, nan_grad_loss])
def test_non_finite_loss_or_grad_skips_step(loss_fn):
    trainer = make_trainer(loss_fn=loss_fn)
    before = weights(trainer)
    metrics = trainer.step()
    assert metrics["perf/skipped_steps"] == 4  # 2 epochs x 2 minibatches
    assert all(torch.equal(v, trainer.policy.state_dict()[k]) for k, v in before.items())
    assert trainer.optimizer.state_dict()["state"] == {}


def test_custom_loss_hook_replaces_the_loss():
    calls = []

    def policy_only(*, logprobs, values, entropy, exp, config, **kw):
        calls.append(logprobs.shape)
        loss, stats = ppo_loss(logprobs=logprobs, values=values, entropy=entropy, exp=exp, config=config)
        return stats["loss/policy"] * 0 + loss, {"custom/marker": torch.tensor(3.0)}
    metrics = make_trainer(loss_fn=policy_only).step()
    assert len(calls) == 4 and metrics["custom/marker"] == 3.0


def test_target_kl_stops_the_epochs_early():
    trainer = make_trainer(target_kl=1e-12, learning_rate=1e-2)
    metrics = trainer.step()
    assert metrics["policy/early_stop"] == 1.0
    assert trainer.scheduler.last_epoch < 4  # stopped before all 2 x 2 optimizer steps


def test_rloo_exact_kl_whitening_adaptive_kl_run():
    trainer = make_trainer(advantage_estimator="rloo", group_size=2, kl_estimator="exact", whiten_rewards=True,
                           adaptive_kl=True, kl_target=0.01, missing_eos_penalty=1.0)
    m1 = trainer.step()
    m2 = trainer.step()
    # Iteration 1: policy == reference; the policy's states come from the KV-cache sampling loop
    # (rollout_logprobs), the reference's from a full forward, so they agree to float rounding.
    assert abs(m1["objective/kl"]) < 1e-6 and m2["objective/kl"] > 1e-5  # exact KL: the policy moved
    assert m2["objective/kl_coef"] != 0.05 or m1["objective/kl_coef"] != 0.05


def test_lora_training_leaves_base_weights_unchanged():
    trainer = make_trainer(lora=True)
    before = weights(trainer)
    trainer.step()
    after = trainer.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k or k.startswith("value_head") for k in changed)


def test_lr_schedules_and_metric_means():
    f = lr_factor("linear", warmup=2, total=10)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0] and f(10) == 0.0
    assert lr_factor("cosine", 0, 10)(5) == pytest.approx(0.5) and lr_factor("constant", 0, 10)(9) == 1.0
    m = MeanMetrics()
    m.add({"a": 1.0, "b": 4.0})
    m.add({"a": 3.0})
    assert m.mean() == {"a": 2.0, "b": 4.0}  # b is not diluted by the step that did not write it
    m = MeanMetrics()
    m.add({"policy/clipfrac": 0.5}, weight=10)
    m.add({"policy/clipfrac": 0.0}, weight=100)
    assert m.mean()["policy/clipfrac"] == pytest.approx(5 / 110)  # pooled over tokens, not 0.25


def test_update_pools_minibatch_statistics_over_their_tokens():
    """Two minibatches of 10 and 100 valid tokens: the logged statistic is the token mean over both."""
    from rlhf_core.ppo.buffer import RolloutBuffer
    from rlhf_core.ppo.experience import Experience
    trainer = make_trainer(num_mini_batches=2, ppo_epochs=1)
    mask = torch.zeros(2, 100, dtype=torch.long)
    mask[0, :10], mask[1] = 1, 1
    zeros = torch.zeros(2, 100)
    exp = Experience(query_ids=torch.ones(2, 1, dtype=torch.long), query_mask=torch.ones(2, 1, dtype=torch.long),
                     response_ids=mask.clone(), mask=mask, logprobs=zeros, ref_logprobs=zeros, scores=torch.zeros(2))

    def fake_step(minibatch, first=False):
        trainer.step_tokens = float(minibatch.mask.sum())
        return {"policy/clipfrac": 0.5 if trainer.step_tokens == 10 else 0.0, "policy/approx_kl": 0.0}

    trainer.minibatch_step = fake_step
    assert trainer.update(RolloutBuffer([exp]))["policy/clipfrac"] == pytest.approx(5 / 110)


def test_example_custom_advantage_learns_and_shows_the_dropped_kl():
    """examples/custom_advantage.py: both estimators raise the score; the one reading only `scores` is
    refused with a KL penalty in the rewards, and without one drifts further from the reference than the
    one built from the penalised `rewards`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    try:
        import custom_advantage
    finally:
        sys.path.pop(0)
    with pytest.raises(ConfigError, match="'reinforce_ema_scores_only' declares reads_rewards=False"):
        custom_advantage.train(custom_advantage.reinforce_ema_scores_only, 1, kl_coef=0.1)
    runs = custom_advantage.main()  # 40 iterations, seed 0, as `python examples/custom_advantage.py`
    smooth = custom_advantage.smooth
    for metrics in runs.values():
        score = smooth([m["objective/scores"] for m in metrics])
        assert score[-1] > score[0] + 0.05  # the curve it prints goes up
        assert all(m["perf/skipped_steps"] == 0 and "loss/value" not in m for m in metrics)  # critic-free
    kl = {name: smooth([m["objective/kl_exact"] for m in metrics])[-1] for name, metrics in runs.items()}
    assert kl["reinforce_ema_scores_only"] > 2 * kl["reinforce_ema"]  # measured 2.52 vs 0.91


def test_phase_run_saves_policy_value_head_and_trace(tmp_path):
    from rlhf_core.data.movie_reviews import generate_task
    from rlhf_core.config import TaskConfig
    from rlhf_core.phases import ppo as phase
    tok, _ = setup()
    model = build_tiny_model(tok, TINY, 0)
    model.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    task = generate_task(TaskConfig(n_corpus=10, n_sft=1, n_preferences=1, n_prompts=16, n_eval_prompts=64))
    cfg = PPOConfig(policy=str(tmp_path / "sft"), reward="gold", num_iterations=1, batch_size=2,
                    num_mini_batches=1, ppo_epochs=1, response_length=4, trace=True)
    logger = MetricsLogger(tmp_path / "metrics.jsonl")
    summary = phase.run(cfg, tmp_path / "ppo", logger, task=task)
    for key in ("gold_reward_before", "gold_reward_after", "kl_to_ref", "episodes_per_s", "wall_seconds",
                "scores_before", "scores_after"):
        assert summary[key] is not None, key
    out = tmp_path / "ppo"
    assert (out / "value_head.safetensors").is_file() and (out / "config.json").is_file()
    trace = json.loads((out / "trace.json").read_text())
    assert len(trace["responses"]) == 2 and len(trace["advantages"]) == 2
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)  # a plain HF folder


# ---- estimators: declared normalization, critic-free runs, the KL they see ----------------------


def trace_of(**overrides):
    """One traced iteration: the raw estimator output and the advantages the update used."""
    t = make_trainer(trace=True, **overrides)
    t.step()
    return t, t.trace["raw_advantages"], t.trace["advantages"], t.trace["mask"]


@pytest.mark.parametrize("estimator, whiten, expect_whitened", [
    ("gae", "auto", True), ("gae", "false", False), ("grpo", "auto", False), ("grpo", "true", True),
    ("dr_grpo", "auto", False), ("rloo", "auto", False), ("reinforce_pp", "auto", True)])
def test_the_trainer_whitens_what_the_estimator_declares(estimator, whiten, expect_whitened):
    group = {"group_size": 2} if estimator in ("grpo", "dr_grpo", "rloo") else {}
    _, raw, used, mask = trace_of(advantage_estimator=estimator, whiten_advantages=whiten, **group)
    if expect_whitened:
        m = mask.bool()
        assert used[m].mean().abs() < 1e-5 and (used[m].var(unbiased=False) - 1).abs() < 1e-3
    else:
        assert torch.equal(used, raw)  # GRPO's group normalization stays GRPO's


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "dr_grpo", "reinforce_pp"])
def test_critic_free_estimators_build_train_and_log_no_value_head(estimator):
    group = {"group_size": 2} if estimator != "reinforce_pp" else {}
    t = make_trainer(advantage_estimator=estimator, **group)
    assert t.policy.value_head is None and not t.policy.has_critic
    assert not any(n.startswith("value_") for n in t.policy.named_trainable_parameters())
    metrics = t.step()
    assert "loss/value" not in metrics and "val/explained_variance" not in metrics
    assert t.policy.value_state_dict() == {}


def test_estimator_and_policy_must_agree_on_the_critic():
    tok, task = setup()
    for estimator, value_model in (("grpo", "shared"), ("gae", "none")):
        policy = PolicyWithValue(build_tiny_model(tok, TINY, 0), value_model=value_model)
        with pytest.raises(ConfigError, match="value_model") as exc:
            PPOTrainer(PPOConfig(advantage_estimator=estimator, group_size=2, batch_size=8), policy, tok,
                       e_reward, task.prompts)
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("fields, needle", [
    ({"advantage_estimator": "grpo", "group_size": 1}, "ppo.group_size=1: advantage_estimator 'grpo'"),
    ({"advantage_estimator": "mine"}, "ppo.advantage_estimator: unknown advantage estimator 'mine'"),
    ({"advantage_estimator": "missing.py:f"}, "ppo.advantage_estimator 'missing.py:f': file missing.py not found"),
])
def test_bad_estimator_settings_are_one_line(fields, needle):
    with pytest.raises(ConfigError) as exc:
        make_trainer(**fields)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("spec, needle", [
    ("nope", "ppo.loss_fn='nope': expected '' (the PPO objective) or 'file.py:function'"),
    ("missing.py:f", "ppo.loss_fn 'missing.py:f': file missing.py not found"),
])
def test_bad_loss_fn_settings_are_one_line(spec, needle):
    from rlhf_core.ppo.extensions import resolve_loss_fn
    with pytest.raises(ConfigError) as exc:
        resolve_loss_fn(PPOConfig(loss_fn=spec))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_an_estimator_that_reads_only_scores_is_refused_with_the_kl_in_the_rewards():
    from rlhf_core.ppo.advantages import ADVANTAGE_ESTIMATORS, register_advantage_estimator

    @register_advantage_estimator("_scores_only", whiten=False, critic=False, groups=False, reads_rewards=False)
    def scores_only(*, scores, mask, **kw):
        adv = (scores - scores.mean()).view(-1, 1) * mask
        return adv, adv
    try:
        for penalty in ("reward", "both"):
            with pytest.raises(ConfigError, match="'_scores_only' declares reads_rewards=False") as exc:
                make_trainer(advantage_estimator="_scores_only", kl_estimator="exact", kl_penalty=penalty)
            assert "\n" not in str(exc.value)
        make_trainer(advantage_estimator="_scores_only", kl_coef=0.0).step()  # no penalty: nothing dropped
        make_trainer(advantage_estimator="_scores_only", kl_estimator="k3", kl_penalty="loss").step()
    finally:
        del ADVANTAGE_ESTIMATORS["_scores_only"]


def test_invariant_checks_are_logged_and_hold_on_a_healthy_step():
    metrics = make_trainer().step()
    assert metrics["check/first_ratio_dev"] < 1e-4 and metrics["check/logprob_gap"] < 1e-5
    assert metrics["check/truncated_fraction"] == pytest.approx(1 - metrics["response/eos_fraction"])


def test_invariant_check_catches_a_training_forward_that_is_not_the_sampler():
    """The update's forward runs other weights than the rollout's (a stale or reloaded policy): the first
    ratio is no longer 1, the logprob gap opens, and the run warns once."""
    t = make_trainer()
    real = t.minibatch_step

    def stale(minibatch, first=False):
        if first:
            with torch.no_grad():
                head = t.policy.lm_head_weight
                head.add_(0.05 * torch.randn(head.shape, generator=torch.Generator().manual_seed(1)))
        return real(minibatch, first)
    t.minibatch_step = stale
    with pytest.warns(UserWarning, match="check/first_ratio_dev"):
        metrics = t.step()
    assert metrics["check/first_ratio_dev"] > 0.01 and metrics["check/logprob_gap"] > 1e-3


def test_a_custom_loss_may_return_per_token_terms():
    """A loss_fn returning (B, T) is aggregated with ppo.loss_aggregation: the same step as returning
    aggregate(per_token) itself."""

    def per_token(*, logprobs, exp, config, **kw):
        ratio = torch.exp(logprobs - exp.logprobs)
        return -exp.advantages * ratio, {}

    def aggregated(*, logprobs, exp, config, aggregate, **kw):
        ratio = torch.exp(logprobs - exp.logprobs)
        return aggregate(-exp.advantages * ratio), {}
    runs = [make_trainer(loss_fn=f, loss_aggregation="seq-mean-token-mean", micro_batch_size=1)
            for f in (per_token, aggregated)]
    for t in runs:
        t.step()
    a, b = weights(runs[0]), weights(runs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kl_coef_zero_skips_the_reference_and_trains_identically():
    """At kl_coef = 0 no KL term exists, so the rollout never runs the reference (TRL's GRPO at beta
    = 0 likewise): the run's weights equal those of a run that does pay for the reference pass (up to
    the rounding of the policy-only logprob kernel against the paired one), and
    the KL metrics are absent (unmeasured) instead of a false zero."""
    from rlhf_core.ppo import experience_maker
    calls = []
    runs = {}
    for skip in (True, False):
        trainer = make_trainer(kl_coef=0.0, advantage_estimator="grpo", group_size=2)
        ref = trainer.policy.ref_model
        hook = ref.get_input_embeddings().register_forward_hook(lambda *a: calls.append(skip))
        orig = experience_maker.needs_reference
        experience_maker.needs_reference = orig if skip else (lambda cfg: True)
        try:
            metrics = [trainer.step() for _ in range(2)]
        finally:
            experience_maker.needs_reference = orig
            hook.remove()
        runs[skip] = (weights(trainer), metrics)
    assert True not in calls and False in calls  # the reference ran only where forced
    for name, w in runs[False][0].items():  # equal up to rounding: the policy-only logprob pass rounds
        torch.testing.assert_close(runs[True][0][name], w, rtol=1e-5, atol=1e-6, msg=name)  # as its own
    assert not any(k.startswith("objective/kl") and k != "objective/kl_coef" for k in runs[True][1][-1])
    assert runs[False][1][-1]["objective/kl_exact"] > 0  # measured where the reference ran: the policy moved
    assert experience_maker.needs_reference(PPOConfig(kl_coef=0.0, adaptive_kl=True))
    assert experience_maker.needs_reference(PPOConfig(kl_coef=0.0, measure_kl=True))
