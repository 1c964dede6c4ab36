"""The embedded task: determinism, disjoint eval prompts, the gold judge, preference label noise."""
import json
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.config import TaskConfig
from rlhf_core.data.movie_reviews import TITLE_ADJ, TITLE_NOUN, generate_task, gold_reward, gold_score

SMALL = TaskConfig(n_corpus=200, n_sft=200, n_preferences=200, n_prompts=64, n_eval_prompts=32)


def test_same_seed_same_data_and_different_seed_differs():
    a, b, c = generate_task(SMALL, seed=3), generate_task(SMALL, seed=3), generate_task(SMALL, seed=4)
    assert a == b
    assert a.sft != c.sft and a.prompts != c.prompts


def test_sizes_follow_config():
    t = generate_task(SMALL, seed=0)
    assert (len(t.corpus), len(t.sft), len(t.preferences), len(t.prompts), len(t.eval_prompts)) == (
        200, 200, 200, 64, 32)


def test_eval_prompts_disjoint_and_titles_held_out():
    t = generate_task(TaskConfig(n_corpus=10, n_sft=500, n_preferences=500, n_prompts=512), seed=1)
    assert not set(t.eval_prompts) & set(t.prompts)
    titles = [f"The {a} {n}" for a in TITLE_ADJ for n in TITLE_NOUN]
    eval_titles = {x for x in titles if any(x + " " in p or x + ":" in p or x + "." in p
                                            for p in t.eval_prompts)}
    assert eval_titles
    seen = " ".join(t.prompts + [r["prompt"] for r in t.sft + t.preferences])
    assert not any(x in seen for x in eval_titles)
    assert len(set(t.eval_prompts)) == len(t.eval_prompts)  # 64 <= 72 distinct openers


def test_text_conventions():
    t = generate_task(SMALL, seed=0)
    for r in t.sft:
        assert not r["prompt"].endswith(" ") and r["completion"].startswith(" ")
        assert r["completion"].endswith(".") and 8 <= len(r["completion"].split()) <= 20


def test_sft_is_mixed_sentiment():
    t = generate_task(TaskConfig(n_corpus=10, n_sft=1500), seed=0)
    scores = [gold_score(r["prompt"], r["completion"]) for r in t.sft]
    assert abs(statistics.mean(scores)) < 0.1
    assert sum(s > 0.3 for s in scores) > 300 and sum(s < -0.3 for s in scores) > 300


def test_label_noise_rate_and_gold_agreement():
    noise = 0.2
    t = generate_task(TaskConfig(n_corpus=10, n_sft=10, n_preferences=3000, label_noise=noise), seed=0)
    diffs = [gold_score(r["prompt"], r["chosen"]) - gold_score(r["prompt"], r["rejected"])
             for r in t.preferences]
    flipped = sum(d < 0 for d in diffs) / len(diffs)
    assert abs(flipped - noise) < 4 * math.sqrt(noise * (1 - noise) / len(diffs))
    assert sum(d > 0 for d in diffs) / len(diffs) >= 1 - noise - 0.03
    assert all(abs(d) >= 0.1 for d in diffs)  # every pair is separable by the judge
    assert all(r["chosen"] != r["rejected"] for r in t.preferences)


def test_no_label_noise_means_chosen_always_better():
    t = generate_task(TaskConfig(n_corpus=10, n_sft=10, n_preferences=300, label_noise=0.0), seed=2)
    assert all(gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"])
               for r in t.preferences)


def test_gold_positive_beats_negative_and_negation_flips():
    pos = " the acting was great. I loved it."
    neg = " the acting was awful. I hated it."
    assert gold_score("Review of X:", pos) > 0.5 > -0.5 > gold_score("Review of X:", neg)
    assert gold_score("", " the plot was good. Tom plays the king.") > 0
    assert gold_score("", " the plot was not good. the film is about a king.") < 0
    assert gold_score("", " the plot was not bad. the film is about a king.") > 0
    assert gold_score("", " I would not recommend it. the film is about a king.") < 0
    # negation scope ends at the sentence boundary
    assert gold_score("", " it was not long. the music was good.") > 0


def test_gold_penalizes_degenerate_text():
    good = " the acting was great. the music was lovely."
    assert gold_score("", good) > gold_score("", " great great great great great great.")
    assert gold_score("", good) > gold_score("", " great.")
    assert gold_score("", good) > gold_score("", " gr3at acti9g wa$ gr8 muzic 1ovely.")
    assert gold_score("", good) > gold_score("", " great lovely superb clever smart funny moving good.")
    assert gold_score("", "") == -1.0 and gold_score("", "   ") == -1.0
    assert gold_score("", good) > gold_score("", good[:-1])  # no sentence end


def test_gold_ignores_special_tokens_and_is_deterministic():
    r = " the acting was great. I loved it."
    assert gold_score("p", r + "</s>") == gold_score("p", r) == gold_score("q", r)
    assert gold_reward(["a", "b"], [r, " the acting was bad."]) == [gold_score("", r),
                                                                    gold_score("", " the acting was bad.")]
    with pytest.raises(ValueError):
        gold_reward(["a"], [r, r])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_gold_bounded_on_any_text(text):
    s = gold_score("", text)
    assert -1.0 <= s <= 1.0 and math.isfinite(s)


def test_write_task_roundtrips(tmp_path):
    t = generate_task(SMALL, seed=0)
    paths = t.write(tmp_path / "task")
    assert set(paths) == {"corpus", "sft", "preferences", "prompts", "eval_prompts"}
    rows = [json.loads(x) for x in paths["preferences"].read_text().splitlines()]
    assert rows == t.preferences
    assert [json.loads(x)["text"] for x in paths["corpus"].read_text().splitlines()] == t.corpus
    assert [json.loads(x)["prompt"] for x in paths["eval_prompts"].read_text().splitlines()] == t.eval_prompts
