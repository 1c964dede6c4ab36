"""Policy losses side by side: ppo, clip-higher, dual_clip, gspo, cispo and sapo, with GRPO advantages,
with and without DAPO's dynamic sampling.

1. The embedded task (tiny preset), 5 seeds: for each seed the pipeline runs up to the reward model
   (`rlhf pipeline --seed N --stop-after reward`), then `rlhf ppo` once per loss from that seed's SFT
   policy and reward model: grpo advantages over groups of 4 (8 prompts x 4 samples per iteration), 100
   iterations, every other setting the default. The reward model's scores are continuous, so dynamic
   sampling has nothing to drop there: it is run once per seed with the ppo loss to show that (the run
   must equal the one without it).
2. The SmolLM2 preset with the verifiable exact-answer reward (`benchmarks/verifiable_reward.py`: 1 or 0),
   one seed, LoRA PPO from the preset's SFT policy, 20 iterations x 16 episodes (groups of 4), each loss
   with and without dynamic sampling (at most 4 generation rounds per iteration). Needs `make real`.

Each loss uses its paper's settings: clip-higher ε_high = 0.28 (DAPO); dual_clip c = 3 (Ye et al.); gspo
ε = 3e-4 / 4e-4 with the sequence-mean aggregation (Zheng et al.); cispo with no lower bound and ε_high 0.28
(MiniMax-M1); sapo τ = 1.0 / 1.05 (Gao et al.). Held-out gold reward (and for SmolLM2 the accuracy), exact
KL to the reference, policy entropy, response length and wall time go into docs/losses.md, the curves into
docs/img/losses.png.

    python benchmarks/losses.py --out runs/losses                       # both parts (~40 + ~90 min)
    python benchmarks/losses.py --skip-smollm2 --seeds 0 1              # the tiny part only
    python benchmarks/losses.py --from-json runs/losses/losses.json     # re-render the doc
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from doc_runs import DEMO_SIZES, ROOT, rlhf, save_figure, smollm2_setup, splice_doc
from estimators import curve

GRPO = ["--ppo.advantage_estimator", "grpo", "--ppo.group_size", "4"]
LOSSES = {  # name -> the `rlhf ppo` flags that select it (beyond GRPO)
    "ppo": [],
    "clip-higher": ["--ppo.clip_range_high", "0.28"],
    "dual_clip": ["--ppo.policy_loss", "dual_clip", "--ppo.dual_clip_c", "3"],
    "gspo": ["--ppo.policy_loss", "gspo", "--ppo.clip_range_low", "3e-4", "--ppo.clip_range_high", "4e-4",
             "--ppo.loss_aggregation", "seq-mean-token-mean"],
    "cispo": ["--ppo.policy_loss", "cispo", "--ppo.clip_range_low", "1", "--ppo.clip_range_high", "0.28"],
    "sapo": ["--ppo.policy_loss", "sapo"],
}
DYNAMIC = ["--ppo.dynamic_sampling", "true", "--ppo.dynamic_sampling_max_rounds", "4"]


def last_metrics(run_dir: Path) -> dict:
    """Means over the last 5 logged iterations of the training metrics the table shows."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("phase") == "ppo" and "policy/entropy" in r][-5:]
    keys = ("policy/entropy", "response/length", "dynamic/dropped_groups", "dynamic/rounds", "policy/clipfrac")
    return {k: statistics.mean(r[k] for r in train) for k in keys if all(k in r for r in train)}


def row(task: str, seed: int, loss: str, dynamic: bool, summary: dict, run_dir: Path, wall: float) -> dict:
    out = {"task": task, "seed": seed, "loss": loss, "dynamic": dynamic, "gold_before": summary["gold_reward_before"],
           "gold_after": summary["gold_reward_after"], "kl": summary["kl_to_ref"], "wall_s": wall,
           "accuracy_before": summary.get("correct_before"), "accuracy_after": summary.get("correct_after"),
           **last_metrics(run_dir), "curve": curve(run_dir, "eval/gold_reward")}
    print({k: v for k, v in out.items() if k != "curve"}, flush=True)
    return out


