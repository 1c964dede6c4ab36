"""Conversational prompts (#15): TRL's {"prompt": [turns]} records rendered with the policy's chat
template, --ppo.chat_template for plain strings, and the reward model reading its own format."""
import json

import pytest

from rlhf_core.cli import main
from rlhf_core.data.loaders import load_records
from rlhf_core.errors import ConfigError, DataError
from rlhf_core.phases.ppo import render_prompts
from rlhf_core.ppo.reward_sources import chat_text_format

TURNS = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Review of The Red Moon:"}]


def jsonl(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_conversational_prompt_records_are_validated(tmp_path):
    good = jsonl(tmp_path / "p.jsonl", {"prompt": TURNS}, {"messages": TURNS[1:]}, {"prompt": "plain"})
    assert [r["prompt"] for r in load_records(good, "prompt")] == [TURNS, TURNS[1:], "plain"]
    bad = jsonl(tmp_path / "bad.jsonl", {"prompt": TURNS + [{"role": "assistant", "content": "ok"}]})
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'prompt\[2\].role': the last turn must be the user's"):
        load_records(bad, "prompt")
    worse = jsonl(tmp_path / "worse.jsonl", {"prompt": [{"role": "robot", "content": "x"}]})
    with pytest.raises(DataError, match=r"worse.jsonl:1: field 'prompt\[0\].role': expected one of system, user"):
        load_records(worse, "prompt")


def test_render_prompts_follows_the_template_and_the_mode(tiny_parts):
    tok, _ = tiny_parts
    conversations = {}
    out = render_prompts([TURNS, "plain"], tok, "auto", "p.jsonl", conversations)
    assert out == ["System: Be kind.\nUser: Review of The Red Moon:\nAssistant:", "plain"]
    assert conversations == {out[0]: TURNS}
    assert render_prompts(["plain"], tok, "always", "p.jsonl") == ["User: plain\nAssistant:"]
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'prompt': .*ppo.chat_template=never"):
        render_prompts(["plain", TURNS], tok, "never", "p.jsonl")
    bare = type("Bare", (), {"chat_template": None})()
    with pytest.raises(DataError, match="the policy's tokenizer has none"):
        render_prompts([TURNS], bare, "auto", "p.jsonl")
    with pytest.raises(ConfigError, match="ppo.chat_template=always: the policy's tokenizer has no chat template"):
        render_prompts(["plain"], bare, "always", "p.jsonl")


def test_the_reward_model_reads_conversations_in_its_own_format(tiny_parts):
    tok, _ = tiny_parts
    rendered = render_prompts([TURNS], tok, "auto", "p.jsonl")[0]
    fmt = chat_text_format({rendered: TURNS}, tok)
    prompts, responses = fmt([rendered, "other"], [" Great film.", " x"])
    assert prompts == ["System: Be kind.\nUser: Review of The Red Moon:\nAssistant:", "other"]
    assert responses == [f" Great film.{tok.eos_token}", " x"]  # the template's assistant turn
    plain_rm = type("NoTemplate", (), {"chat_template": None})()
    prompts, responses = chat_text_format({rendered: TURNS}, plain_rm)([rendered], [" Great film."])
    assert prompts == ["Be kind.\nReview of The Red Moon:\n"] and responses == [" Great film."]


def test_rlhf_ppo_trains_on_conversational_prompts(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "judge.py").write_text(
        "import json\n"
        "def score(prompts, responses):\n"
        f"    open({str(tmp_path / 'seen.jsonl')!r}, 'a').write(json.dumps(prompts) + '\\n')\n"
        "    return [0.0] * len(responses)\n")
    prompts = jsonl(tmp_path / "chat.jsonl", *({"prompt": [{"role": "user", "content": f"Question {i}?"}]}
                                               for i in range(40)))
    out = tmp_path / "run"
    assert main(["ppo", "--policy", str(tiny_model_dir), "--reward", f"{tmp_path / 'judge.py'}:score",
                 "--prompts", str(prompts), "--output-dir", str(out), "--ppo.num_iterations", "1",
                 "--ppo.batch_size", "4", "--ppo.num_mini_batches", "1", "--ppo.response_length", "4"]) == 0
    seen = [p for line in (tmp_path / "seen.jsonl").read_text().splitlines() for p in json.loads(line)]
    assert seen and all(p.startswith("User: Question ") and p.endswith("?\nAssistant:") for p in seen)


def test_a_reward_model_folder_gets_the_conversation_in_its_own_template(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    from rlhf_core.ppo import reward_sources
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    seen = []

    def spy(model, tokenizer, prompts, responses, *a, **k):
        seen.extend(zip(prompts, responses))
        return torch.zeros(len(prompts))
    monkeypatch.setattr(reward_sources, "reward_scores", spy)
    prompts = jsonl(tmp_path / "chat.jsonl", *({"prompt": [{"role": "user", "content": f"Question {i}?"}]}
                                               for i in range(40)))
    assert main(["ppo", "--policy", str(tiny_model_dir), "--reward", str(tmp_path / "rm"), "--prompts", str(prompts),
                 "--output-dir", str(tmp_path / "run"), "--ppo.num_iterations", "1", "--ppo.batch_size", "4",
                 "--ppo.num_mini_batches", "1", "--ppo.response_length", "4"]) == 0
    assert seen and all(p.startswith("User: Question ") and p.endswith("?\nAssistant:") for p, _ in seen)
    assert all(r.endswith(tok.eos_token) for _, r in seen)  # the template's assistant turn, EOS included


def test_conversational_preferences_train_the_reward_model_in_its_template(tiny_model_dir, tmp_path, capsys):
    """The reward phase reads TRL's conversational preferences and renders them with the reward model's
    chat template, the layout PPO scores (chat_pair): the same text for the same conversation."""
    from transformers import AutoTokenizer
    from rlhf_core.phases.reward_model import render_preference
    from rlhf_core.ppo.reward_sources import chat_pair
    records = [{"prompt": TURNS, "chosen": [{"role": "assistant", "content": f"Great film {i}."}],
                "rejected": [{"role": "assistant", "content": f"Dull {i}."}]} for i in range(12)]
    data = jsonl(tmp_path / "prefs.jsonl", *records)
    loaded = load_records(data, "preference")
    assert loaded[0] == {"prompt": TURNS, "chosen": "Great film 0.", "rejected": "Dull 0."}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = render_preference(loaded[0], tok)
    assert (text["prompt"], text["chosen"]) == chat_pair(tok, TURNS, "Great film 0.")
    assert text["prompt"].endswith("User: Review of The Red Moon:\nAssistant:") and text["chosen"].endswith(tok.eos_token)
    implicit = jsonl(tmp_path / "implicit.jsonl",
                     {"chosen": TURNS + [{"role": "assistant", "content": "Great film."}],
                      "rejected": TURNS + [{"role": "assistant", "content": "Dull."}]},
                     {"chosen": TURNS + [{"role": "assistant", "content": "Great."}],
                      "rejected": [TURNS[1], {"role": "assistant", "content": "Dull."}]})
    with pytest.raises(DataError, match=r"implicit.jsonl:2: field 'rejected': chosen and rejected must be the same"):
        load_records(implicit, "preference")
    implicit.write_text(implicit.read_text().splitlines()[0] + "\n")
    assert load_records(implicit, "preference") == [{"prompt": TURNS, "chosen": "Great film.", "rejected": "Dull."}]
    out = tmp_path / "run"
    assert main(["reward", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                 "--reward.max_steps", "2", "--reward.batch_size", "4"]) == 0
    assert json.loads((out / "summary.json").read_text())["reward"]["steps"] == 2
