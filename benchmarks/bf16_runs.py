"""bf16 against fp32 on the demo's PPO: the same SFT policy, reward model, seed and settings, only
``--ppo.mixed_precision`` differs. Reports the held-out gold reward, the exact KL to the reference, training
episodes/s and the bf16 mismatch the invariant checks measure (docs/precision.md).

Each seed's SFT policy and reward model come from a tiny-pipeline run (``--base DIR/seedN`` holding sft/ and
reward/, e.g. the ones benchmarks/losses.py leaves in runs/losses_tiny/tiny); missing ones are made with
``rlhf pipeline --stop-after reward``.

    python benchmarks/bf16_runs.py --seeds 0 1 2 --base runs/losses_tiny/tiny
    python benchmarks/bf16_runs.py --from-json runs/bf16/bf16.json     # re-render the doc
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from doc_runs import DEMO_SIZES, ROOT, rlhf, smollm2_setup, splice_doc

# What the tiny pipeline's PPO runs with (presets/tiny.py): a critic initialised from the reward model.
DEMO_PPO = [*DEMO_SIZES, "--ppo.value_model", "separate", "--ppo.value_init_from_reward", "true"]


def run(base: Path, seed: int, precision: str, out: Path) -> dict:
    run_dir = out / f"seed{seed}_{precision}"
    t0 = time.time()
    rlhf("ppo", "--policy", str(base / "sft"), "--reward", str(base / "reward"), "--seed", str(seed), *DEMO_PPO,
         "--ppo.mixed_precision", "bf16" if precision == "bf16" else "no", "--output-dir", str(run_dir), "--overwrite")
    summary = json.loads((run_dir / "summary.json").read_text())["ppo"]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("phase") == "ppo" and "check/logprob_gap" in r]
    return {"seed": seed, "precision": precision, "gold_before": summary["gold_reward_before"],
            "gold_after": summary["gold_reward_after"], "kl": summary["kl_to_ref"],
            "episodes_per_s": summary["episodes_per_s"], "wall_s": time.time() - t0,
            "recorded": summary.get("precision"),
            "logprob_gap": statistics.mean(r["check/logprob_gap"] for r in train),
            "first_ratio_dev": max(r["check/first_ratio_dev"] for r in train)}


def smollm2_run(sft: Path, out: Path, precision: str, iterations: int = 20, seed: int = 0) -> dict:
    """The smollm2 preset's LoRA PPO with the exact-answer reward and grpo advantages (groups of 4), the "ppo"
    row of benchmarks/losses.py, in ``precision``."""
    import dataclasses

    from rlhf_core.phases import ppo as phase
    from rlhf_core.tracking import MetricsLogger
    sft, cfg, task = smollm2_setup(out, sft, seed)
    ppo_cfg = dataclasses.replace(
        cfg.ppo, policy=str(sft), reward=f"{ROOT / 'benchmarks' / 'verifiable_reward.py'}:exact_answer",
        advantage_estimator="grpo", group_size=4, num_iterations=iterations, eval_every=10, seed=seed,
        mixed_precision="bf16" if precision == "bf16" else "no")
    run_dir = out / f"smollm2_{precision}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.time()
    summary = phase.run(ppo_cfg, run_dir / "ppo", MetricsLogger(run_dir / "metrics.jsonl", echo=False), task=task)
    return {"task": "smollm2", "precision": precision, "accuracy_before": summary.get("correct_before"),
            "accuracy_after": summary.get("correct_after"), "gold_before": summary["gold_reward_before"],
            "gold_after": summary["gold_reward_after"], "kl": summary["kl_to_ref"],
            "episodes_per_s": summary["episodes_per_s"], "wall_s": time.time() - t0}


def markdown(rows: list[dict], command: str) -> str:
    small = [r for r in rows if r.get("task") == "smollm2"]
    rows = [r for r in rows if r.get("task") != "smollm2"]
    lines = [f"Command: `{command}` (one core, the machine's other core busy with other runs).", "",
             "| precision | gold reward after PPO (mean ± sd) | exact KL to ref | training episodes/s | "
             "mean \\|Δ log π\\| (check/logprob_gap) | max \\|ρ − 1\\| at the first step | per seed: gold / KL |",
             "|---|---|---|---|---|---|---|"]
    for precision in ("fp32", "bf16"):
        pts = [r for r in rows if r["precision"] == precision]
        if not pts:
            continue
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)  # noqa: E731
        gold, kl = [r["gold_after"] for r in pts], [r["kl"] for r in pts]
        per = ", ".join(f"{r['seed']}: {r['gold_after']:+.3f} / {r['kl']:.2f}" for r in pts)
        lines.append(f"| {precision} | {statistics.mean(gold):+.3f} ± {sd(gold):.3f} | {statistics.mean(kl):.2f} ± "
                     f"{sd(kl):.2f} | {statistics.mean(r['episodes_per_s'] for r in pts):.1f} | "
                     f"{statistics.mean(r['logprob_gap'] for r in pts):.2e} | "
                     f"{max(r['first_ratio_dev'] for r in pts):.2e} | {per} |")
    before = statistics.mean(r["gold_before"] for r in rows if r["precision"] == "fp32")
    lines += ["", f"Gold reward of the SFT policies before PPO: {before:+.3f} (mean over seeds)."]
    if small:
        lines += ["", "SmolLM2-135M, LoRA PPO with grpo advantages and the exact-answer reward (seed 0, 20 iterations "
                      "x 16 episodes; `--smollm2-sft`):", "",
                  "| precision | held-out accuracy before → after | gold reward before → after | exact KL to ref | "
                  "training episodes/s |", "|---|---|---|---|---|"]
        for r in small:
            lines.append(f"| {r['precision']} | {r['accuracy_before']:.3f} → {r['accuracy_after']:.3f} | "
                         f"{r['gold_before']:+.3f} → {r['gold_after']:+.3f} | {r['kl']:.2f} | "
                         f"{r['episodes_per_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--base", default="runs/bf16/base", help="folder with seedN/{sft,reward}")
    ap.add_argument("--out", default="runs/bf16")
    ap.add_argument("--from-json", help="re-render docs/precision.md from a bf16.json")
    ap.add_argument("--smollm2-sft", type=Path, help="also run the smollm2 preset's PPO in both precisions")
    args = ap.parse_args()
    out = Path(args.out)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        rows = json.loads((out / "bf16.json").read_text()) if (out / "bf16.json").is_file() else []
        done = {(r.get("task", "tiny"), r.get("seed"), r["precision"]) for r in rows}
        if args.smollm2_sft:
            for precision in ("fp32", "bf16"):
                if ("smollm2", None, precision) not in done:
                    rows.append(smollm2_run(args.smollm2_sft, out, precision))
                    print(rows[-1], flush=True)
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "bf16.json").write_text(json.dumps(rows, indent=1))
        for seed in args.seeds:
            base = Path(args.base) / f"seed{seed}"
            if not (base / "reward").is_dir():
                rlhf("pipeline", "--seed", str(seed), "--stop-after", "reward", "--output-dir", str(base), "--overwrite")
            for precision in ("fp32", "bf16"):
                if ("tiny", seed, precision) in done:
                    continue
                rows.append(run(base, seed, precision, out))
                print(rows[-1], flush=True)
                out.mkdir(parents=True, exist_ok=True)
                (out / "bf16.json").write_text(json.dumps(rows, indent=1))
    command = " ".join(["python", "benchmarks/bf16_runs.py", "--seeds", *map(str, args.seeds)])
    splice_doc(ROOT / "docs" / "precision.md", "bf16_runs", markdown(rows, command))
    print("wrote docs/precision.md")


if __name__ == "__main__":
    main()
