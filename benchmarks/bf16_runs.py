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

from doc_runs import DEMO_SIZES, ROOT, rlhf, splice_doc

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


def markdown(rows: list[dict], command: str) -> str:
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
    return "\n".join(lines + ["", f"Gold reward of the SFT policies before PPO: {before:+.3f} (mean over seeds)."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--base", default="runs/bf16/base", help="folder with seedN/{sft,reward}")
    ap.add_argument("--out", default="runs/bf16")
    ap.add_argument("--from-json", help="re-render docs/precision.md from a bf16.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        rows = []
        for seed in args.seeds:
            base = Path(args.base) / f"seed{seed}"
            if not (base / "reward").is_dir():
                rlhf("pipeline", "--seed", str(seed), "--stop-after", "reward", "--output-dir", str(base), "--overwrite")
            for precision in ("fp32", "bf16"):
                rows.append(run(base, seed, precision, out))
                print(rows[-1], flush=True)
                out.mkdir(parents=True, exist_ok=True)
                (out / "bf16.json").write_text(json.dumps(rows, indent=1))
    command = " ".join(["python", "benchmarks/bf16_runs.py", "--seeds", *map(str, args.seeds)])
    splice_doc(ROOT / "docs" / "precision.md", "bf16_runs", markdown(rows, command))
    print("wrote docs/precision.md")


if __name__ == "__main__":
    main()
