"""A PPO step through the fused logprob path equals the unfused (full [B, T, V] logits) path.

Loss and every gradient (trunk, LM head, value head) are compared for the torch reference and for
the Triton kernels (run by the interpreter on CPU), in float32 against a float64 unfused path.
"""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_core.config import PPOConfig
from rlhf_core.ppo.experience import Experience
from rlhf_core.ppo.policy import PolicyWithValue, position_ids_for, response_logprobs
from rlhf_core.ppo.trainer import ppo_loss

V, H, TEMP = 67, 16, 0.8


def tiny_policy(dtype=torch.float32) -> PolicyWithValue:
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32,
                      pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    policy = PolicyWithValue(LlamaForCausalLM(cfg).eval())
    return policy.to(dtype)


def minibatch() -> Experience:
    g = torch.Generator().manual_seed(3)
    query_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])  # (B, Lq) left-padded
    query_ids = torch.randint(2, V, (3, 4), generator=g) * query_mask
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])  # (B, T)
    response_ids = torch.randint(2, V, (3, 5), generator=g) * mask
    noise = lambda: torch.randn(3, 5, generator=g) * mask  # noqa: E731
    # Old logprobs far enough from the current ones that some ratios clip.
    return Experience(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, mask=mask,
                      logprobs=-4.0 + 0.3 * noise(), ref_logprobs=-4.0 + 0.3 * noise(), scores=torch.randn(3, generator=g),
                      values=0.1 * noise(), advantages=noise(), returns=noise())


def unfused(policy: PolicyWithValue, exp: Experience):
    """Full logits from the HF model (lm_head module included), log_softmax, gather."""
    ids = torch.cat([exp.query_ids, exp.response_ids], 1)  # (B, Lq+T)
    attn = torch.cat([exp.query_mask, exp.mask], 1)
    out = policy.model(input_ids=ids, attention_mask=attn, position_ids=position_ids_for(attn),
                       output_hidden_states=True)
    lq, t = exp.query_ids.shape[1], exp.response_ids.shape[1]
    logp = (out.logits[:, lq - 1: lq - 1 + t] / TEMP).log_softmax(-1)  # (B, T, V)
    lp = logp.gather(-1, exp.response_ids[..., None]).squeeze(-1) * exp.mask
    ent = -(logp.exp() * logp).sum(-1) * exp.mask
    values = policy.value_head(out.hidden_states[-1][:, lq - 1: lq - 1 + t]) * exp.mask
    return lp, values, ent


def loss_and_grads(policy: PolicyWithValue, exp: Experience, backend: str | None):
    cfg = PPOConfig(temperature=TEMP, ent_coef=0.01, clip_range=0.2, clip_range_value=0.2)
    policy.zero_grad(set_to_none=True)
    if backend is None:
        lp, values, ent = unfused(policy, exp)
    else:
        lp, values, ent = response_logprobs(policy, exp.query_ids, exp.query_mask, exp.response_ids, exp.mask,
                                            TEMP, backend, with_values=True, with_entropy=True)
    loss, stats = ppo_loss(logprobs=lp, values=values, entropy=ent, exp=exp, config=cfg)
    loss.backward()
    grads = {n: p.grad.double().clone() for n, p in policy.named_parameters() if p.grad is not None}
    return loss.double().item(), grads, stats


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ppo_step_fused_equals_unfused(backend):
    exp = minibatch()
    ref_policy = tiny_policy(torch.float64)
    exp64 = Experience(**{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                          for k, v in exp.__dict__.items()})
    ref_loss, ref_grads, ref_stats = loss_and_grads(ref_policy, exp64, None)
    assert 0 < float(ref_stats["policy/clipfrac"]) < 1, "the batch must exercise both clip branches"

    loss, grads, _ = loss_and_grads(tiny_policy(), exp, backend)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert set(grads) == set(ref_grads) and "model.lm_head.weight" in grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_unfused_path_builds_full_logits_but_fused_does_not():
    """The fused path never calls the LM head module (no [B, T, V] tensor)."""
    policy, exp = tiny_policy(), minibatch()
    calls = []
    hook = policy.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    response_logprobs(policy, exp.query_ids, exp.query_mask, exp.response_ids, exp.mask, TEMP, "torch",
                      with_values=True, with_entropy=True)
    assert calls == []
    unfused(copy.deepcopy(policy), exp)
    hook.remove()
