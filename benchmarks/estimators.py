"""Advantage estimators side by side: gae, grpo, dr_grpo, rloo and reinforce_pp on the same budget.

1. The embedded task (tiny preset), 5 seeds: for each seed the pipeline runs up to the reward model
   (`rlhf pipeline --seed N --stop-after reward`), then `rlhf ppo` once per estimator from that seed's
   SFT policy and reward model, with the same seed and the same number of episodes (100 iterations
   x 32); the group estimators sample 4 responses per prompt (8 prompts per iteration), the others one
   per prompt (32 prompts). Everything else is the default config: only the estimator (and, for
   dr_grpo, its paper's loss normalizer) differs; gae's critic is the pipeline's (a separate value
   model initialized from the reward model, presets/tiny.py).
2. The SmolLM2 preset with a verifiable reward (`benchmarks/verifiable_reward.py:exact_answer`: 1 for a
   correct answer, else 0), one seed, from the preset's SFT policy (LoRA PPO, 20 iterations x 16
   episodes; groups of 4). Needs `make real`.

Each run's held-out gold reward (and, for SmolLM2, accuracy), exact KL to the reference, wall time and
learning curve go into docs/estimators.md and docs/img/estimators.png.

    python benchmarks/estimators.py --out runs/estimators             # both parts, ~30 + ~35 min
    python benchmarks/estimators.py --skip-smollm2 --seeds 0 1        # the tiny part only
    python benchmarks/estimators.py --from-json runs/estimators/estimators.json   # re-render the doc
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from doc_runs import DEMO_SIZES, ROOT, rlhf, save_figure, smollm2_setup, splice_doc

ESTIMATORS = {  # name -> extra `rlhf ppo` flags
    "gae": ["--ppo.value_model", "separate", "--ppo.value_init_from_reward", "true"],  # the pipeline's critic
    "grpo": ["--ppo.group_size", "4"],
    "dr_grpo": ["--ppo.group_size", "4", "--ppo.loss_aggregation", "seq-mean-token-sum-norm"],
    "rloo": ["--ppo.group_size", "4"],
    "reinforce_pp": [],
}


def curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(iteration, value) of an evaluation metric in a run's metrics.jsonl (iteration 0: before PPO)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if r.get("phase") == "ppo" and key in r]


def tiny_runs(seeds: list[int], out: Path, extra: list[str]) -> list[dict]:
    rows = []
    for seed in seeds:
        base = out / "tiny" / f"seed{seed}"
        if not (base / "reward").is_dir():
            rlhf("pipeline", "--seed", str(seed), "--stop-after", "reward", "--output-dir", str(base), "--overwrite")
        for name, flags in ESTIMATORS.items():
            run_dir = base / f"ppo_{name}"
            t0 = time.time()
            rlhf("ppo", "--policy", str(base / "sft"), "--reward", str(base / "reward"), "--seed", str(seed), *DEMO_SIZES,
                 "--ppo.advantage_estimator", name, *flags, "--output-dir", str(run_dir), "--overwrite", *extra)
            ppo = json.loads((run_dir / "summary.json").read_text())["ppo"]
            rows.append({"task": "tiny", "seed": seed, "estimator": name, "gold_before": ppo["gold_reward_before"],
                         "gold_after": ppo["gold_reward_after"], "kl": ppo["kl_to_ref"], "wall_s": time.time() - t0,
                         "curve": curve(run_dir, "eval/gold_reward")})
            print({k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
    return rows


def smollm2_runs(out: Path, sft: Path | None, iterations: int, seed: int = 0) -> list[dict]:
    """PPO from the smollm2 preset's SFT policy with the exact-answer reward, in this process (the
    `rlhf ppo` command evaluates on the embedded task; this runs the phase with the preset's task)."""
    from rlhf_core.phases import ppo as phase
    from rlhf_core.tracking import MetricsLogger

    base = out / "smollm2"
    sft, cfg, task = smollm2_setup(out, sft, seed)
    rows = []
    for name, flags in ESTIMATORS.items():
        extra = dict(zip([f.removeprefix("--ppo.") for f in flags[::2]], flags[1::2])) if name != "gae" else {}
        ppo_cfg = dataclasses.replace(
            cfg.ppo, policy=str(sft), reward=f"{ROOT / 'benchmarks' / 'verifiable_reward.py'}:exact_answer",
            advantage_estimator=name, num_iterations=iterations, eval_every=10, seed=seed,
            group_size=int(extra.get("group_size", 1)), loss_aggregation=extra.get("loss_aggregation", "token-mean"))
        run_dir = base / f"ppo_{name}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        t0 = time.time()
        summary = phase.run(ppo_cfg, run_dir / "ppo", MetricsLogger(run_dir / "metrics.jsonl", echo=False), task=task)
        rows.append({"task": "smollm2", "seed": seed, "estimator": name, "gold_before": summary["gold_reward_before"],
                     "gold_after": summary["gold_reward_after"], "kl": summary["kl_to_ref"],
                     "accuracy_before": summary.get("correct_before"), "accuracy_after": summary.get("correct_after"),
                     "iterations": iterations, "wall_s": time.time() - t0, "curve": curve(run_dir, "eval/gold_reward")})
        print({k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = [t for t in ("tiny", "smollm2") if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name in ESTIMATORS:
            runs = [r["curve"] for r in rows if r["task"] == task and r["estimator"] == name]
            if not runs:
                continue
            steps = [s for s, _ in runs[0]]
            mean = [statistics.mean(dict(c)[s] for c in runs) for s in steps]
            ax.plot(steps, mean, marker="o", ms=3, label=name)
        ax.set_title({"tiny": "embedded task (mean over seeds)", "smollm2": "SmolLM2, exact-answer reward"}[task])
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel("held-out gold reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def markdown(rows: list[dict], command: str) -> str:
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    lines = [f"Command: `{command}`.", ""]
    tiny = [r for r in rows if r["task"] == "tiny"]
    if tiny:
        seeds = sorted({r["seed"] for r in tiny})
        lines += [f"**Embedded task**, seeds {', '.join(map(str, seeds))} (mean ± sd over seeds; 3200 episodes each):",
                  "", "| estimator | gold reward after PPO | median | exact KL to ref (nats) | wall time per run (s) | "
                      "per seed: gold / KL |", "|---|---|---|---|---|---|"]
        for name in ESTIMATORS:
            pts = [r for r in tiny if r["estimator"] == name]
            if not pts:
                continue
            gold, kl, wall = [r["gold_after"] for r in pts], [r["kl"] for r in pts], [r["wall_s"] for r in pts]
            per_seed = ", ".join(f"{r['seed']}: {r['gold_after']:+.3f} / {r['kl']:.2f}" for r in pts)
            lines.append(f"| {name} | {statistics.mean(gold):+.3f} ± {sd(gold):.3f} | {statistics.median(gold):+.3f} | "
                         f"{statistics.mean(kl):.2f} ± "
                         f"{sd(kl):.2f} | {statistics.mean(wall):.0f} | {per_seed} |")
        before = statistics.mean(r["gold_before"] for r in tiny if r["estimator"] == "gae")
        lines += ["", f"Gold reward of the SFT policies before PPO: {before:+.3f} (mean over seeds).", ""]
    small = [r for r in rows if r["task"] == "smollm2"]
    if small:
        lines += [f"**SmolLM2-135M, exact-answer reward**, seed {small[0]['seed']}, {small[0]['iterations']} iterations x 16 "
                  "episodes (LoRA):", "", "| estimator | held-out accuracy before → after | gold reward before → after "
                  "| exact KL to ref | wall time (s) |", "|---|---|---|---|---|"]
        for r in small:
            lines.append(f"| {r['estimator']} | {r['accuracy_before']:.3f} → {r['accuracy_after']:.3f} | "
                         f"{r['gold_before']:+.3f} → {r['gold_after']:+.3f} | {r['kl']:.2f} | {r['wall_s']:.0f} |")
        lines.append("")
    lines.append("![Learning curves](img/estimators.png)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="runs/estimators")
    ap.add_argument("--smollm2-sft", type=Path, help="an SFT policy of the smollm2 preset (default: train one)")
    ap.add_argument("--smollm2-iterations", type=int, default=20)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "estimators.md"))
    ap.add_argument("--from-json", nargs="+", help="re-render the doc and the plot from estimators.json files")
    ap.add_argument("extra", nargs="*", help="extra flags for the tiny part's `rlhf ppo` (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(Path(f).read_text())]
    else:
        rows = [] if args.skip_tiny else tiny_runs(args.seeds, out, args.extra)
        rows += [] if args.skip_smollm2 else smollm2_runs(out, args.smollm2_sft, args.smollm2_iterations)
        out.mkdir(parents=True, exist_ok=True)
        (out / "estimators.json").write_text(json.dumps(rows, indent=1))
    plot(rows, ROOT / "docs" / "img" / "estimators.png")
    command = " ".join(["python", "benchmarks/estimators.py", "--seeds", *map(str, args.seeds), *args.extra])
    splice_doc(args.doc, "estimators", markdown(rows, command))
    print(f"wrote {args.doc} and docs/img/estimators.png")


if __name__ == "__main__":
    main()
