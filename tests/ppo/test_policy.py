"""PolicyWithValue / response_logprobs against a naive float64 full-logits implementation."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_core.ppo.policy import PolicyWithValue, ValueHead, position_ids_for, response_logprobs

V, H = 97, 32


def tiny_lm(seed: int = 0, **kw) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, tie_word_embeddings=False, **kw)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    query_ids = torch.randint(3, V, (3, 5), generator=g)  # (B, Lq)
    query_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    query_ids = query_ids * query_mask  # left pads are 0
    response_ids = torch.randint(3, V, (3, 4), generator=g)  # (B, T)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    return query_ids, query_mask, response_ids * mask, mask


def naive_logprobs(model, query_ids, query_mask, response_ids, mask, temperature=1.0):
    """float64 log_softmax over the full [B, L, V] logits, gathered at the response tokens."""
    m64 = copy.deepcopy(model).double()
    ids = torch.cat([query_ids, response_ids], 1)
    attn = torch.cat([query_mask, mask], 1)
    logits = m64(input_ids=ids, attention_mask=attn, position_ids=position_ids_for(attn)).logits  # (B, L, V)
    lq, t = query_ids.shape[1], response_ids.shape[1]
    logp = (logits[:, lq - 1: lq - 1 + t] / temperature).log_softmax(-1)  # (B, T, V)
    lp = logp.gather(-1, response_ids[..., None]).squeeze(-1) * mask
    ent = -(logp.exp() * logp).sum(-1) * mask
    return lp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_naive_float64(temperature):
    model = tiny_lm()
    policy = PolicyWithValue(model)
    q, qm, r, m = batch()
    lp, values, ent = response_logprobs(policy, q, qm, r, m, temperature, "torch", with_values=True,
                                        with_entropy=True)
    ref_lp, ref_ent = naive_logprobs(model, q, qm, r, m, temperature)
    assert lp.shape == values.shape == ent.shape == (3, 4)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)
    assert (lp[m == 0] == 0).all() and (values[m == 0] == 0).all()


def test_no_full_logits_are_computed():
    model = tiny_lm()
    policy = PolicyWithValue(model)

    def forbid(*_):
        raise AssertionError("lm_head forward builds [B, L, V] logits")
    model.lm_head.register_forward_hook(forbid)
    response_logprobs(policy, *batch(), with_values=True)


def test_left_padded_batch_equals_unpadded_singles():
    model = tiny_lm()
    policy = PolicyWithValue(model)
    q, qm, r, m = batch()
    lp, values, _ = response_logprobs(policy, q, qm, r, m, with_values=True)
    for i in range(3):
        keep = qm[i].bool()
        single_lp, single_v, _ = response_logprobs(policy, q[i:i + 1, keep], qm[i:i + 1, keep],
                                                   r[i:i + 1], m[i:i + 1], with_values=True)
        torch.testing.assert_close(lp[i:i + 1], single_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(values[i:i + 1], single_v, atol=1e-5, rtol=0)


def test_lora_reference_is_adapter_disabled_base_without_copy():
    from peft import LoraConfig, get_peft_model
    model = tiny_lm()
    base = copy.deepcopy(model)
    # init_lora_weights=False: B != 0, so the adapted policy really differs from the base.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    policy = PolicyWithValue(peft_model)
    q, qm, r, m = batch()
    lp, _, _ = response_logprobs(policy, q, qm, r, m)
    with policy.reference() as ref:
        ref_lp, _, _ = response_logprobs(ref, q, qm, r, m)
        assert ref.lm_head_weight.data_ptr() == policy.lm_head_weight.data_ptr()
    base_lp, _, _ = response_logprobs(PolicyWithValue(base), q, qm, r, m)
    torch.testing.assert_close(ref_lp, base_lp, atol=1e-6, rtol=0)
    assert (lp - ref_lp).abs().max() > 1e-3  # the adapters are active outside the context
    assert policy.ref_model is None
    n_base = sum(p.numel() for p in base.parameters())
    n_policy = sum(p.numel() for p in policy.parameters())
    assert n_policy < 1.2 * n_base  # adapters + value head only: no second copy of the weights
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert all(id(p) not in trainable for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_full_reference_is_frozen_copy_and_not_trained():
    policy = PolicyWithValue(tiny_lm())
    assert policy.ref_model is not None and not any(p.requires_grad for p in policy.ref_model.parameters())
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert not any(id(p) in trainable for p in policy.ref_model.parameters())
    with torch.no_grad():
        policy.model.lm_head.weight.add_(1.0)
    with policy.reference() as ref:
        assert not torch.equal(ref.lm_head_weight, policy.lm_head_weight)


def test_separate_value_model_has_own_trunk():
    policy = PolicyWithValue(tiny_lm(), value_model="separate")
    q, qm, r, m = batch()
    _, values, _ = response_logprobs(policy, q, qm, r, m, with_values=True)
    values.sum().backward()
    assert policy.value_trunk.embed_tokens.weight.grad is not None
    assert policy.model.model.embed_tokens.weight.grad is None  # value loss does not touch the policy


def test_value_head_small_init_and_policy_stays_in_eval():
    head = ValueHead(64)
    assert head.summary.weight.abs().max() < 0.1 and head.summary.bias.abs().max() == 0
    policy = PolicyWithValue(tiny_lm(attention_dropout=0.5))
    policy.train()
    assert not policy.training and not policy.model.training


def test_lora_on_the_output_layer_is_refused():
    """The fused logprob reads the LM head's weight directly; a LoRA adapter on it would be ignored, so
    PolicyWithValue refuses it with one line."""
    from peft import LoraConfig, get_peft_model

    from rlhf_core.errors import ConfigError
    model = get_peft_model(tiny_lm(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ConfigError, match="LoRA on the output layer is not supported") as err:
        PolicyWithValue(model)
    assert "\n" not in str(err.value)
