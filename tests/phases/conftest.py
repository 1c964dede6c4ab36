"""Shared tiny fixtures: a small task, its tokenizer and one short pretraining run reused by every
phase test (random init, seconds on a 2-core CPU, nothing downloaded)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_core.config import PretrainConfig, TaskConfig, TinyModelConfig
from rlhf_core.data.movie_reviews import generate_task
from rlhf_core.tracking import MetricsLogger

TINY = TinyModelConfig(vocab_size=320, hidden_size=32, num_layers=1, num_heads=2,
                       intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny() -> TinyModelConfig:
    return TINY


@pytest.fixture(scope="session")
def task():
    return generate_task(TaskConfig(n_corpus=300, n_sft=96, n_preferences=120, n_prompts=8,
                                    n_eval_prompts=4), seed=0)


@pytest.fixture(scope="session")
def pretrained(task, tmp_path_factory):
    """(output folder, summary, logger) of a 40-step pretraining run on the tiny task."""
    out = tmp_path_factory.mktemp("pretrain") / "model"
    logger = MetricsLogger(None)
    from rlhf_core.phases import pretrain
    cfg = PretrainConfig(block_size=32, batch_size=16, max_steps=40, learning_rate=5e-3, log_every=10)
    summary = pretrain.run(cfg, out, logger, model_cfg=TINY, task=task)
    return Path(out), summary, logger
