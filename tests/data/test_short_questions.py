"""The short-question task (the smollm2 preset's) and its gold judge: pure Python, no weight packages."""
from rlhf_core.config import TaskConfig
from rlhf_core.data.short_questions import (STYLE_WEIGHTS, generate_task, gold_parts, gold_score, question_of,
                                            rm_prompt)

CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n")


def test_judge_prefers_correct_brief_polite():
    q = "What is 7 + 5?"
    best, plain, wrong, rude = (gold_score(q, r) for r in
                                ("Sure! 7 + 5 = 12.", "12.", "Sure! 7 + 5 = 13.", "Obviously, 7 + 5 = 12."))
    verbose = gold_score(q, "Let me explain this at great length, step by step, because thoroughness matters "
                            "so much to me: 7 + 5 = 12, and that is the final answer to your question.")
    assert best > plain > rude and plain > wrong and plain > verbose
    assert gold_score(q, "") == -1.0 and gold_score(q, "12") < gold_score(q, "12.")  # truncated text
    assert gold_parts(q, "Ugh. 12.")["rude"] == 1.0 and gold_parts(q, "To be thorough: 12.")["rude"] == 0.0


def test_question_found_in_chat_rm_and_plain_prompts():
    assert question_of(CHAT) == question_of(rm_prompt("What is 7 + 5?")) == "What is 7 + 5?"
    assert gold_parts(CHAT, "7 + 5 = 12.")["correct"] == 1.0
    assert gold_parts("What is the capital of Peru?", "It is Lima.")["correct"] == 1.0


def test_task_is_seeded_and_eval_questions_held_out():
    cfg = TaskConfig(n_sft=200, n_preferences=100, n_prompts=64, n_eval_prompts=24)
    a, b = generate_task(cfg, seed=3), generate_task(cfg, seed=3)
    assert a == b and a != generate_task(cfg, seed=4)
    held = set(a.eval_prompts)
    train = {r["prompt"] for r in a.sft} | set(a.prompts) | {question_of(r["prompt"]) for r in a.preferences}
    assert len(held) == 24 and not held & train
    # Preferences: mostly agree with the judge (10 % label noise), never a near-tie.
    agree = [gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in a.preferences]
    assert 0.75 < sum(agree) / len(agree) < 1.0
    # SFT mixes styles on purpose: the SFT policy has room to improve under the judge.
    assert abs(sum(STYLE_WEIGHTS.values()) - 1) < 1e-9
    assert 0.1 < sum(gold_score(r["prompt"], r["completion"]) for r in a.sft) / 200 < 0.6
