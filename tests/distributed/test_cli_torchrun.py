"""`torchrun --nproc_per_node 2 -m rlhf_core.cli sft` on tiny sizes: it runs, rank 0 alone writes the
run folder, and the result matches the same command in one process (same global batch)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from rlhf_core.config import TaskConfig, TinyModelConfig
    from rlhf_core.data.task import generate_task
    from rlhf_core.data.tokenizer import train_tokenizer
    from rlhf_core.models import build_tiny_model
    out = tmp_path_factory.mktemp("tiny") / "model"
    task = generate_task(TaskConfig(n_corpus=200, n_sft=1, n_preferences=1), seed=0)
    tokenizer = train_tokenizer(task.corpus, vocab_size=320)
    model = build_tiny_model(tokenizer, TinyModelConfig(vocab_size=320, hidden_size=32, num_layers=1, num_heads=2,
                                                        intermediate_size=64, max_position_embeddings=128), seed=0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def rlhf(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RLHF_NUM_THREADS": "1",
           "RLHF_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] if nproc > 1 else ["-m"]
    proc = subprocess.run([sys.executable, *launcher, "rlhf_core.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_sft_two_ranks_matches_one_process(tiny_model, tmp_path):
    common = ["sft", "--model", str(tiny_model), "--sft.max_steps", "3", "--sft.batch_size", "8",
              "--sft.log_every", "1", "--sft.max_length", "64", "--sft.learning_rate", "1e-3"]
    rlhf([*common, "--output-dir", str(tmp_path / "two")], nproc=2)
    rlhf([*common, "--output-dir", str(tmp_path / "one")], nproc=1)
    two, one = (json.loads((tmp_path / d / "summary.json").read_text())["sft"] for d in ("two", "one"))
    assert two["steps"] == one["steps"] == 3
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    # rank 0 alone wrote: one metrics line per logged step, not one per rank
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if "loss/train" in r]
    assert train_steps == [1, 2, 3]
    from safetensors.torch import load_file
    w2, w1 = (load_file(tmp_path / d / "sft" / "model.safetensors") for d in ("two", "one"))
    for name, ref in w1.items():
        torch.testing.assert_close(w2[name], ref, rtol=0, atol=1e-5, msg=name)


def test_torchrun_ppo_two_ranks_runs_and_rank0_alone_writes(tiny_model, tmp_path):
    """Rollouts split 4 + 4 over 2 ranks; advantages whitened over all 8; one metrics line per
    iteration, one checkpoint, one saved policy. (Not compared with one process: each rank samples
    with its own seed, so the trajectories differ by design.)"""
    out = tmp_path / "ppo2"
    rlhf(["ppo", "--policy", str(tiny_model), "--reward", "gold", "--output-dir", str(out),
          "--ppo.num_iterations", "2", "--ppo.batch_size", "8", "--ppo.num_mini_batches", "2",
          "--ppo.ppo_epochs", "1", "--ppo.response_length", "8", "--ppo.save_every", "0"], nproc=2)
    summary = json.loads((out / "summary.json").read_text())["ppo"]
    assert summary["skipped_steps"] == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss/policy" in r] == [1, 2]
    assert (out / "ppo" / "value_head.safetensors").exists()
    assert len(list((out / "checkpoints" / "ppo").iterdir())) == 1