def record(out: Path, rows: list[dict], new: dict) -> None:
    """Append a finished run's row and rewrite OUT/losses.json, so a stopped benchmark keeps what it ran."""
    rows.append(new)
    out.mkdir(parents=True, exist_ok=True)
    (out / "losses.json").write_text(json.dumps(rows, indent=1))


def tiny_runs(seeds: list[int], out: Path, iterations: int, rows: list[dict]) -> list[dict]:
    for seed in seeds:
        base = out / "tiny" / f"seed{seed}"
        if not (base / "reward").is_dir():
            rlhf("pipeline", "--seed", str(seed), "--stop-after", "reward", "--output-dir", str(base), "--overwrite")
        plan = [(name, False) for name in LOSSES] + [("ppo", True)]
        for name, dynamic in plan:
            run_dir = base / f"ppo_{name}{'_ds' if dynamic else ''}"
            t0 = time.time()
            rlhf("ppo", "--policy", str(base / "sft"), "--reward", str(base / "reward"), "--seed", str(seed), *DEMO_SIZES,
                 "--ppo.num_iterations", str(iterations), *GRPO, *LOSSES[name], *(DYNAMIC if dynamic else []),
                 "--output-dir", str(run_dir), "--overwrite")
            summary = json.loads((run_dir / "summary.json").read_text())["ppo"]
            record(out, rows, row("tiny", seed, name, dynamic, summary, run_dir, time.time() - t0))
    return rows


