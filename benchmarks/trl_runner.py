"""Run TRL 1.12's PPO (``trl.experimental.ppo``) on CPU and time its phases from the outside.

TRL's ``train()`` reports only ``eps`` (episodes / wall seconds, an int), so phases are measured
by replacing the module-level functions that ``train()`` looks up at call time in
``trl/experimental/ppo/ppo_trainer.py``:
- ``batch_generation``           -> "generation" (HF ``generate`` with ``output_scores=True``);
- ``forward`` / ``get_reward`` / ``selective_log_softmax`` while grad is disabled -> "scoring"
  (reference forward, value forward, reward forward, logprobs of the generated logits);
- ``gc.collect`` (``ppo_mod.gc``, called twice per iteration, lines 753 and 919) -> "gc";
- "update" = train() wall time − generation − scoring (PPO epochs, TRL's GAE loop, logging and
  the "gc" seconds, which are also reported on their own).
The same calls under grad (the PPO epochs) run untimed, so nothing is counted twice.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch

from common import HParams, PhaseTimer, load_model, result_record, sync

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


class GoldRewardStub(torch.nn.Module):
    """Stands in for TRL's reward model when the reward is the gold judge.

    TRL only accepts an ``nn.Module`` reward (it calls ``get_reward(model, ...)``); our patched
    ``get_reward`` sees this stub, decodes the responses and calls ``gold_reward`` instead.
    """

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # so .to(device) works

    def scores(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
        from rlhf_core.data.movie_reviews import gold_reward
        prompts = self.tokenizer.batch_decode(query_responses[:, :context_length], skip_special_tokens=True)
        responses = self.tokenizer.batch_decode(query_responses[:, context_length:], skip_special_tokens=True)
        return torch.tensor(gold_reward(prompts, responses), dtype=torch.float32)


def _instrument(ppo_mod, timer: PhaseTimer, eos_id: int) -> None:
    """Replace the functions TRL's train() calls by timed versions (see the module docstring)."""
    no_grad_scoring = lambda *a, **k: None if torch.is_grad_enabled() else "scoring"  # noqa: E731
    orig_gen, orig_reward = ppo_mod.batch_generation, ppo_mod.get_reward

    def batch_generation(model, queries, *args, **kwargs):
        with timer.phase("generation"):
            query_responses, logits = orig_gen(model, queries, *args, **kwargs)
        responses = query_responses[:, queries.shape[1]:]  # (B, T)
        # Count tokens through the first EOS (what the policy "wrote"), as ours counts its mask.
        is_eos = (responses == eos_id).int()
        before_eos = (is_eos.cumsum(1) - is_eos) == 0  # (B, T) True through the first EOS
        timer.add("response_tokens", float(before_eos.sum()))
        return query_responses, logits

    def get_reward(model, query_responses, pad_token_id, context_length):
        with timer.phase("scoring"):
            if isinstance(model, GoldRewardStub):
                return None, model.scores(query_responses, context_length).to(query_responses.device), None
            return orig_reward(model, query_responses, pad_token_id, context_length)

    class TimedGC:
        """The ``gc`` module as ppo_trainer.py sees it, with ``collect`` timed."""

        def __getattr__(self, name):
            import gc
            return timer.wrap(gc.collect, "gc") if name == "collect" else getattr(gc, name)

    ppo_mod.gc = TimedGC()
    ppo_mod.batch_generation = batch_generation
    ppo_mod.get_reward = get_reward
    ppo_mod.forward = timer.wrap(ppo_mod.forward, no_grad_scoring)
    ppo_mod.selective_log_softmax = timer.wrap(ppo_mod.selective_log_softmax, no_grad_scoring)


def build_trl_config(hp: HParams, output_dir: str):
    """Our HParams mapped one to one onto TRL's PPOConfig (grad accumulation 1)."""
    from trl.experimental.ppo import PPOConfig
    return PPOConfig(
        output_dir=output_dir, seed=hp.seed, report_to="none", bf16=hp.dtype == "bf16", use_cpu=hp.device == "cpu",
        num_sample_generations=0, save_strategy="no", logging_steps=1, disable_tqdm=True,
        # TRL's PPOConfig turns gradient checkpointing on by default; ours never recomputes
        # activations, so it is off here to compare the trainers, not a memory trade-off.
        gradient_checkpointing=False,
        per_device_train_batch_size=hp.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=hp.num_mini_batches, num_ppo_epochs=hp.ppo_epochs,
        total_episodes=hp.iterations * hp.batch_size, local_rollout_forward_batch_size=hp.batch_size,
        response_length=hp.response_length, temperature=hp.temperature, stop_token="eos",
        kl_coef=hp.kl_coef, kl_estimator=hp.kl_estimator, cliprange=hp.clip_range,
        cliprange_value=hp.clip_range_value, vf_coef=hp.vf_coef, gamma=hp.gamma, lam=hp.lam,
        learning_rate=hp.lr, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=None,
    )


def run_trl(paths: dict[str, str], hp: HParams, scale: str, row: str = "trl", reward: str = "model",
            prompts: list[str] | None = None) -> dict[str, Any]:
    """One TRL PPO run from the shared artifacts; returns the result record (see common.py)."""
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_mod

    import numpy as np
    # ppo_trainer.py:803 draws minibatch order from numpy's global RNG, which PPOTrainer never
    # seeds (it seeds only torch): without this, one seed gives a different run per process.
    np.random.seed(hp.seed)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    tok.padding_side = "left"  # TRL generates from the collated queries: prompts must be left-padded
    timer = PhaseTimer(cuda=hp.device == "cuda")
    _instrument(ppo_mod, timer, tok.eos_token_id)

    # TRL's accelerator moves every model to hp.device; weights in hp.dtype as for ours.
    policy = load_model(AutoModelForCausalLM, paths["policy"], hp)
    ref = load_model(AutoModelForCausalLM, paths["policy"], hp)
    value = load_model(AutoModelForSequenceClassification, paths["value"], hp, num_labels=1)
    rm = (GoldRewardStub(tok) if reward == "gold"
          else load_model(AutoModelForSequenceClassification, paths["reward"], hp, num_labels=1))
    if prompts is None:
        from common import task_prompts
        prompts = task_prompts(hp.iterations * hp.batch_size, hp.seed)[0]
    ids = [tok(p, add_special_tokens=False)["input_ids"][-hp.max_prompt_length:] for p in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})

    curve: list[tuple[int, float]] = []

    class Curve(TrainerCallback):
        """Mean score of each rollout batch (the gold reward when reward='gold')."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                curve.append((int(logs["episode"]), float(logs["objective/scores"])))

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = PPOTrainer(args=build_trl_config(hp, out_dir), processing_class=tok, model=policy,
                             ref_model=ref, reward_model=rm, train_dataset=dataset, value_model=value,
                             eval_dataset=dataset, callbacks=[Curve()])
        if hp.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(hp)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        sync(hp)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return result_record("trl", row, scale, hp, timer, wall, cpu, curve)
