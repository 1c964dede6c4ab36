"""Side-by-side CPU benchmark of rlhf_core's PPO against TRL 1.12's (``trl.experimental.ppo``).

Method (docs/benchmarks.md explains each choice):
1. per scale, one seed builds the tokenizer and the policy / reward / value weights, saved once;
   every run loads those same folders (the reference is the policy folder loaded again);
2. rows run alternately — TRL, ours in TRL's structure, ours best; TRL, ... — ``--repeats``
   times, each in a fresh subprocess, so peak RSS is per run and no run warms another's caches;
3. per row: medians of episodes/s, tokens/s, CPU seconds per episode, phase times, peak RSS,
   and the ratios ours/TRL of those medians;
4. learning curves: both trainers from the same briefly supervised tiny policy, rewarded by the
   embedded task's gold judge, same prompts and seed; mean gold score per rollout batch.
Writes ``<out>.json`` (every run, raw), ``<out>.md`` (tables) and ``<out>.png`` (curves).

    python benchmarks/bench_ppo_vs_trl.py                      # the full CPU run
    python benchmarks/bench_ppo_vs_trl.py --scales tiny --repeats 1 --curve-iterations 0   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from common import HParams, cpu_name  # noqa: E402
from harness import OpProfile  # noqa: E402

ROWS = ("trl", "ours-trl-structure", "ours-best")
# Per-scale overrides of HParams: the 10M model gets fewer iterations to keep the CPU run ≲ 10 min;
# the GPU scales roll out 64 episodes of up to 64 tokens per iteration.
GPU_HP = {"iterations": 4, "batch_size": 64, "num_mini_batches": 4, "response_length": 64}
SCALE_HP = {"tiny": {"iterations": 4}, "gpt2-10m": {"iterations": 2}, "llama-8m": {"iterations": 2},
            "llama-30m": {"iterations": 2},
            "pythia-160m": GPU_HP, "pythia-410m": GPU_HP, "pythia-1b": GPU_HP,
            "neox-tiny": {"iterations": 1, "batch_size": 4, "response_length": 6}}
DEFAULT_SCALES = {"cpu": "tiny,gpt2-10m", "cuda": "pythia-160m,pythia-410m,pythia-1b"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both trainers run")
    p.add_argument("--dtype", default="", choices=("", "fp32", "bf16"),
                   help="weights and compute of every model in both trainers (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--scales", default="", help="comma-separated, of: " + ", ".join(SCALE_HP)
                   + " (default: " + "; ".join(f"{d}: {v}" for d, v in DEFAULT_SCALES.items()) + ")")
    p.add_argument("--iterations", type=int, default=0, help="PPO iterations per run (0: the per-scale default)")
    p.add_argument("--batch-size", type=int, default=0, help="episodes per iteration (0: the per-scale default)")
    p.add_argument("--response-length", type=int, default=0, help="max new tokens (0: the per-scale default)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of every row (>= 3 for medians)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per run (1: on a shared 2-core VM, 2 threads spin-wait)")
    p.add_argument("--curve-iterations", type=int, default=-1,
                   help="PPO iterations per learning curve (0: skip; default 12 on cpu, 0 on cuda)")
    p.add_argument("--curve-seeds", default="0,1,2", help="comma-separated seeds for the learning curves")
    p.add_argument("--warm-steps", type=int, default=300, help="supervised steps before the learning curves")
    p.add_argument("--profile-scale", default=None,
                   help="scale of the op-profiled runs ('' to skip; default gpt2-10m on cpu, none on cuda)")
    p.add_argument("--out", default="", help="output path stem (default benchmarks/results/ppo_vs_trl_<device>)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: one run, JSON to --result
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker:  # fill the per-device defaults
        args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
        args.scales = args.scales or DEFAULT_SCALES[args.device]
        if args.curve_iterations < 0:
            args.curve_iterations = 12 if args.device == "cpu" else 0
        if args.profile_scale is None:
            args.profile_scale = "gpt2-10m" if args.device == "cpu" else ""
        args.out = args.out or str(HERE / "results" / f"ppo_vs_trl_{args.device}")
    return args


def scale_hparams(scale: str, args: argparse.Namespace, **extra) -> "HParams":
    """The run's HParams: defaults, the scale's overrides, then device, dtype, --iterations, --batch-size, --response-length."""
    hp = {**SCALE_HP[scale], "device": args.device, "dtype": args.dtype, **extra}
    for key in ("iterations", "batch_size", "response_length"):
        if getattr(args, key) > 0:
            hp[key] = getattr(args, key)
    return HParams(**hp)


# ----------------------------------------------------------------------------------------------
# Worker: one run in this (fresh) process
# ----------------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec)
    if spec["hp"].get("device") == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_ppo_vs_trl: --device cuda but torch.cuda.is_available() is False")
    hp = HParams(**spec["hp"])
    prof = None
    if spec.get("profile") and args.worker == "trl":
        from trl.experimental.ppo import PPOTrainer as trl_ppo
        prof = OpProfile(trl_ppo, "train")
    elif spec.get("profile"):
        from rlhf_core.ppo.trainer import PPOTrainer
        prof = OpProfile(PPOTrainer, "step")
    cpu0 = time.process_time()
    if args.worker == "trl":
        from trl_runner import run_trl
        rec = run_trl(spec["paths"], hp, spec["scale"], "trl", spec["reward"], spec.get("prompts"))
    else:
        from ours_runner import run_ours
        rec = run_ours(spec["paths"], hp, spec["scale"], args.worker, spec["reward"], spec.get("prompts"))
    rec["process_cpu_s"] = time.process_time() - cpu0  # includes model loading; see cpu_s_train
    if prof is not None:
        rec["profile"] = prof.summary()
    Path(args.result).write_text(json.dumps(rec))


def spawn(row: str, spec: dict, threads: int) -> dict:
    return harness.spawn(str(Path(__file__).resolve()), row, spec, threads)


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------
def throughput(args: argparse.Namespace, work: Path) -> tuple[list[dict], dict]:
    from common import n_params, prepare_artifacts
    runs, sizes = [], {}
    for scale in [s for s in args.scales.split(",") if s]:
        paths = prepare_artifacts(scale, work / scale)
        sizes[scale] = n_params(paths["policy"])
        spec = {"paths": paths, "scale": scale, "reward": "model", "hp": scale_hparams(scale, args).to_dict()}
        for r in range(args.repeats):
            for row in ROWS:  # A B C A B C ...: slow drifts of the machine hit every row alike
                runs.append({**spawn(row, spec, args.threads), "repeat": r})
    return runs, sizes


def profiles(args: argparse.Namespace, work: Path) -> list[dict]:
    """One extra op-profiled run of TRL and of ours-best (profiling slows runs: not in the timings)."""
    from common import prepare_artifacts
    scale = args.profile_scale
    paths = prepare_artifacts(scale, work / f"profile-{scale}")
    spec = {"paths": paths, "scale": scale, "reward": "model", "profile": True,
            "hp": scale_hparams(scale, args).to_dict()}
    return [spawn(row, spec, args.threads) for row in ("trl", "ours-best")]


def curves(args: argparse.Namespace, work: Path) -> list[dict]:
    import torch
    from common import prepare_artifacts, task_prompts, warm_start_policy
    torch.set_num_threads(args.threads)
    iterations, seeds = args.curve_iterations, [int(s) for s in args.curve_seeds.split(",")]
    out = []
    base = prepare_artifacts("tiny", work / "curve-init")
    state = warm_start_policy(base["policy"], base["tokenizer"], args.warm_steps)
    paths = prepare_artifacts("tiny", work / "curve", policy_state=state)
    # Learning-rate and epochs large enough to move a tiny policy in a dozen iterations.
    hp = dict(iterations=iterations, lr=3e-4, ppo_epochs=4, temperature=1.0, response_length=20)
    for seed in seeds:
        prompts = task_prompts(iterations * HParams().batch_size, seed)[0]
        spec = {"paths": paths, "scale": "tiny", "reward": "gold", "prompts": prompts,
                "hp": HParams(**hp, seed=seed, device=args.device, dtype=args.dtype).to_dict()}
        for row in ("trl", "ours-best"):
            out.append(spawn(row, spec, args.threads))
    return out


def summarize(runs: list[dict]) -> dict:
    """Medians per (scale, row) and ratios ours/TRL of the medians."""
    return harness.summarize(runs, ROWS, "trl")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv or sys.argv[1:]))
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"throughput on {args.device} ({args.dtype}): {args.scales}, {args.repeats} repeats, "
              f"{args.threads} thread(s)", flush=True)
        runs, sizes = throughput(args, work)
        profile_runs = profiles(args, work) if args.profile_scale else []
        curve_runs = []
        if args.curve_iterations > 0:
            print("learning curves (gold reward)", flush=True)
            curve_runs = curves(args, work)
    import torch
    import transformers
    import trl
    report = {
        "command": command, "device_kind": args.device, "dtype": args.dtype, "threads_per_run": args.threads,
        "device": (torch.cuda.get_device_name() + f" (host: {cpu_name()})") if args.device == "cuda" else cpu_name(),
        "loadavg_1min_start": load0[0], "loadavg_1min_end": os.getloadavg()[0],
        "total_wall_s": time.perf_counter() - t0,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__},
        "policy_params": sizes, "hparams": {s: scale_hparams(s, args).to_dict() for s in sizes},
        "summary": summarize(runs), "runs": runs, "curves": curve_runs,
        "profiles": [{"row": r["row"], "scale": r["scale"], "wall_s": r["wall_s"], **r["profile"]}
                     for r in profile_runs],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    from report_ppo_vs_trl import write_markdown, write_plot
    write_markdown(report, out.with_suffix(".md"))
    if curve_runs:
        write_plot(curve_runs, out.with_suffix(".png"))
    print(f"wrote {out}.json/.md{'/.png' if curve_runs else ''} in {report['total_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