def smollm2_runs(out: Path, sft: Path | None, iterations: int, rows: list[dict], dynamic_modes: tuple[bool, ...],
                 seed: int = 0) -> list[dict]:
    """PPO from the smollm2 preset's SFT policy with the exact-answer reward, in this process (the preset's
    task supplies the held-out questions and the gold judge)."""
    from rlhf_core.phases import ppo as phase
    from rlhf_core.tracking import MetricsLogger

    base = out / "smollm2"
    sft, cfg, task = smollm2_setup(out, sft, seed)
    for dynamic in dynamic_modes:
        for name, flags in LOSSES.items():
            flags = flags + (DYNAMIC if dynamic else [])
            fields = {f.removeprefix("--ppo."): v for f, v in zip(flags[::2], flags[1::2])}
            ppo_cfg = dataclasses.replace(
                cfg.ppo, policy=str(sft), reward=f"{ROOT / 'benchmarks' / 'verifiable_reward.py'}:exact_answer",
                advantage_estimator="grpo", group_size=4, num_iterations=iterations, eval_every=10, seed=seed)
            for key, value in fields.items():
                ppo_cfg = ppo_cfg.override(key, value, f"--ppo.{key}")
            run_dir = base / f"ppo_{name}{'_ds' if dynamic else ''}"
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            t0 = time.time()
            summary = phase.run(ppo_cfg, run_dir / "ppo", MetricsLogger(run_dir / "metrics.jsonl", echo=False),
                                task=task)
            record(out, rows, {**row("smollm2", seed, name, dynamic, summary, run_dir, time.time() - t0),
                               "iterations": iterations})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(t, d) for t, d in (("tiny", False), ("smollm2", False), ("smollm2", True))
              if any(r["task"] == t and r["dynamic"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.2), squeeze=False)
    for ax, (task, dynamic) in zip(axes[0], panels):
        for name in LOSSES:
            runs = [r["curve"] for r in rows if r["task"] == task and r["loss"] == name and r["dynamic"] == dynamic]
            if not runs:
                continue
            steps = [s for s, _ in runs[0]]
            ax.plot(steps, [statistics.mean(dict(c)[s] for c in runs) for s in steps], marker="o", ms=3, label=name)
        title = {"tiny": "embedded task (mean over seeds)", "smollm2": "SmolLM2, exact-answer reward"}[task]
        ax.set_title(title + (", dynamic sampling" if dynamic else ""), fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel("held-out gold reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _mean_sd(xs: list[float], fmt: str) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt[-3:]}}"


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`.", ""]
    tiny = [r for r in rows if r["task"] == "tiny"]
    if tiny:
        seeds = sorted({r["seed"] for r in tiny})
        lines += [f"**Embedded task** (reward model score), grpo advantages, groups of 4, seeds "
                  f"{', '.join(map(str, seeds))} (mean ± sd over seeds):", "",
                  "| loss | gold reward after PPO | exact KL to ref | entropy (last 5 it.) | response length | "
                  "wall time per run (s) | per seed: gold / KL |", "|---|---|---|---|---|---|---|"]
        for name, dynamic in [(n, False) for n in LOSSES] + [("ppo", True)]:
            pts = [r for r in tiny if r["loss"] == name and r["dynamic"] == dynamic]
            if not pts:
                continue
            per_seed = ", ".join(f"{r['seed']}: {r['gold_after']:+.3f} / {r['kl']:.2f}" for r in pts)
            label = name + (" + dynamic sampling" if dynamic else "")
            lines.append(f"| {label} | {_mean_sd([r['gold_after'] for r in pts], '+.3f')} | "
                         f"{_mean_sd([r['kl'] for r in pts], '.2f')} | "
                         f"{statistics.mean(r['policy/entropy'] for r in pts):.3f} | "
                         f"{statistics.mean(r['response/length'] for r in pts):.1f} | "
                         f"{statistics.mean(r['wall_s'] for r in pts):.0f} | {per_seed} |")
        ds = [r for r in tiny if r["dynamic"]]
        if ds:
            dropped = sum(r.get("dynamic/dropped_groups", 0.0) for r in ds)
            lines += ["", f"Dynamic sampling dropped {dropped:g} groups per iteration on average over these runs "
                          "(last 5 iterations): the reward model's scores are never all equal within a group."]
        before = statistics.mean(r["gold_before"] for r in tiny if r["loss"] == "ppo" and not r["dynamic"])
        lines += ["", f"Gold reward of the SFT policies before PPO: {before:+.3f} (mean over seeds).", ""]
    small = [r for r in rows if r["task"] == "smollm2"]
    if small:
        lines += [f"**SmolLM2-135M, exact-answer reward** (1 or 0), grpo advantages, groups of 4, seed "
                  f"{small[0]['seed']}, {small[0]['iterations']} iterations x 16 episodes (LoRA):", "",
                  "| loss | dynamic sampling | held-out accuracy before → after | gold reward before → after | "
                  "exact KL to ref | entropy (last 5 it.) | response length | groups dropped / iteration | "
                  "wall time (s) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in small:
            dropped = f"{r['dynamic/dropped_groups']:.1f} ({r['dynamic/rounds']:.1f} rounds)" if r["dynamic"] else "–"
            lines.append(f"| {r['loss']} | {'yes' if r['dynamic'] else 'no'} | {r['accuracy_before']:.3f} → "
                         f"{r['accuracy_after']:.3f} | {r['gold_before']:+.3f} → {r['gold_after']:+.3f} | "
                         f"{r['kl']:.2f} | {r['policy/entropy']:.3f} | {r['response/length']:.1f} | {dropped} | "
                         f"{r['wall_s']:.0f} |")
        lines.append("")
    lines.append("![Learning curves](img/losses.png)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="runs/losses")
    ap.add_argument("--tiny-iterations", type=int, default=100)
    ap.add_argument("--smollm2-sft", type=Path, help="an SFT policy of the smollm2 preset (default: train one)")
    ap.add_argument("--smollm2-iterations", type=int, default=20)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--smollm2-dynamic", choices=("no", "yes", "both"), default="both",
                    help="SmolLM2 runs without dynamic sampling, with it, or both (to split the part over processes)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "losses.md"))
    ap.add_argument("--from-json", nargs="+", help="re-render the doc and the plot from losses.json files")
    args = ap.parse_args()
    out = Path(args.out)
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(Path(f).read_text())]
    else:
        rows: list[dict] = []
        if not args.skip_tiny:
            tiny_runs(args.seeds, out, args.tiny_iterations, rows)
        if not args.skip_smollm2:
            modes = {"no": (False,), "yes": (True,), "both": (False, True)}[args.smollm2_dynamic]
            smollm2_runs(out, args.smollm2_sft, args.smollm2_iterations, rows, modes)
    plot(rows, ROOT / "docs" / "img" / "losses.png")
    command = " ".join(["python", "benchmarks/losses.py", "--seeds", *map(str, args.seeds)])
    splice_doc(args.doc, "losses", markdown(rows, command))
    print(f"wrote {args.doc} and docs/img/losses.png")


if __name__ == "__main__":
    main()
