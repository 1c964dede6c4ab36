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


def test_fast_activations_swaps_gpt2_gelu_for_the_same_function():
    import math

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.activations import GELUTanh, NewGELUActivation

    from rlhf_core.models import fast_activations
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=3, n_head=4, n_positions=32)).eval()
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        before = model(ids).logits
    assert fast_activations(model, None, "not a module") == 3  # one per block; non-modules ignored
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert sum(isinstance(m, GELUTanh) for m in model.modules()) == 3
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    naive = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))  # gelu_new
    assert torch.allclose(GELUTanh()(x.float()).double(), naive, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5)
    assert fast_activations(build_tiny_llama()) == 0  # SiLU models are left alone


def build_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32))
