"""Shared pieces of the reliability tests: a tiny saved policy/base model and a CLI runner.

Subprocesses run with one torch thread and no progress bars, so two runs of the same command
do the same float operations in the same order (bitwise-equal weights on CPU).
"""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from rlhf_core.config import TinyModelConfig

TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
ROOT = Path(__file__).resolve().parents[2]


def cli_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", RLHF_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_core", *args]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m rlhf_core ARGS`` to completion; stdout/stderr captured as text."""
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, env=cli_env(), cwd=cwd,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init tiny causal LM + its locally trained tokenizer, saved as an HF folder."""
    from rlhf_core.testing import tiny_setup
    tok, model, _ = tiny_setup(n_prompts=8, n_eval_prompts=8, model_cfg=TINY)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def start_cli(*args: str) -> subprocess.Popen:
    """``python -m rlhf_core ARGS`` in the background (stderr kept for failure messages)."""
    return subprocess.Popen(cli_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env())


@pytest.fixture(scope="session")
def cli():
    """The CLI runners as a fixture (test files cannot import each other under importlib mode)."""
    return types.SimpleNamespace(run=run_cli, start=start_cli)


@pytest.fixture(scope="session")
def tiny_parts():
    """(tokenizer, task) of the tiny setup, built once (the tokenizer trains in about a second)."""
    from rlhf_core.testing import tiny_setup
    tok, _, task = tiny_setup(n_prompts=16, n_eval_prompts=4, model_cfg=TINY)
    return tok, task


@pytest.fixture
def make_trainer(tiny_parts):
    """``make_trainer(loss_fn=None, **ppo_fields)``: a seeded in-process PPOTrainer on a tiny model."""
    import torch

    from rlhf_core.config import PPOConfig
    from rlhf_core.models import build_tiny_model
    from rlhf_core.ppo.policy import PolicyWithValue
    from rlhf_core.ppo.trainer import PPOTrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def make(loss_fn=None, **fields):
        tok, task = tiny_parts
        torch.manual_seed(0)
        policy = PolicyWithValue(build_tiny_model(tok, TINY, 0))
        cfg = dict(batch_size=4, num_mini_batches=2, ppo_epochs=1, response_length=4, num_iterations=3,
                   learning_rate=1e-3, eval_every=0, save_every=1)
        cfg.update(fields)
        reward = lambda p, r: [x.count("e") / max(len(x), 1) for x in r]  # noqa: E731
        return PPOTrainer(PPOConfig(**cfg), policy, tok, reward, task.prompts, loss_fn=loss_fn)

    yield make
    torch.set_num_threads(threads)
