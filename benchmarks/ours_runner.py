"""Run rlhf_core's PPO from the same artifacts as ``trl_runner.py``, timed the same way.

Phases come from the metrics ``PPOTrainer.step()`` returns (measured inside the trainer with
``time.perf_counter``): "generation" = ``time/generate`` (the KV-cache sampling loop),
"scoring" = ``time/score`` (decode, reward, policy/value and reference forwards), and
"update" = wall − generation − scoring, the same remainder definition as the TRL side.
``step()`` is called directly, so the held-out evaluation that ``train()`` adds is not timed
(TRL runs none either: ``num_sample_generations=0``).

Rows:
- "ours-trl-structure": a separate value network (trunk + head, both from TRL's value model),
  ``kernel_backend="torch"``, the models' own activation modules; the rollout logprobs come from
  the sampling loop, as TRL's come from its generation logits — the same work as TRL, done our way.
- "ours-best": the value head on the policy trunk (the sampling loop's hidden states give
  logprobs and values), GPT-2's GELU as one kernel (``fast_activations``) and
  ``kernel_backend="auto"`` (the fused Triton kernel on CUDA; on a CPU it resolves to the
  chunked torch reference in kernels/reference.py — no Triton on CPU outside the interpreter).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from common import HParams, PhaseTimer, load_model, result_record, sync, task_prompts

ROWS = {
    "ours-trl-structure": {"value_model": "separate", "kernel_backend": "torch", "fast_activations": False},
    "ours-best": {"value_model": "shared", "kernel_backend": "auto", "fast_activations": True},
}


def build_config(hp: HParams, value_model: str, kernel_backend: str, fast_activations: bool = True):
    """HParams -> our PPOConfig; the one-to-one map of trl_runner.build_trl_config."""
    from rlhf_core.config import PPOConfig
    return PPOConfig(
        seed=hp.seed, num_iterations=hp.iterations, batch_size=hp.batch_size,
        num_mini_batches=hp.num_mini_batches, micro_batch_size=0, ppo_epochs=hp.ppo_epochs,
        response_length=hp.response_length, max_prompt_length=hp.max_prompt_length,
        temperature=hp.temperature, top_k=0, top_p=1.0, learning_rate=hp.lr, lr_schedule="linear",
        warmup_steps=0, max_grad_norm=0.0,  # TRL's loop clips no gradients
        kl_coef=hp.kl_coef, kl_estimator=hp.kl_estimator, clip_range=hp.clip_range,
        clip_range_value=hp.clip_range_value, vf_coef=hp.vf_coef, ent_coef=0.0, gamma=hp.gamma, lam=hp.lam,
        missing_eos_penalty=0.0, value_model=value_model, kernel_backend=kernel_backend, eval_every=0,
        rollout_logprobs=True, fast_activations=fast_activations)


def build_policy(paths: dict[str, str], value_model: str, hp: HParams | None = None):
    """PolicyWithValue from the shared folders; the value head starts as TRL's value model's score layer.

    Weights in ``hp.dtype`` on ``hp.device``, except the value head, which stays fp32 (it is one
    H-vector; ours always keeps it fp32).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from rlhf_core.ppo.policy import PolicyWithValue
    hp = hp or HParams()
    model = load_model(AutoModelForCausalLM, paths["policy"], hp)
    ref = load_model(AutoModelForCausalLM, paths["policy"], hp)
    value = load_model(AutoModelForSequenceClassification, paths["value"], hp, num_labels=1)
    policy = PolicyWithValue(model, value_model=value_model,
                             value_backbone=value if value_model == "separate" else None, ref_model=ref)
    with torch.no_grad():
        policy.value_head.summary.weight.copy_(value.score.weight)  # (1, H); TRL's score has no bias
        policy.value_head.summary.bias.zero_()
    return policy.to(hp.device)


def run_ours(paths: dict[str, str], hp: HParams, scale: str, row: str = "ours-best", reward: str = "model",
             prompts: list[str] | None = None) -> dict[str, Any]:
    """One run of our PPOTrainer; returns the result record (see common.py)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from rlhf_core.ppo.reward_sources import RewardModelScorer
    from rlhf_core.ppo.trainer import PPOTrainer

    setting = ROWS[row]
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    if reward == "gold":
        from rlhf_core.data.movie_reviews import gold_reward as reward_fn
    else:
        rm = load_model(AutoModelForSequenceClassification, paths["reward"], hp, num_labels=1).to(hp.device)
        reward_fn = RewardModelScorer(rm, tok, batch_size=hp.batch_size)
    if prompts is None:
        prompts = task_prompts(hp.iterations * hp.batch_size, hp.seed)[0]
    torch.manual_seed(hp.seed)
    trainer = PPOTrainer(build_config(hp, **setting), build_policy(paths, setting["value_model"], hp), tok,
                         reward_fn, prompts)
    if hp.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return time_steps(trainer, hp, scale, row)


def time_steps(trainer, hp: HParams, scale: str, row: str) -> dict[str, Any]:
    """``hp.iterations`` calls of ``trainer.step()``, timed; the result record (see common.py)."""
    timer, curve = PhaseTimer(), []
    sync(hp)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(hp.iterations):
        m = trainer.step()
        timer.seconds["generation"] = timer.seconds.get("generation", 0.0) + m["time/generate"]
        timer.seconds["scoring"] = timer.seconds.get("scoring", 0.0) + m["time/score"]
        timer.add("response_tokens", m["response/length"] * hp.batch_size)
        curve.append((trainer.episodes, m["objective/scores"]))
    sync(hp)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return result_record("ours", row, scale, hp, timer, wall, cpu, curve)
