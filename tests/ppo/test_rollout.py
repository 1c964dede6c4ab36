"""generate (KV cache, EOS, padding) and score (logprobs, values, exact KL) on tiny Llamas."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kernels import kl_naive
from rlhf_core.ppo.policy import PolicyWithValue
from rlhf_core.ppo.rollout import encode_prompts, generate, sample_next, score

V, H, EOS, PAD = 97, 32, 1, 0


def tiny_policy(seed: int = 0, eos_bias: float = 0.0) -> PolicyWithValue:
    """A tiny Llama; ``eos_bias`` > 0 makes EOS likely at every step.

    The last MLP's bias writes a large constant into residual dim 0, so after the final RMSNorm
    h_0 ≈ √H > 0 at every position; lm_head[EOS, 0] = eos_bias then adds ≈ √H·eos_bias to the EOS
    logit (the other rows get 0 in that column).
    """
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64,
                      pad_token_id=PAD, eos_token_id=EOS, tie_word_embeddings=False, mlp_bias=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        mlp = model.model.layers[-1].mlp.down_proj
        mlp.bias.zero_()
        if eos_bias:
            mlp.bias[0] = 1e3
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[EOS, 0] = eos_bias
    return PolicyWithValue(model)


def queries():
    query_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 0, 13, 14], [0, 15, 16, 17, 18]])
    return query_ids, (query_ids != 0).long()


def gen(policy, max_new_tokens=12, **kw):
    q, qm = queries()
    return generate(policy, q, qm, max_new_tokens, eos_token_id=EOS, pad_token_id=PAD, **kw)


def test_generation_stops_at_eos_and_masks_after_it():
    policy = tiny_policy(eos_bias=0.4)  # p(EOS) ≈ 0.15 per step: some rows stop, some run out
    response_ids, mask, has_eos = gen(policy, 16, generator=torch.Generator().manual_seed(3))
    q, qm = queries()
    big = torch.cat([gen(policy, 16, generator=torch.Generator().manual_seed(s))[2] for s in range(8)])
    assert big.any() and not big.all()  # the test exercises both kinds of rows
    for row, m, eos in zip(response_ids, mask, has_eos):
        hits = (row == EOS).nonzero()
        if eos:
            first = int(hits[0])
            assert m[:first + 1].all() and not m[first + 1:].any()  # mask covers through the EOS
            assert (row[first + 1:] == PAD).all()
        else:
            assert len(hits) == 0 and m.all() and len(row) == 16  # truncated at the limit


def test_forced_eos_stops_immediately():
    response_ids, mask, has_eos = gen(tiny_policy(eos_bias=50.0), generator=torch.Generator().manual_seed(0))
    assert response_ids.shape == (4, 1) and (response_ids == EOS).all() and mask.all() and has_eos.all()


def test_kv_cache_generation_equals_no_cache():
    policy = tiny_policy()
    cached = gen(policy, greedy=True)
    uncached = gen(policy, greedy=True, use_cache=False)
    assert torch.equal(cached[0], uncached[0]) and torch.equal(cached[1], uncached[1])
    sampled = [gen(policy, generator=torch.Generator().manual_seed(7), use_cache=c)[0] for c in (True, False)]
    assert torch.equal(*sampled)


def test_left_padded_generation_equals_single_prompts():
    policy = tiny_policy()
    q, qm = queries()
    batch_ids, _, _ = gen(policy, greedy=True)
    for i in range(4):
        keep = qm[i].bool()
        single, _, _ = generate(policy, q[i:i + 1, keep], qm[i:i + 1, keep], 12, eos_token_id=EOS,
                                pad_token_id=PAD, greedy=True)
        assert torch.equal(single[0], batch_ids[i, :single.shape[1]])


def test_same_generator_seed_same_samples():
    policy = tiny_policy()
    a = gen(policy, generator=torch.Generator().manual_seed(1))[0]
    b = gen(policy, generator=torch.Generator().manual_seed(1))[0]
    c = gen(policy, generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_next_top_k_and_top_p():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, top_p=1e-6, generator=g), logits.argmax(-1))
    top3 = logits.topk(3, -1).indices
    for _ in range(20):
        s = sample_next(logits, top_k=3, generator=g)
        assert (top3 == s[:, None]).any(-1).all()


def test_encode_prompts_left_pads_and_truncates_from_the_left():
    class Tok:
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}
    q, qm = encode_prompts(Tok(), ["abc", "abcdefgh"], 5)
    assert q.tolist() == [[0, 0, 97, 98, 99], [100, 101, 102, 103, 104]]
    assert qm.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_score_builds_experience_and_exact_kl_matches_naive():
    policy = tiny_policy()
    with torch.no_grad():  # move the policy away from its reference copy
        policy.model.lm_head.weight.mul_(1.5)
    q, qm = queries()
    response_ids, mask, _ = gen(policy, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([1.0, -1.0, 0.5, 0.0])
    exp = score(policy, q, qm, response_ids, mask, scores)
    assert exp.kl is None and exp.values.shape == mask.shape and torch.equal(exp.scores, scores)
    assert (exp.logprobs <= 0).all() and (exp.logprobs[mask == 0] == 0).all()
    assert (exp.logprobs - exp.ref_logprobs).abs().max() > 1e-3
    exact = score(policy, q, qm, response_ids, mask, scores, kl_estimator="exact", backend="torch")
    torch.testing.assert_close(exact.logprobs, exp.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(exact.ref_logprobs, exp.ref_logprobs, atol=1e-5, rtol=0)
    assert (exact.kl >= -1e-6).all() and (exact.kl[mask == 0] == 0).all()
    # naive float64 KL from the full logits at every response position
    from rlhf_core.ppo.policy import response_hidden
    h, _, _ = response_hidden(policy, q, qm, response_ids, mask)
    with policy.reference() as ref:
        rh, _, _ = response_hidden(ref, q, qm, response_ids, mask)
        rw = ref.lm_head_weight
    naive = kl_naive(h.reshape(-1, H).double(), policy.lm_head_weight.double(), rh.reshape(-1, H).double(),
                     rw.double()).view(mask.shape) * mask
    torch.testing.assert_close(exact.kl.double(), naive, atol=1e-5, rtol=0)


def test_sample_next_draws_from_the_softmax_and_never_a_zero_probability_token():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    logits = probs.log().float()  # log 0 = -inf: the softmax gives those tokens exactly 0
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, generator=g) for _ in range(20000)])  # (n, 2)
    freq = torch.stack([(draws[:, 0] == v).double().mean() for v in range(5)])
    assert torch.allclose(freq, probs[0], atol=0.015), freq  # 20000 draws: sd ≈ 0.0035
    assert (draws[:, 1] == 4).all() and not (draws[:, 0] == 1).any() and not (draws[:, 0] == 4).any()
    t = 0.5  # temperature: p ∝ exp(logit / t) = p₀²
    warm = torch.stack([sample_next(logits[:1], temperature=t, generator=g)[0] for _ in range(20000)])
    expect = probs[0] ** 2 / (probs[0] ** 2).sum()
    assert torch.allclose(torch.stack([(warm == v).double().mean() for v in range(5)]), expect, atol=0.015)


@pytest.mark.parametrize("value_model", ["shared", "separate"])
@pytest.mark.parametrize("kl_estimator", ["k1", "exact"])
def test_scoring_from_the_sampling_loop_states_equals_a_fresh_forward(value_model, kl_estimator):
    torch.manual_seed(0)
    policy = PolicyWithValue(tiny_policy(eos_bias=0.4).model, value_model=value_model)
    with torch.no_grad():  # a policy away from its reference, a value head that is not ~0
        policy.model.lm_head.weight.mul_(1.5)
        policy.value_head.summary.weight.normal_()
    q, qm = queries()
    response_ids, mask, _, hidden = gen(policy, 16, generator=torch.Generator().manual_seed(3),
                                        return_hidden=True)
    again, mask2, _ = gen(policy, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, response_ids) and torch.equal(mask2, mask)  # same draws either way
    assert hidden.shape == (*response_ids.shape, H)
    scores = torch.arange(4, dtype=torch.float32)
    fresh = score(policy, q, qm, response_ids, mask, scores, 0.7, kl_estimator)
    reused = score(policy, q, qm, response_ids, mask, scores, 0.7, kl_estimator, hidden=hidden)
    assert fresh.logprobs.abs().sum() > 1 and fresh.values.abs().sum() > 0.1
    for name in ("logprobs", "ref_logprobs", "values", "kl") if kl_estimator == "exact" else \
            ("logprobs", "ref_logprobs", "values"):
        a, b = getattr(fresh, name), getattr(reused, name)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, (a - b).abs().max())
        assert not (b * (1 - mask)).any()  # zero past each row's EOS
