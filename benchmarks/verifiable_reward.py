"""A verifiable reward for the short-question task (the ``smollm2`` preset): 1.0 when the answer is
right, else 0.0 — the task's exact-answer check (``short_questions.gold_parts(...)["correct"]``), with
nothing about politeness or length. Used as ``--ppo.reward benchmarks/verifiable_reward.py:exact_answer``
by benchmarks/estimators.py.
"""
from rlhf_core.data.short_questions import gold_parts


def exact_answer(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 for a correct answer to the prompt's question, else 0.0."""
    return [gold_parts(p, r)["correct"] for p, r in zip(prompts, responses)]
