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


def one(scale: str, dtype: str, engine: str, prompts: int, tokens: int, threads: int, work: Path) -> dict:
    """Time one engine's generation; runs in a fresh process."""
    from rlhf_core.config import PPOConfig
    from rlhf_core.ppo.policy import CausalLMView
    from rlhf_core.ppo.rollout import encode_prompts, generate
    torch.set_num_threads(threads)
    model, tok, texts = load(scale, work, prompts)
    model.eval()
    cfg = PPOConfig(response_length=tokens, max_prompt_length=64, temperature=1.0,
                    mixed_precision="bf16" if dtype == "bf16" else "no", seed=0)
    query_ids, query_mask = encode_prompts(tok, texts, cfg.max_prompt_length)
    rec = {"scale": scale, "dtype": dtype, "engine": engine, "prompts": prompts, "tokens": tokens, "threads": threads,
           "params": sum(p.numel() for p in model.parameters())}
    if engine == "vllm":
        from rlhf_core.ppo.vllm_engine import VLLMEngine
        eng = VLLMEngine(model, cfg, eos_token_id=-1, pad_token_id=tok.pad_token_id)
        rec["startup_s"], rec["sync_s"] = eng.startup_seconds, eng.sync(model)
        run = lambda q, m: eng.generate(q, m, torch.Generator().manual_seed(0))[:2]  # noqa: E731
    else:
        view, ctx = CausalLMView(model), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

        def run(q, m):
            with ctx:
                return generate(view, q, m, tokens, 1.0, eos_token_id=-1, pad_token_id=tok.pad_token_id,
                                generator=torch.Generator().manual_seed(0))[:2]
    run(query_ids[:2], query_mask[:2])  # warm-up: first-call allocations, oneDNN primitive creation
    t0 = time.perf_counter()
    ids, mask = run(query_ids, query_mask)
    rec["generate_s"] = time.perf_counter() - t0
    rec["new_tokens"] = int(mask.sum())
    rec["tokens_per_s"] = rec["new_tokens"] / rec["generate_s"]
    return rec


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
    p.add_argument("--engines", default="torch,vllm")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/rlhf-rollout-engines")
    p.add_argument("--out", default=str(RESULTS / "rollout_engines_cpu"))
    p.add_argument("--demo", default="", help="seeds, e.g. 0,1,2: run the demo with each engine instead")
    p.add_argument("--one", nargs=3, metavar=("SCALE", "DTYPE", "ENGINE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(*args.one, args.prompts, args.tokens, args.threads, Path(args.work))))
        return
    if args.demo:
        rows = demo([int(x) for x in args.demo.split(",")], Path(args.work))
        (RESULTS / "rollout_engines_demo.json").write_text(json.dumps(rows, indent=1))
        return
    rows = []
    for scale in args.scales.split(","):
        for dtype in args.dtypes.split(","):
            for engine in args.engines.split(","):
                cmd = [sys.executable, __file__, "--one", scale, dtype, engine, "--prompts", str(args.prompts),
                       "--tokens", str(args.tokens), "--threads", str(args.threads), "--work", args.work]
                r = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode or not line:
                    raise SystemExit(f"{scale} {dtype} {engine} failed:\n{r.stderr[-3000:]}")
                rows.append(json.loads(line[0][7:]))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    meta = {"cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
            "torch": torch.__version__, "command": " ".join(sys.argv)}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    Path(args.out + ".md").write_text(f"{meta['cpu']}, torch {meta['torch']}, `{meta['command']}`\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
