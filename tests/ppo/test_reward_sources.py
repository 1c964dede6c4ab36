"""Reward sources: callables, 'gold', user files, reward-model folders; validation -> RewardError."""
import math

import pytest
import torch

from rlhf_core.config import PPOConfig, TinyModelConfig
from rlhf_core.data.movie_reviews import gold_reward
from rlhf_core.data.tokenizer import train_tokenizer
from rlhf_core.errors import ConfigError, RewardError
from rlhf_core.testing import tiny_setup
from rlhf_core.ppo.policy import PolicyWithValue
from rlhf_core.ppo.reward_sources import checked_reward, make_reward_fn
from rlhf_core.ppo.trainer import PPOTrainer

PROMPTS = ["Review of The Silent River:", "I watched The Iron Garden and"]
RESPONSES = [" the acting was great.", " it was boring and slow."]


def test_callable_and_gold():
    fn = lambda p, r: [1.0] * len(r)  # noqa: E731
    assert make_reward_fn(fn) is fn
    assert make_reward_fn("gold")(PROMPTS, RESPONSES) == gold_reward(PROMPTS, RESPONSES)


def test_user_file_function(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    assert make_reward_fn(f"{path}:length")(PROMPTS, RESPONSES) == [float(len(r)) for r in RESPONSES]
    with pytest.raises(ConfigError, match="no function 'nope'"):
        make_reward_fn(f"{path}:nope")
    with pytest.raises(ConfigError, match="not found"):
        make_reward_fn(f"{tmp_path}/missing.py:length")
    with pytest.raises(ConfigError):
        make_reward_fn(str(tmp_path / "not_a_model"))


def test_reward_model_folder_uses_its_own_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    # The reward model's tokenizer differs from the policy's (another vocabulary size and corpus).
    rm_tok = train_tokenizer(["the acting was great", "it was boring and slow"] * 20 + PROMPTS, vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(rm_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, num_labels=1, pad_token_id=rm_tok.pad_token_id)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    policy_tok = train_tokenizer(["completely different text"] * 10, vocab_size=270)
    scores = make_reward_fn(str(tmp_path / "rm"), policy_tok)(PROMPTS, RESPONSES)
    for p, r, s in zip(PROMPTS, RESPONSES, scores):
        ids = rm_tok(p + r + rm_tok.eos_token, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = rm(input_ids=ids).logits[0, 0].item()
        assert math.isclose(s, expected, rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (lambda p, r: 1 / 0, "batch 3: the reward raised ZeroDivisionError"),
    (lambda p, r: [float("nan")] * len(r), "batch 3: non-finite score nan for response 0"),
    (lambda p, r: [0.0, float("inf")], "batch 3: non-finite score inf for response 1"),
    (lambda p, r: [1.0], "batch 3: expected 2 scores, got 1"),
    (lambda p, r: None, "batch 3: expected a list of floats"),
])
def test_checked_reward_errors(bad, message):
    with pytest.raises(RewardError) as err:
        checked_reward(bad)(PROMPTS, RESPONSES, 3)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_checked_reward_accepts_tensors_and_numpy():
    import numpy as np
    out = checked_reward(lambda p, r: np.array([0.5, 1.5]))(PROMPTS, RESPONSES)
    assert out.dtype == torch.float32 and out.tolist() == [0.5, 1.5]


@pytest.mark.parametrize("bad", [lambda p, r: 1 / 0, lambda p, r: [float("nan")] * len(r), lambda p, r: []])
def test_bad_reward_leaves_weights_unchanged(bad):
    tok, model, task = tiny_setup(n_eval_prompts=4, model_cfg=TinyModelConfig(hidden_size=32, num_layers=1))
    policy = PolicyWithValue(model)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    cfg = PPOConfig(batch_size=4, num_mini_batches=1, response_length=4, num_iterations=1)
    trainer = PPOTrainer(cfg, policy, tok, bad, task.prompts)
    opt_state = trainer.optimizer.state_dict()
    with pytest.raises(RewardError, match="reward batch 1"):
        trainer.step()
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())
    assert trainer.optimizer.state_dict() == opt_state
