"""Generation time, torch engine (rollout.generate) vs the vLLM engine (rlhf_core/ppo/vllm_engine.py), fp32 and bf16.

    .venv-vllm/bin/python benchmarks/rollout_engines.py            # every scale: minutes on one CPU thread
    .venv-vllm/bin/python benchmarks/rollout_engines.py --scales tiny --prompts 8 --tokens 8   # seconds

Each row runs in its own process (one vLLM engine per process, as in training) under the same interpreter
(.venv-vllm: transformers 5.19), with ``--threads`` torch threads for both engines. The timed call is one
``generate`` of ``--prompts`` prompts × ``--tokens`` new tokens after one untimed warm-up call; EOS is disabled
(id −1) so both engines make exactly prompts × tokens tokens. bf16: this engine under ``torch.autocast`` (as the
trainer runs ``--ppo.mixed_precision bf16``), vLLM with ``dtype=bfloat16`` weights. Scales: ``tiny`` is the tiny
preset's shape with 2 heads (vLLM's CPU attention has no kernel for its head size 16), ``llama-8m`` /
``llama-30m`` the GRPO benchmark's Llamas (benchmarks/common.py), ``smollm2`` SmolLM2-135M-Instruct (make real).
Results: benchmarks/results/rollout_engines_cpu.{json,md}.

    .venv-vllm/bin/python benchmarks/rollout_engines.py --demo 0,1,2   # the demo with each engine: ~15 min

runs ``rlhf pipeline --preset tiny --model.num_heads 2`` with ``--ppo.rollout_engine torch`` and ``vllm`` per
seed and writes benchmarks/results/rollout_engines_demo.json (gold reward before/after, KL, wall time).

    .venv-vllm/bin/python benchmarks/rollout_engines.py --iteration   # whole PPO iterations, split by phase

times whole PPO iterations per scale, dtype and engine (a fresh process each): ``PPOTrainer.step()`` on
``--prompts`` prompts with ``--ppo-tokens`` response tokens (EOS enabled, as in training), a value head on the
shared trunk, one epoch of 2 minibatches, a Python reward; one warm-up iteration, then ``--iterations`` timed ones,
split by the trainer's own clocks into weight sync, generate, score (π_old, values, reference, reward: with vLLM
π_old is a full policy forward, the torch engine reads it from its sampling loop) and update.
Results: benchmarks/results/rollout_engines_iteration_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"


def load(scale: str, work: Path, n: int) -> tuple[torch.nn.Module, object, list[str]]:
    """(model, tokenizer, n prompts) of a scale; random weights except smollm2."""
    from transformers import AutoModelForCausalLM
    if scale == "tiny":
        from rlhf_core.config import TinyModelConfig
        from rlhf_core.testing import tiny_setup
        tok, model, task = tiny_setup(n_prompts=max(n, 8), model_cfg=TinyModelConfig(num_heads=2))
        return model, tok, task.prompts[:n]
    if scale == "smollm2":
        from rlhf_core.config import TaskConfig
        from rlhf_core.data.short_questions import generate_task
        from rlhf_core.models import load_tokenizer
        from rlhf_core.weights import convert_smollm2
        folder = str(convert_smollm2())
        tok = load_tokenizer(folder)
        prompts = generate_task(TaskConfig(), seed=0, tokenizer=tok).prompts
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tok, (prompts * n)[:n]
    from common import prepare_artifacts, task_prompts
    from rlhf_core.models import load_tokenizer
    paths = prepare_artifacts(scale, work / scale)
    return (AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32),
            load_tokenizer(paths["tokenizer"]), task_prompts(n)[0])


def one(scale: str, dtype: str, engine: str, prompts: int, tokens: int, threads: int, work: Path,
        device: str = "cpu") -> dict:
    """Time one engine's generation; runs in a fresh process."""
    from rlhf_core.config import PPOConfig
    from rlhf_core.ppo.policy import CausalLMView
    from rlhf_core.ppo.rollout import encode_prompts, generate
    torch.set_num_threads(threads)
    model, tok, texts = load(scale, work, prompts)
    model.eval().to(device)
    cfg = PPOConfig(response_length=tokens, max_prompt_length=64, temperature=1.0,
                    mixed_precision="bf16" if dtype == "bf16" else "no", seed=0, vllm_compile=engine == "vllm-compile")
    query_ids, query_mask = encode_prompts(tok, texts, cfg.max_prompt_length, torch.device(device))
    rec = {"scale": scale, "dtype": dtype, "engine": engine, "prompts": prompts, "tokens": tokens, "threads": threads,
           "params": sum(p.numel() for p in model.parameters()), "device": device}
    if engine.startswith("vllm"):
        from rlhf_core.ppo.vllm_engine import VLLMEngine
        eng = VLLMEngine(model, cfg, eos_token_id=-1, pad_token_id=tok.pad_token_id, device=device)
        rec["startup_s"], rec["sync_s"] = eng.startup_seconds, eng.sync(model)
        run = lambda q, m: eng.generate(q, m, torch.Generator().manual_seed(0))[:2]  # noqa: E731
    else:
        view, ctx = CausalLMView(model), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")

        def run(q, m):
            with ctx:
                return generate(view, q, m, tokens, 1.0, eos_token_id=-1, pad_token_id=tok.pad_token_id,
                                generator=torch.Generator().manual_seed(0))[:2]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run(query_ids[:2], query_mask[:2])  # warm-up: first-call allocations, oneDNN primitive creation
    sync()
    t0 = time.perf_counter()
    ids, mask = run(query_ids, query_mask)
    sync()
    rec["generate_s"] = time.perf_counter() - t0
    rec["new_tokens"] = int(mask.sum())
    rec["tokens_per_s"] = rec["new_tokens"] / rec["generate_s"]
    return rec


