"""The tiny byte-level BPE tokenizer: special ids, no auto specials, chat template, save/load."""
import time

import pytest
from transformers import AutoTokenizer

from rlhf_core.config import TaskConfig
from rlhf_core.data.movie_reviews import generate_task
from rlhf_core.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def task():
    return generate_task(TaskConfig(n_corpus=3000, n_sft=50), seed=0)


@pytest.fixture(scope="module")
def tok(task):
    return train_tokenizer(task.corpus, vocab_size=512)


def test_trains_fast_to_requested_size(task):
    start = time.perf_counter()
    tok = train_tokenizer(task.corpus, vocab_size=512)
    assert time.perf_counter() - start < 2.0
    assert len(tok) == 512


def test_special_tokens_fixed_and_distinct(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.padding_side == "right" and tok.model_max_length == 256


def test_encode_adds_no_specials_and_decodes_exactly(tok, task):
    for r in task.sft[:20]:
        text = r["prompt"] + r["completion"]
        ids = tok(text)["input_ids"]
        assert not {0, 1, 2} & set(ids)
        assert tok.decode(ids) == text
    # any unicode survives (byte-level: no unknown token)
    assert tok.decode(tok("naïve 🎬 ü")["input_ids"]) == "naïve 🎬 ü"


def test_task_words_are_compact(tok, task):
    words = sum(len(r["completion"].split()) for r in task.sft)
    tokens = sum(len(tok(r["completion"])["input_ids"]) for r in task.sft)
    assert tokens / words < 1.6  # ~1 token per word plus punctuation


def test_right_padding_uses_pad(tok):
    batch = tok(["the plot was good.", "bad."], padding=True)
    assert batch["input_ids"][1][-1] == 0 and batch["attention_mask"][1][-1] == 0


def test_chat_template_renders(tok):
    msgs = [{"role": "user", "content": "Review of The Red Sea:"},
            {"role": "assistant", "content": "the plot was good."}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert full == "User: Review of The Red Sea:\nAssistant: the plot was good.</s>\n"
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen == "User: Review of The Red Sea:\nAssistant:" and full.startswith(gen)


def test_save_and_reload_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "I watched The Lost Road and the music was lovely."
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.pad_token, again.eos_token, again.bos_token) == ("<pad>", "</s>", "<s>")
    assert again.pad_token_id != again.eos_token_id
    assert again.padding_side == "right" and again.chat_template == tok.chat_template


def test_rejects_too_small_vocab(task):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(task.corpus[:10], vocab_size=100)
