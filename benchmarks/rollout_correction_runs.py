"""The rollout/trainer gap measured on the demo's PPO, with and without a rollout correction (docs/rollout.md).

The demo's SFT policy and reward model (docs/data/demo), its PPO settings and seed; under bf16 autocast the
sampling loop (one token at a time through the KV cache) and the trainer's forward (the whole response at
once) round differently, so the sampler μ and the trainer's π_old differ — a real engine mismatch, small.
Each run logs, every iteration, ``check/logprob_gap`` (mean |log μ − log π_old|), ``check/logprob_gap_max`` and
the correction's weights (``correction/*``). Without a correction π_old *is* the sampler's logprobs and the gap
is measured at the first update step instead (sampler against the update's first forward).

    python benchmarks/rollout_correction_runs.py            # ~2 min a run on one CPU core
    python benchmarks/rollout_correction_runs.py --from-json benchmarks/results/rollout_correction_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bf16_runs import DEMO_PPO
from doc_runs import ROOT, rlhf, splice_doc

DEMO = ROOT / "docs" / "data" / "demo"
# (precision, correction, level, C): fp32 and bf16 without a correction, then each correction under bf16 at its
# defaults (C = 2, icepop [0.5, 5]), and tis / mis with a C tight enough to act on this small gap.
RUNS = [("fp32", "none", "token", 2.0), ("bf16", "none", "token", 2.0), ("bf16", "tis", "token", 2.0),
        ("bf16", "tis", "sequence", 2.0), ("bf16", "mis", "token", 2.0), ("bf16", "icepop", "token", 2.0),
        ("bf16", "tis", "token", 1.02), ("bf16", "mis", "token", 1.02)]
RESULTS = ROOT / "benchmarks" / "results" / "rollout_correction_cpu.json"


def run(precision: str, correction: str, level: str, threshold: float, out: Path, seed: int = 0) -> dict:
    run_dir = out / f"{precision}_{correction}_{level}_{threshold:g}"
    t0 = time.time()
    rlhf("ppo", "--policy", str(DEMO / "sft"), "--reward", str(DEMO / "reward"), "--seed", str(seed), *DEMO_PPO,
         "--ppo.mixed_precision", "bf16" if precision == "bf16" else "no", "--ppo.rollout_correction", correction,
         "--ppo.rollout_correction_level", level, "--ppo.rollout_correction_threshold", str(threshold),
         "--output-dir", str(run_dir), "--overwrite")
    summary = json.loads((run_dir / "summary.json").read_text())["ppo"]
    train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r.get("phase") == "ppo" and "check/logprob_gap" in r]
    mean = lambda k: statistics.mean(r[k] for r in train) if k in train[0] else None  # noqa: E731
    top = lambda k: max(r[k] for r in train) if k in train[0] else None  # noqa: E731
    return {"precision": precision, "correction": correction, "level": level, "threshold": threshold, "seed": seed,
            "iterations": len(train), "gold_before": summary["gold_reward_before"],
            "gold_after": summary["gold_reward_after"], "kl": summary["kl_to_ref"],
            "episodes_per_s": summary["episodes_per_s"], "wall_s": time.time() - t0,
            "logprob_gap": mean("check/logprob_gap"), "logprob_gap_max": top("check/logprob_gap_max"),
            "first_ratio_dev": top("check/first_ratio_dev"), "weight_mean": mean("correction/weight_mean"),
            "weight_max": top("correction/weight_max"),
            "ratio_min": min(r["correction/ratio_min"] for r in train) if "correction/ratio_min" in train[0] else None,
            "truncated": mean("correction/truncated_fraction"), "masked": mean("correction/masked_fraction")}


def markdown(rows: list[dict], command: str) -> str:
    fmt = lambda x, f: "—" if x is None else format(x, f)  # noqa: E731
    lines = [f"Command: `{command}` (seed 0, {rows[0]['iterations']} iterations x 32 episodes, one CPU core shared "
             "with other runs). Gap and weights: mean over iterations (max / min: over the run).", "",
             "| precision | correction | mean \\|log μ − log π_old\\| | max \\|log μ − log π_old\\| | IS weight mean | "
             "IS weight max | ratio min | truncated | masked | max \\|ρ − 1\\| at the first step | gold before → after "
             "| exact KL to ref | episodes/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        bound = "[0.5, 5]" if r["correction"] == "icepop" else f"C = {r.get('threshold', 2.0):g}"
        corr = "none" if r["correction"] == "none" else f"{r['correction']} ({r['level']}, {bound})"
        lines.append(f"| {r['precision']} | {corr} | {r['logprob_gap']:.2e} | {fmt(r['logprob_gap_max'], '.3f')} | "
                     f"{fmt(r['weight_mean'], '.4f')} | {fmt(r['weight_max'], '.3f')} | {fmt(r['ratio_min'], '.3f')} | "
                     f"{fmt(r['truncated'], '.2e')} | {fmt(r['masked'], '.2e')} | {r['first_ratio_dev']:.2e} | "
                     f"{r['gold_before']:+.3f} → {r['gold_after']:+.3f} | {r['kl']:.2f} | {r['episodes_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/rollout_correction")
    ap.add_argument("--from-json", help="re-render docs/rollout.md from a results file")
    args = ap.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []  # goes on where it stopped
        done = {(r["precision"], r["correction"], r["level"], r.get("threshold", 2.0)) for r in rows}
        for key in RUNS:
            if key in done:
                continue
            rows.append(run(*key, Path(args.out)))
            print(rows[-1], flush=True)
            RESULTS.write_text(json.dumps(rows, indent=1))
    splice_doc(ROOT / "docs" / "rollout.md", "rollout_correction_runs",
               markdown(rows, "python benchmarks/rollout_correction_runs.py"))
    print("wrote docs/rollout.md")


if __name__ == "__main__":
    main()