def iteration(scale: str, dtype: str, engine: str, prompts: int, tokens: int, threads: int, work: Path,
              iterations: int) -> dict:
    """Whole PPO iterations with one engine, split by phase (seconds per iteration, means); a fresh process."""
    from rlhf_core.config import PPOConfig
    from rlhf_core.ppo.policy import PolicyWithValue
    from rlhf_core.ppo.trainer import PPOTrainer
    torch.set_num_threads(threads)
    model, tok, texts = load(scale, work, prompts)
    cfg = PPOConfig(rollout_engine=engine, batch_size=prompts, num_mini_batches=2, ppo_epochs=1,
                    response_length=tokens, max_prompt_length=64, learning_rate=1e-6, eval_every=0,
                    num_iterations=iterations + 1, mixed_precision="bf16" if dtype == "bf16" else "no", seed=0,
                    num_threads=threads)
    trainer = PPOTrainer(cfg, PolicyWithValue(model), tok, lambda p, r: [x.count("e") / max(len(x), 1) for x in r],
                         texts * 2)
    trainer.step()  # warm-up: first-call allocations, oneDNN primitives, the engine's first sync
    runs = [trainer.step() for _ in range(iterations)]
    mean = lambda k: sum(m.get(k, 0.0) for m in runs) / len(runs)  # noqa: E731
    rec = {"scale": scale, "dtype": dtype, "engine": engine, "prompts": prompts, "tokens": tokens, "threads": threads,
           "iterations": iterations, "params": sum(p.numel() for p in model.parameters()),
           "sync_s": mean("time/weight_sync"), "generate_s": mean("time/generate"),
           "score_s": mean("time/score") - mean("time/weight_sync"),  # the trainer's time/score holds the sync
           "update_s": mean("time/update"), "response_tokens": mean("response/length")}
    rec["iteration_s"] = mean("time/rollout") + rec["update_s"]
    if engine == "vllm":
        rec["startup_s"] = trainer.engine.startup_seconds
    return rec


