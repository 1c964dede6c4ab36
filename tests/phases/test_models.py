"""models.py: one-line errors for missing folders, pad distinct from eos, tiny model shape."""
from __future__ import annotations

import pytest
import torch

from rlhf_core.errors import ConfigError
from rlhf_core.models import build_tiny_model, load_causal_lm, load_reward_model, load_tokenizer


@pytest.mark.parametrize("loader", [load_causal_lm, load_tokenizer, load_reward_model])
def test_missing_folder_is_one_line_config_error(loader, tmp_path):
    with pytest.raises(ConfigError) as err:
        loader(str(tmp_path / "no-such-model"))
    assert "no-such-model" in str(err.value) and "\n" not in str(err.value)


def test_folder_without_config_is_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load_causal_lm(str(tmp_path / "empty"))


def test_tokenizer_gets_pad_distinct_from_eos(pretrained, tmp_path):
    base, _, _ = pretrained
    tok = load_tokenizer(str(base))
    tok.pad_token = tok.eos_token  # the common "pad = eos" setup of released checkpoints
    tok.save_pretrained(tmp_path / "tok")
    fixed = load_tokenizer(str(tmp_path / "tok"))
    assert fixed.pad_token_id is not None and fixed.pad_token_id != fixed.eos_token_id
    assert fixed.padding_side == "right"


def test_tiny_model_is_llama_with_tokenizer_ids(pretrained, tiny):
    base, _, _ = pretrained
    tok = load_tokenizer(str(base))
    model = build_tiny_model(tok, tiny, seed=3)
    again = build_tiny_model(tok, tiny, seed=3)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.config.tie_word_embeddings
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id) == \
        (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    assert hasattr(model.model.layers[0].self_attn, "q_proj") and hasattr(model.model.layers[0].self_attn, "v_proj")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded init
