"""Soak test: a long tiny-preset PPO run whose resident memory must stay flat.

Runs ``PPOTrainer.train`` (rollout, update, evaluation every ``--eval-every`` iterations, a
checkpoint every ``--save-every``) on the tiny preset's model shape with the gold reward, and
samples the process RSS (``/proc/self/status`` VmRSS) at every iteration through the metrics
logger. After a warm-up (allocator pools, first checkpoint, first evaluation) RSS should grow by
less than 5 %: growth = median RSS of the last 10 % of iterations / median of the 10 % right
after warm-up - 1. Writes ``results/soak_cpu.{json,md}``.

    python benchmarks/soak.py                         # 1000 iterations, a few minutes on 2 cores
    python benchmarks/soak.py --iterations 50 --out /tmp/soak   # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_logger():
    from rlhf_core.tracking import MetricsLogger

    class RSSLogger(MetricsLogger):
        """Keeps (iteration, seconds, RSS MiB) at every training log call."""

        def __init__(self) -> None:
            super().__init__(None)
            self.samples: list[tuple[int, float, float]] = []
            self.start = time.perf_counter()

        def log(self, phase, step, metrics):
            if step > 0:
                self.samples.append((int(step), time.perf_counter() - self.start, rss_mib()))
            return super().log(phase, step, {k: v for k, v in metrics.items() if k.startswith(("eval/", "objective/"))})

    return RSSLogger()


def run(args: argparse.Namespace) -> dict:
    from rlhf_core.config import PPOConfig, TinyModelConfig
    from rlhf_core.data.movie_reviews import gold_reward
    from rlhf_core.testing import tiny_setup
    from rlhf_core.ppo.policy import PolicyWithValue
    from rlhf_core.ppo.trainer import PPOTrainer

    torch.set_num_threads(1)
    tok, model, task = tiny_setup(seed=0, n_prompts=512, n_eval_prompts=32, model_cfg=TinyModelConfig())
    torch.manual_seed(0)
    policy = PolicyWithValue(model)
    cfg = PPOConfig(num_iterations=args.iterations, batch_size=16, num_mini_batches=2, ppo_epochs=2,
                    response_length=16, learning_rate=1e-4, eval_every=args.eval_every,
                    save_every=args.save_every, keep_checkpoints=2)
    logger = make_logger()
    trainer = PPOTrainer(cfg, policy, tok, gold_reward, task.prompts, task.eval_prompts, logger, gold_fn=gold_reward)
    rss_start = rss_mib()
    with tempfile.TemporaryDirectory() as ckpt:
        t0 = time.perf_counter()
        summary = trainer.train(checkpoint_dir=ckpt)
        seconds = time.perf_counter() - t0
    return analyse(logger.samples, args, rss_start, seconds, summary)


def analyse(samples, args, rss_start, seconds, summary) -> dict:
    n = len(samples)
    warm = max(1, int(n * args.warmup))
    window = max(1, n // 10)
    after_warmup = statistics.median(s[2] for s in samples[warm:warm + window])
    final = statistics.median(s[2] for s in samples[-window:])
    growth = final / after_warmup - 1
    xs, ys = [s[0] for s in samples[warm:]], [s[2] for s in samples[warm:]]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
    return {
        "command": " ".join(["python benchmarks/soak.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": f"{cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "iterations": args.iterations, "eval_every": args.eval_every, "save_every": args.save_every,
        "warmup_iterations": warm, "seconds": round(seconds, 1),
        "rss_mib": {"before_training": round(rss_start, 1), "after_warmup_median": round(after_warmup, 1),
                    "final_median": round(final, 1), "max": round(max(s[2] for s in samples), 1)},
        "growth_after_warmup": round(growth, 4), "slope_mib_per_100_iterations": round(100 * slope, 3),
        "target": "growth_after_warmup < 0.05", "passed": growth < 0.05,
        "gold_reward_before": summary.get("gold_reward_before"), "gold_reward_after": summary.get("gold_reward_after"),
        "samples": [[i, round(t, 2), round(r, 1)] for i, t, r in samples],
    }


def write_markdown(result: dict, path: Path) -> None:
    r = result["rss_mib"]
    every = max(1, len(result["samples"]) // 12)
    rows = "\n".join(f"| {i} | {t} | {m} |" for i, t, m in result["samples"][::every])
    path.write_text(f"""# Soak: RSS over a long tiny-preset PPO run — {result['device']}

Command: `{result['command']}`  
Date: {result['date']}; load average at the end: {result['load_average']} (shared machine)

{result['iterations']} PPO iterations (batch 16, 2 minibatches, 2 epochs, 16 new tokens; tiny model
64 wide, 2 layers) in {result['seconds']} s, with a held-out evaluation every {result['eval_every']} iterations
and a checkpoint (weights, Adam state, RNGs; safetensors + JSON) every {result['save_every']}.

| RSS (MiB) | value |
|---|---|
| before training | {r['before_training']} |
| median just after warm-up ({result['warmup_iterations']} iterations) | {r['after_warmup_median']} |
| median of the last 10 % | {r['final_median']} |
| max | {r['max']} |

Growth after warm-up: **{100 * result['growth_after_warmup']:.2f} %** (target < 5 %: \
{'met' if result['passed'] else 'NOT met'}); linear trend {result['slope_mib_per_100_iterations']} MiB
per 100 iterations.
Gold reward on held-out prompts: {result['gold_reward_before']:.3f} before, {result['gold_reward_after']:.3f} after.

| iteration | seconds | RSS MiB |
|---|---|---|
{rows}
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000, help="PPO iterations (>= 200 for the soak)")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of iterations treated as warm-up")
    parser.add_argument("--eval-every", type=int, default=100, help="held-out evaluation every N iterations")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N iterations")
    parser.add_argument("--out", default=str(RESULTS / "soak_cpu"), help="output path without extension")
    args = parser.parse_args()
    os.environ.setdefault("RLHF_NO_PROGRESS", "1")
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
