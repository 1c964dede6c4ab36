"""PPOTrainer: accumulation equivalence, determinism, skipped steps, hooks, LoRA, the phase run."""
import functools
import json
import sys
from pathlib import Path

import pytest
import torch

from rlhf_core.config import PPOConfig, TinyModelConfig
from rlhf_core.models import build_tiny_model
from rlhf_core.optim import lr_factor
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
    policy = PolicyWithValue(model)
    fields = dict(batch_size=8, num_mini_batches=2, ppo_epochs=2, response_length=6, num_iterations=2,
                  learning_rate=1e-3, eval_every=0)
    fields.update(overrides)
    loss_fn = fields.pop("loss_fn", None)
    return PPOTrainer(PPOConfig(**fields), policy, tok, e_reward, task.prompts, task.eval_prompts, loss_fn=loss_fn)


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

    def policy_only(*, logprobs, values, entropy, exp, config):
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

    def fake_step(minibatch):
        trainer.step_tokens = float(minibatch.mask.sum())
        return {"policy/clipfrac": 0.5 if trainer.step_tokens == 10 else 0.0, "policy/approx_kl": 0.0}

    trainer.minibatch_step = fake_step
    assert trainer.update(RolloutBuffer([exp]))["policy/clipfrac"] == pytest.approx(5 / 110)


def test_example_custom_advantage_runs():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    try:
        import custom_advantage
    finally:
        sys.path.pop(0)
    summary = custom_advantage.main(n_iterations=2)
    assert summary["iterations"] == 2 and summary["skipped_steps"] == 0
    assert custom_advantage.BASELINE["mean"] != 0.0  # the registered estimator ran


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
