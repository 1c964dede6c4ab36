"""bf16 against fp32 PPO speed at SmolLM2-135M scale: the smollm2 preset's LoRA PPO (its SFT policy, the
exact-answer reward), a few iterations each, timed after a warm-up iteration; one process, one core.

    python benchmarks/bf16_speed.py --sft RUN/sft          # RUN: `rlhf pipeline --preset smollm2 --stop-after sft`

Prints one JSON line per precision: seconds per iteration split into generate / score / update, and
training episodes/s (docs/precision.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from doc_runs import ROOT, smollm2_setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/bf16_speed"))
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args()
    from rlhf_core.models import load_causal_lm, load_tokenizer
    from rlhf_core.phases.ppo import build_policy
    from rlhf_core.ppo.reward_sources import make_reward_fn
    from rlhf_core.ppo.trainer import PPOTrainer
    sft, cfg, task = smollm2_setup(args.out, args.sft)
    torch.set_num_threads(1)
    for precision in ("no", "bf16"):
        ppo = dataclasses.replace(cfg.ppo, policy=str(sft), mixed_precision=precision, advantage_estimator="grpo",
                                  group_size=4, num_iterations=args.iterations + 1, eval_every=0,
                                  reward=f"{ROOT / 'benchmarks' / 'verifiable_reward.py'}:exact_answer")
        tok = load_tokenizer(ppo.policy)
        model = load_causal_lm(ppo.policy, mode="lora", lora=ppo)
        torch.manual_seed(0)
        trainer = PPOTrainer(ppo, build_policy(ppo, model), tok, make_reward_fn(ppo.reward, tok, task=task),
                             task.prompts)
        metrics = [trainer.step() for _ in range(args.iterations + 1)][1:]  # the first warms up
        keys = ("time/generate", "time/score", "time/update", "perf/episodes_per_s")
        print(json.dumps({"precision": precision, **{k: statistics.mean(m[k] for m in metrics) for k in keys},
                          "logprob_gap": statistics.mean(m["check/logprob_gap"] for m in metrics)}), flush=True)


if __name__ == "__main__":
    main()
