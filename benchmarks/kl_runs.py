"""KL penalties side by side on the embedded task: gold reward against exact KL to the reference.

For each seed the tiny pipeline runs up to the reward model (`rlhf pipeline --seed N --stop-after
reward`), then PPO runs once per KL configuration from that seed's SFT policy and reward model,
with the same seed: only the penalty differs. Each run's held-out gold reward and exact KL to the
reference (`eval/kl_to_ref`, the full-vocabulary KL summed over a response) after training go into
docs/kl.md, with a plot of the reward–KL frontier.

    python benchmarks/kl_runs.py --seeds 0 1 2 3 4 --out runs/kl
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from doc_runs import DEMO_SIZES, ROOT, rlhf, save_figure, splice_doc

CONFIGS = {  # label -> (kl_estimator, kl_penalty)
    "k1 in the reward (default)": ("k1", "reward"),
    "exact in both": ("exact", "both"),
    "k3 in the loss (GRPO's)": ("k3", "loss"),
}


def run(seeds: list[int], out: Path, extra: list[str]) -> list[dict]:
    rows = []
    for seed in seeds:
        base = out / f"seed{seed}"
        if not (base / "reward").is_dir():
            rlhf("pipeline", "--seed", str(seed), "--stop-after", "reward", "--output-dir", str(base), "--overwrite")
        for label, (estimator, penalty) in CONFIGS.items():
            run_dir = base / f"ppo_{estimator}_{penalty}"
            t0 = time.time()
            rlhf("ppo", "--policy", str(base / "sft"), "--reward", str(base / "reward"), "--seed", str(seed), *DEMO_SIZES,
                 "--ppo.kl_estimator", estimator, "--ppo.kl_penalty", penalty, "--output-dir", str(run_dir),
                 "--overwrite", *extra)
            ppo = json.loads((run_dir / "summary.json").read_text())["ppo"]
            rows.append({"seed": seed, "config": label, "gold_before": ppo["gold_reward_before"],
                         "gold_after": ppo["gold_reward_after"], "kl": ppo["kl_to_ref"], "wall_s": time.time() - t0})
            print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (label, marker) in zip(CONFIGS, "os^"):
        pts = [r for r in rows if r["config"] == label]
        ax.scatter([r["kl"] for r in pts], [r["gold_after"] for r in pts], marker=marker, label=label, s=42)
        ax.scatter([statistics.mean(r["kl"] for r in pts)], [statistics.mean(r["gold_after"] for r in pts)],
                   marker=marker, s=160, facecolors="none", edgecolors="black")
    before = statistics.mean(r["gold_before"] for r in rows)
    ax.axhline(before, color="gray", lw=0.8, ls="--", label=f"SFT policies (mean {before:+.3f})")
    ax.set_xlabel("exact KL to the reference after PPO (nats per response)")
    ax.set_ylabel("held-out gold reward after PPO")
    ax.set_title("Reward–KL frontier: one point per seed, circled: the mean")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def markdown(rows: list[dict], command: str) -> str:
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Command: `{command}` (about {sum(r['wall_s'] for r in rows) / 60:.0f} min of PPO on one CPU core).", "",
             "| penalty | gold reward after PPO (mean ± sd over seeds) | exact KL to ref | per seed: gold / KL |",
             "|---|---|---|---|"]
    for label in CONFIGS:
        pts = [r for r in rows if r["config"] == label]
        gold, kl = [r["gold_after"] for r in pts], [r["kl"] for r in pts]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        per_seed = ", ".join(f"{r['seed']}: {r['gold_after']:+.3f} / {r['kl']:.2f}" for r in pts)
        lines.append(f"| {label} | {statistics.mean(gold):+.3f} ± {sd(gold):.3f} | {statistics.mean(kl):.2f} ± "
                     f"{sd(kl):.2f} | {per_seed} |")
    befores = ", ".join(f"{s}: {next(r['gold_before'] for r in rows if r['seed'] == s):+.3f}" for s in seeds)
    lines += ["", f"Gold reward of the SFT policies (before PPO), per seed: {befores}.", "",
              "![Reward–KL frontier](img/kl_frontier.png)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="runs/kl")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "kl.md"))
    ap.add_argument("--from-json", help="re-render docs/kl.md and the plot from a kl_runs.json, without running")
    ap.add_argument("extra", nargs="*", help="extra flags for `rlhf ppo` (after --)")
    args = ap.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        rows = run(args.seeds, Path(args.out), args.extra)
        (Path(args.out) / "kl_runs.json").write_text(json.dumps(rows, indent=1))
    plot(rows, ROOT / "docs" / "img" / "kl_frontier.png")
    command = " ".join(["python", "benchmarks/kl_runs.py", "--seeds", *map(str, args.seeds), *args.extra])
    splice_doc(args.doc, "kl_runs", markdown(rows, command))
    print(f"wrote {args.doc} and docs/img/kl_frontier.png")


if __name__ == "__main__":
    main()
