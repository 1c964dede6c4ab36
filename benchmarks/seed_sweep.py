"""Run the whole pipeline on several seeds and tabulate PPO's gold-reward gain (docs/seed_sweep.md).

    python benchmarks/seed_sweep.py --seeds 0 1 2 3 4 --out runs/sweep

A seed passes when PPO raises the held-out gold reward over the SFT policy
(ppo.gold_reward_after > ppo.gold_reward_before) with ppo.kl_to_ref below --kl-bound.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_seed(seed: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "rlhf_core", "pipeline", "--output-dir", str(out / f"seed{seed}"),
           "--seed", str(seed), "--overwrite", *extra]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.loads((out / f"seed{seed}" / "summary.json").read_text())
    summary["_wall"] = time.time() - t0
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--kl-bound", type=float, default=5.0, help="max mean sequence KL to the reference")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "seed_sweep.md"))
    ap.add_argument("extra", nargs="*", help="extra flags for `rlhf pipeline` (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    rows, passed = [], 0
    for seed in args.seeds:
        s = run_seed(seed, out, args.extra)
        ppo = s["ppo"]
        ok = ppo["gold_reward_after"] > ppo["gold_reward_before"] and ppo["kl_to_ref"] < args.kl_bound
        passed += ok
        rows.append(f"| {seed} | {s['pretrain']['eval_perplexity_before']:.1f} → {s['pretrain']['eval_perplexity']:.2f} "
                    f"| {s['reward']['eval_accuracy']:.3f} | {ppo['gold_reward_before']:+.3f} | {ppo['gold_reward_after']:+.3f} "
                    f"| {ppo['kl_to_ref']:.3f} | {ppo['episodes_per_s']:.1f} | {s['_wall']:.0f} | {'yes' if ok else 'no'} |")
        print(rows[-1], flush=True)
    cmd = " ".join(["python", "benchmarks/seed_sweep.py", "--seeds", *map(str, args.seeds), *args.extra])
    text = "\n".join([
        "# Seed sweep: does PPO beat the SFT policy on the held-out gold reward?", "",
        f"Command: `{cmd}` (each seed runs `rlhf pipeline --preset tiny --seed N` end to end).",
        f"Machine: {platform.processor() or platform.machine()}, CPU only. A seed passes when the gold reward "
        f"after PPO exceeds the SFT policy's and the mean sequence KL to the reference is below {args.kl_bound}.", "",
        "| seed | pretrain perplexity | RM accuracy vs gold | gold before (SFT) | gold after (PPO) | KL to ref | episodes/s | wall s | pass |",
        "|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"**{passed} of {len(args.seeds)} seeds pass.**", ""])
    doc = Path(args.doc)
    old = doc.read_text(encoding="utf-8") if doc.exists() else ""
    notes = old[old.index("\n## ") + 1:] if "\n## " in old else ""  # hand-written sections below the table stay
    doc.write_text(text + ("\n" + notes if notes else ""), encoding="utf-8")
    print(f"{passed}/{len(args.seeds)} seeds pass; wrote {args.doc}")


if __name__ == "__main__":
    main()
