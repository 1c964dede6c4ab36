"""Fixtures for tests, examples and benchmarks: a tiny random-init policy on the movie-review task.

Everything is offline and takes about a second: the tokenizer is trained on a slice of the task's
corpus, the model is built from a config. Not used by the training code itself.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .config import TaskConfig, TinyModelConfig
from .data import movie_reviews
from .data.tokenizer import train_tokenizer
from .models import build_tiny_model


def tiny_setup(seed: int = 0, n_prompts: int = 64, n_eval_prompts: int = 64,
               model_cfg: TinyModelConfig | None = None) -> tuple[Any, nn.Module, movie_reviews.MovieReviewTask]:
    """A random-init tiny policy for tests and examples: (tokenizer, model, task), all offline.

    The tokenizer is trained on a 400-document slice of the task corpus (under a second).
    """
    task = movie_reviews.generate_task(TaskConfig(n_corpus=400, n_sft=1, n_preferences=1, n_prompts=n_prompts,
                                                  n_eval_prompts=n_eval_prompts), seed=seed)
    tokenizer = train_tokenizer(task.corpus, vocab_size=512)
    return tokenizer, build_tiny_model(tokenizer, model_cfg or TinyModelConfig(), seed), task