def iteration_table(rows: list[dict]) -> str:
    out = ["| scale | dtype | engine | tokens / response | weight sync (s) | generate (s) | score (s) | update (s) | "
           "iteration (s) | vs torch, same dtype |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {(r["scale"], r["dtype"]): r["iteration_s"] for r in rows if r["engine"] == "torch"}
    for r in rows:
        key = (r["scale"], r["dtype"])
        speed = f"{base[key] / r['iteration_s']:.2f}×" if key in base else "—"
        out.append(f"| {r['scale']} | {r['dtype']} | {r['engine']} | {r['response_tokens']:.1f} | {r['sync_s']:.3f} | "
                   f"{r['generate_s']:.2f} | "
                   f"{r['score_s']:.2f} | {r['update_s']:.2f} | {r['iteration_s']:.2f} | {speed} |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = ["| scale | params | dtype | engine | prompts × tokens | generate (s) | tokens/s | vs torch fp32 |",
           "|---|---:|---|---|---|---:|---:|---:|"]
    base = {r["scale"]: r["generate_s"] for r in rows if r["engine"] == "torch" and r["dtype"] == "fp32"}
    for r in rows:
        speed = f"{base[r['scale']] / r['generate_s']:.2f}×" if r["scale"] in base else "—"
        out.append(f"| {r['scale']} | {r['params'] / 1e6:.1f} M | {r['dtype']} | {r['engine']} | {r['prompts']} × "
                   f"{r['tokens']} | {r['generate_s']:.2f} | {r['tokens_per_s']:.0f} | {speed} |")
    return "\n".join(out)


def demo(seeds: list[int], work: Path) -> list[dict]:
    """The tiny demo (num_heads 2) per seed with each engine: what the gold reward does."""
    rows = []
    for seed in seeds:
        for engine in ("torch", "vllm"):
            out = work / f"demo-{engine}-{seed}"
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "rlhf_core", "pipeline", "--output-dir", str(out), "--overwrite",
                                "--preset", "tiny", "--model.num_heads", "2", "--seed", str(seed),
                                "--ppo.rollout_engine", engine], capture_output=True, text=True, cwd=ROOT)
            if r.returncode:
                raise SystemExit(f"demo {engine} seed {seed} failed:\n{r.stderr[-3000:]}")
            s = json.loads((out / "summary.json").read_text())["ppo"]
            rows.append({"seed": seed, "engine": engine, "wall_s": time.perf_counter() - t0,
                         **{k: s[k] for k in ("gold_reward_before", "gold_reward_after", "kl_to_ref", "wall_seconds",
                                              "episodes_per_s")}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", default="tiny,llama-8m,llama-30m,smollm2")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--engines", default="torch,vllm", help="torch, vllm (eager), vllm-compile (--ppo.vllm_compile)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="rounds over every row, each run a fresh process; the "
                                                          "median run is reported")
    p.add_argument("--work", default="/tmp/rlhf-rollout-engines")
    p.add_argument("--out", default=str(RESULTS / "rollout_engines_cpu"))
    p.add_argument("--demo", default="", help="seeds, e.g. 0,1,2: run the demo with each engine instead")
    p.add_argument("--device", default="cpu", help="cuda: the generation rows on a GPU (benchmarks/gpu_check.sh)")
    p.add_argument("--iteration", action="store_true", help="time whole PPO iterations split by phase instead")
    p.add_argument("--ppo-tokens", type=int, default=32, help="response_length of the --iteration runs")
    p.add_argument("--iterations", type=int, default=2, help="timed PPO iterations per --iteration row")
    p.add_argument("--one", nargs=3, metavar=("SCALE", "DTYPE", "ENGINE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.iteration and args.device != "cpu":
        raise SystemExit("--iteration times the CPU trainer only; on a GPU run the generation rows (--device cuda)")
    if args.one:
        if args.iteration:
            rec = iteration(*args.one, args.prompts, args.ppo_tokens, args.threads, Path(args.work), args.iterations)
        else:
            rec = one(*args.one, args.prompts, args.tokens, args.threads, Path(args.work), args.device)
        print("RESULT " + json.dumps(rec))
        return
    if args.demo:
        rows = demo([int(x) for x in args.demo.split(",")], Path(args.work))
        (RESULTS / "rollout_engines_demo.json").write_text(json.dumps(rows, indent=1))
        return
    render = iteration_table if args.iteration else table
    timed = "iteration_s" if args.iteration else "generate_s"
    runs: dict[tuple, list[dict]] = {}  # every row's runs; the rounds alternate the rows, so load hits all alike
    for _ in range(args.repeats):
        for key in ((s, d, e) for s in args.scales.split(",") for d in args.dtypes.split(",")
                    for e in args.engines.split(",")):
            scale, dtype, engine = key
            cmd = [sys.executable, __file__, "--one", scale, dtype, engine, "--prompts", str(args.prompts),
                   "--tokens", str(args.tokens), "--threads", str(args.threads), "--work", args.work,
                   "--ppo-tokens", str(args.ppo_tokens), "--iterations", str(args.iterations),
                   "--device", args.device,
                   *(["--iteration"] if args.iteration else [])]
            r = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode or not line:
                raise SystemExit(f"{scale} {dtype} {engine} failed:\n{r.stderr[-3000:]}")
            runs.setdefault(key, []).append(json.loads(line[0][7:]))
            print(render(runs[key][-1:]).splitlines()[-1], flush=True)
    rows = []
    for recs in runs.values():  # the median run of each row (the lower one of an even count), with every time
        rec = sorted(recs, key=lambda r: r[timed])[(len(recs) - 1) // 2]
        rows.append({**rec, "runs": len(recs), f"{timed}_all": [r[timed] for r in recs]})
    meta = {"cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"), "device": args.device,
            **({"gpu": torch.cuda.get_device_name()} if args.device == "cuda" else {}),
            "torch": torch.__version__, "command": " ".join(sys.argv)}
    out = args.out
    if out == p.get_default("out"):  # the default name says what ran: _iteration_cpu, _cuda
        out = out.replace("_cpu", "_iteration_cpu" if args.iteration else f"_{args.device}")
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    Path(out + ".md").write_text(f"{meta['cpu']}, torch {meta['torch']}, `{meta['command']}`\n\n{render(rows)}\n")
    print(render(rows))


if __name__ == "__main__":
    main()
