"""GRPO runs for ``bench_grpo_vs_trl.py``: TRL 1.16's ``GRPOTrainer`` and ours, on the same work.

Equal settings, mapped one to one (``trl_grpo_config`` ↔ ``ours_grpo_config``):

| ours (``PPOConfig``)                              | TRL 1.16 (``GRPOConfig``)                              |
|---------------------------------------------------|--------------------------------------------------------|
| ``batch_size`` B episodes per iteration           | ``generation_batch_size`` = B (``steps_per_generation`` M) |
| ``group_size`` k                                  | ``num_generations`` k                                  |
| ``num_mini_batches`` M (optimizer steps / epoch)  | ``per_device_train_batch_size`` B/M, grad accumulation 1 |
| ``ppo_epochs`` E                                  | ``num_iterations`` E                                   |
| ``advantage_estimator="grpo"`` (group mean / std) | ``scale_rewards="group"``                              |
| ``loss_aggregation="token-mean"`` (global count)  | ``loss_type="dapo"`` (its default)                     |
| ``kl_coef=0``                                     | ``beta=0`` (its default)                               |
| ``clip_range``, ``response_length``, ``temperature``, ``learning_rate`` + linear decay, ``max_grad_norm`` | ``epsilon``, ``max_completion_length``, ``temperature``, ``learning_rate`` + linear, ``max_grad_norm`` |
| ``mixed_precision="bf16"`` (autocast, fp32 master weights) | ``bf16=True`` (autocast through accelerate)   |

Both generate with transformers-style generation (ours: its KV-cache loop; TRL: ``model.generate``),
no vLLM; both take the same prompt list in the same order and the same Python reward function.
TRL's gradient checkpointing (on by default) is turned off, as in the PPO benchmark.

Phases, timed from the outside on TRL (it reports none per phase): ``_generate_single_turn`` →
generation; ``_calculate_rewards`` and every no-grad ``_get_per_token_logps_and_entropies`` (its
old-logprob forward when one generation batch feeds several optimizer steps) → scoring; update =
wall − generation − scoring. Ours reads ``time/generate`` / ``time/score`` from ``step()``.
"""
from __future__ import annotations

import tempfile
import time
from typing import Any, Callable

import torch

from common import HParams, PhaseTimer, load_model, result_record, sync
from ours_runner import time_steps


def reward_function(name: str) -> Callable[[list[str], list[str]], list[float]]:
    """The Python reward both trainers call: 'gold' (the movie-review task's judge) or 'exact'
    (the short-question task's exact-answer check)."""
    if name == "gold":
        from rlhf_core.data.movie_reviews import gold_reward
        return lambda prompts, responses: [float(x) for x in gold_reward(prompts, responses)]
    from verifiable_reward import exact_answer
    return lambda prompts, responses: [float(x) for x in exact_answer(prompts, responses)]


def ours_grpo_config(hp: HParams):
    from rlhf_core.config import PPOConfig
    return PPOConfig(
        seed=hp.seed, num_iterations=hp.iterations, batch_size=hp.batch_size, group_size=hp.group_size,
        num_mini_batches=hp.num_mini_batches, micro_batch_size=0, ppo_epochs=hp.ppo_epochs,
        response_length=hp.response_length, max_prompt_length=hp.max_prompt_length, temperature=hp.temperature,
        top_k=0, top_p=1.0, learning_rate=hp.lr, lr_schedule="linear", warmup_steps=0, max_grad_norm=1.0,
        kl_coef=hp.kl_coef, clip_range=hp.clip_range, ent_coef=0.0, advantage_estimator="grpo",
        loss_aggregation="token-mean", missing_eos_penalty=0.0, eval_every=0, rollout_logprobs=True,
        mixed_precision="bf16" if hp.dtype == "bf16" else "no")


def run_ours_grpo(paths: dict[str, str], hp: HParams, scale: str, reward: str, prompts: list[str]) -> dict[str, Any]:
    """One run of our PPOTrainer with the grpo estimator (no critic); returns the result record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from rlhf_core.ppo.policy import PolicyWithValue
    from rlhf_core.ppo.trainer import PPOTrainer

    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32)
    torch.manual_seed(hp.seed)
    trainer = PPOTrainer(ours_grpo_config(hp), PolicyWithValue(model, value_model="none"), tok,
                          reward_function(reward), prompts)
    return time_steps(trainer, hp, scale, "ours-grpo")


def trl_grpo_config(hp: HParams, output_dir: str):
    from trl import GRPOConfig
    mb = hp.batch_size // hp.num_mini_batches
    return GRPOConfig(
        output_dir=output_dir, seed=hp.seed, report_to="none", use_cpu=hp.device == "cpu", bf16=hp.dtype == "bf16",
        save_strategy="no", disable_tqdm=True, logging_steps=hp.num_mini_batches * hp.ppo_epochs,
        gradient_checkpointing=False,  # on by default in TRL; ours never recomputes activations
        per_device_train_batch_size=mb, gradient_accumulation_steps=1, steps_per_generation=hp.num_mini_batches,
        num_generations=hp.group_size, num_iterations=hp.ppo_epochs,
        max_steps=hp.iterations * hp.num_mini_batches * hp.ppo_epochs,
        max_completion_length=hp.response_length, temperature=hp.temperature, top_p=1.0, top_k=0,
        beta=hp.kl_coef, epsilon=hp.clip_range, loss_type="dapo", scale_rewards="group",
        learning_rate=hp.lr, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
        shuffle_dataset=False,  # the prompts in the order ours draws them
    )


def run_trl_grpo(paths: dict[str, str], hp: HParams, scale: str, reward: str, prompts: list[str]) -> dict[str, Any]:
    """One TRL 1.16 GRPOTrainer run from the same folders and prompts; returns the result record."""
    import numpy as np
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    np.random.seed(hp.seed)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    tok.padding_side = "left"
    fn = reward_function(reward)
    timer = PhaseTimer(cuda=hp.device == "cuda")

    def reward_func(prompts, completions, **kwargs):  # TRL's contract: lists of strings in, floats out
        return fn(prompts, completions)

    curve: list[tuple[int, float]] = []

    class Curve(TrainerCallback):
        """Mean reward of each generation batch (logged once per iteration)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                curve.append((len(curve) * hp.batch_size + hp.batch_size, float(logs["reward"])))

    policy = load_model(AutoModelForCausalLM, paths["policy"], HParams(dtype="fp32"))
    dataset = Dataset.from_dict({"prompt": prompts})
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = GRPOTrainer(model=policy, reward_funcs=reward_func, args=trl_grpo_config(hp, out_dir),
                              train_dataset=dataset, processing_class=tok, callbacks=[Curve()])
        _instrument(trainer, timer)
        sync(hp)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        sync(hp)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return result_record("trl", "trl-grpo", scale, hp, timer, wall, cpu, curve)


def _instrument(trainer, timer: PhaseTimer) -> None:
    """Time TRL's generation, reward and no-grad logprob calls on this trainer instance."""
    gen, rewards, logps = (trainer._generate_single_turn, trainer._calculate_rewards,
                           trainer._get_per_token_logps_and_entropies)

    def generate(*args, **kwargs):
        with timer.phase("generation"):
            completion_ids, logprobs = gen(*args, **kwargs)
        timer.add("response_tokens", float(sum(len(c) for c in completion_ids)))  # through the EOS
        return completion_ids, logprobs

    trainer._generate_single_turn = generate
    trainer._calculate_rewards = timer.wrap(rewards, "scoring")
    trainer._get_per_token_logps_and_entropies = timer.wrap(
        logps, lambda *a, **k: None if torch.is_grad_enabled() else "scoring")
