"""Rollout: sample responses with a KV cache, then score them into an :class:`Experience`.

``generate`` is a plain sampling loop (no ``model.generate``): one trunk forward over the
left-padded prompts fills the cache, then one token per step, with logits only for the last
position (B, V). ``score`` runs one no-grad forward of the reference and, unless the sampling
loop's hidden states are passed in, one of the policy (logprobs + values), through the fused
logprob kernel — never a [B, T, V] tensor.

References: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (left padding,
position ids, truncation without EOS, the missing-EOS penalty).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import DynamicCache

from kernels import fused_logprobs, fused_logprobs_kl

from .. import distributed as D
from .experience import Experience
from .policy import IGNORE_INDEX, CausalLMView, PolicyWithValue, position_ids_for, response_hidden


def encode_prompts(tokenizer: Any, prompts: list[str], max_prompt_length: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and left-pad prompts (longer ones keep their last ``max_prompt_length`` tokens).

    Left padding puts every prompt's last token in the last column, so the first sampled token
    of every row comes from the same position.
    Returns: (query_ids (B, Lq), query_mask (B, Lq)).
    """
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_length:] for p in prompts]
    length = max(len(r) for r in rows)
    query_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)  # (B, Lq)
    query_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, Lq)
    for i, r in enumerate(rows):
        query_ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
        query_mask[i, length - len(r):] = 1
    return query_ids.to(device), query_mask.to(device)


def next_prompt_batch(prompts: list[str], order: list[int], batch_size: int, group_size: int,
                      generator: torch.Generator) -> tuple[list[str], list[int]]:
    """The next ``batch_size // group_size`` prompts of a seeded reshuffle, each repeated ``group_size``
    times in a row (a group's samples are contiguous), and the indices not used yet (the data cursor).

    ``order`` holds the indices left from earlier batches; when they run short a fresh permutation
    of all prompts is appended, so every prompt is used once per pass before any repeats.
    """
    n = batch_size // group_size
    while len(order) < n:
        order = order + torch.randperm(len(prompts), generator=generator).tolist()
    return [prompts[i] for i in order[:n] for _ in range(group_size)], order[n:]


def decode_responses(tokenizer: Any, response_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Text of each response's valid tokens, special tokens (the EOS) dropped."""
    return [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
            for r, m in zip(response_ids.cpu(), mask.cpu())]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
    """Draw one token per row from last-position logits.  (B, V) -> (B,)

    Top-k keeps the k largest logits; top-p keeps the smallest set whose mass reaches p (the
    most likely token always survives).
    """
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature  # (B, V)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        probs = sorted_logits.softmax(-1)  # (B, V)
        drop = probs.cumsum(-1) - probs > top_p  # (B, V) mass before this token already >= p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)  # (B, V)
    # Inverse-CDF sampling: one uniform per row against the float64 running sum of the
    # probabilities. The same law as torch.multinomial, which draws an exponential per vocabulary
    # entry (16x slower here at V=8192, 5% of a PPO iteration on CPU). A token of probability 0
    # adds no width to the running sum, so it can never be hit.
    cdf = probs.to(torch.float64).cumsum_(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=torch.float64, device=cdf.device)  # (B, 1)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)  # (B,) first cdf > u·total
    # u·total can round up to total (u = 1 − 2⁻⁵³): searchsorted then returns V; take the mode there.
    return torch.where(picked < cdf.shape[-1], picked, probs.argmax(-1))  # (B,)


@torch.no_grad()
def generate(policy: CausalLMView, query_ids: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int = 1,
             pad_token_id: int = 0, generator: torch.Generator | None = None, greedy: bool = False,
             use_cache: bool = True, return_hidden: bool = False, stop_together: bool = False
             ) -> tuple[torch.Tensor, ...]:
    """Sample responses to left-padded prompts, stopping each row at its EOS.

    Shapes: query_ids, query_mask (B, Lq).
    Returns:
        response_ids (B, T): sampled tokens, ``pad_token_id`` after a row's EOS; T ≤ max_new_tokens
            (trimmed to the longest row).
        mask (B, T): 1 on the response through its EOS (inclusive); a row without EOS is
            truncated at ``max_new_tokens`` and its mask covers all T tokens.
        has_eos (B,): True where the row emitted EOS.
        hidden (B, T, H), only with ``return_hidden``: the last hidden state each token was sampled
            from — row t is the state that predicts response[t], what :func:`score` would recompute.
    ``use_cache=False`` recomputes the whole sequence every step (a test oracle for the cache).
    ``stop_together``: under torchrun, stop only when every rank's rows are done (an FSDP-sharded
    policy's forward is a collective: each rank must run as many as the others); the rows that
    finished early get pads (drawing no random numbers, so the sampling stream is the one an
    unsynchronized run would use), so T is the longest row over all ranks.
    """
    b = query_ids.shape[0]
    weight = policy.lm_head_weight  # (V, H)
    attention = query_mask.long()  # (B, Lq)
    positions = position_ids_for(attention)  # (B, Lq)
    cache = DynamicCache() if use_cache else None
    hidden, cache = policy.forward_hidden(query_ids, attention, positions, cache, use_cache=True)
    done = torch.zeros(b, dtype=torch.bool, device=query_ids.device)  # (B,)
    tokens, valid, states = [], [], []
    for _ in range(max_new_tokens):
        if return_hidden:
            states.append(hidden[:, -1])  # (B, H)
        if bool(done.all()):  # stop_together: this rank is done, another is not: pads, no draws
            nxt = torch.full_like(done, pad_token_id, dtype=torch.long)  # (B,)
        else:
            with torch.autocast(hidden.device.type, enabled=False):  # fp32 logits, as the fused logprob's
                logits = hidden[:, -1].to(weight.dtype) @ weight.T  # (B, V) last position only
            nxt = sample_next(logits, temperature, top_k, top_p, generator, greedy)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        tokens.append(nxt)
        valid.append(~done)
        done = done | (nxt == eos_token_id)
        finished = bool(done.all())
        if stop_together:  # finished only when no rank has a row left
            finished = D.global_count(0 if finished else 1) == 0
        if finished:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)  # (B, L+1)
        step_pos = positions[:, -1:] + 1  # (B, 1)
        positions = torch.cat([positions, step_pos], dim=1)  # (B, L+1)
        if use_cache:
            hidden, cache = policy.forward_hidden(nxt[:, None], attention, step_pos, cache, use_cache=True)
        else:
            seq = torch.cat([query_ids, torch.stack(tokens, 1)], dim=1)  # (B, L+1)
            hidden = policy.forward_hidden(seq, attention, positions)  # (B, L+1, H)
    response_ids = torch.stack(tokens, dim=1)  # (B, T)
    mask = torch.stack(valid, dim=1).long()  # (B, T)
    if return_hidden:
        return response_ids, mask, done, torch.stack(states, dim=1)  # (B, T, H)
    return response_ids, mask, done


@torch.no_grad()
def sampled_logprobs(policy: CausalLMView, hidden: torch.Tensor, response_ids: torch.Tensor, mask: torch.Tensor,
                     temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """log μ(a_t|s_t) of the sampled tokens from the sampling loop's own states (``generate(...,
    return_hidden=True)``): the behavior policy's logprobs, as a rollout engine reports them.

    Formula: log softmax(h_t·Wᵀ/temperature)[a_t] through the fused kernel, 0 on padding.
    Shapes: hidden (B, T, H), response_ids / mask (B, T) -> (B, T).
    """
    b, t, h = hidden.shape
    targets = response_ids.masked_fill(~mask.bool(), IGNORE_INDEX).reshape(-1)  # (B·T,)
    lp = fused_logprobs(hidden.reshape(b * t, h), policy.lm_head_weight, targets, temperature, backend=backend,
                        ignore_index=IGNORE_INDEX)  # (B·T,)
    return lp.view(b, t) * mask.bool()


@torch.no_grad()
def score(policy: PolicyWithValue, query_ids: torch.Tensor, query_mask: torch.Tensor,
          response_ids: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor | None,
          temperature: float = 1.0, kl_estimator: str = "k1", backend: str = "auto",
          hidden: torch.Tensor | None = None, reference: bool = True) -> Experience:
    """Logprobs and values (policy; none without a critic), ref_logprobs and the exact per-token KL
    (reference) of a rollout.

    One pass over the vocabulary (``kernels.fused_logprobs_kl``) gives log π(a_t), log π_ref(a_t)
    and the exact full-vocabulary KL(π‖π_ref) of every token from both models' hidden states, so
    ``kl_exact`` is always measured (the ``objective/kl_exact`` metric) at no extra sweep.
    ``hidden`` (B, T, H): the policy's states from the sampling loop (``generate(...,
    return_hidden=True)``); given, the policy's forward pass is skipped. They are the distribution the
    tokens were drawn from; a fresh forward gives the same numbers up to float rounding.

    ``kl`` is set to the exact KL when ``kl_estimator="exact"`` (else None: the trainer applies the
    k1/k2/k3 estimator). ``reference=False`` (no KL term to pay: ``needs_reference``) skips the
    reference forward, as TRL's GRPO at beta = 0 does: ``ref_logprobs`` are the policy's own and
    ``kl_exact`` is zero — not measured, so the caller must not report it as a KL.
    Shapes: query (B, Lq); response/mask (B, T); scores (B,) or None (zeros, to be replaced by the
    reward once it is computed: the trainer scores the text after this, step 4).
    Returns: an Experience with rewards/advantages/returns left empty (filled by the trainer).
    """
    if hidden is not None:
        ids = torch.cat([query_ids, response_ids], dim=1)  # (B, Lq+T)
        attn = torch.cat([query_mask.long(), mask.long()], dim=1)  # (B, Lq+T)
    else:
        hidden, ids, attn = response_hidden(policy, query_ids, query_mask, response_ids, mask)  # (B, T, H)
    b, t, h = hidden.shape
    targets = response_ids.masked_fill(~mask.bool(), IGNORE_INDEX).reshape(-1)  # (B·T,)
    if reference:
        with policy.reference() as ref:
            ref_hidden, _, _ = response_hidden(ref, query_ids, query_mask, response_ids, mask)  # (B, T, H')
            ref_weight = ref.lm_head_weight
        lp, lq, kl = fused_logprobs_kl(hidden.reshape(b * t, h), policy.lm_head_weight,
                                       ref_hidden.reshape(b * t, -1), ref_weight, targets, temperature, backend,
                                       IGNORE_INDEX)  # (B·T,) each
    else:
        lp = fused_logprobs(hidden.reshape(b * t, h), policy.lm_head_weight, targets, temperature,
                            backend=backend, ignore_index=IGNORE_INDEX)  # (B·T,)
        lq, kl = lp, torch.zeros_like(lp)
    valid = mask.bool()
    logprobs, ref_logprobs = lp.view(b, t) * valid, lq.view(b, t) * valid  # (B, T) each
    kl_exact = kl.view(b, t) * valid  # (B, T)
    values = policy.response_values(hidden, ids, attn)  # (B, T), None without a critic
    values = values * valid if values is not None else None
    return Experience(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, mask=mask,
                      logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                      scores=(torch.zeros(len(mask)) if scores is None else scores).to(logprobs.device),
                      kl=kl_exact if kl_estimator == "exact" else None, kl_exact=kl_exact)


@torch.no_grad()
def evaluate(policy: PolicyWithValue, tokenizer: Any, prompts: list[str], reward_fn: Callable[..., torch.Tensor],
             gold_fn: Callable[..., torch.Tensor] | None = None, *, max_new_tokens: int,
             max_prompt_length: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, backend: str = "auto", batch_size: int = 64) -> tuple[dict[str, float], list[str]]:
    """Held-out evaluation: sample one response per prompt and average what it earns.

    Sampling uses the training temperature (what PPO optimizes) with a generator re-seeded from
    ``seed`` on every call, so two evaluations of different policies share their random draws.
    Returns ``eval/scores`` (the reward source), ``eval/gold_reward`` (``gold_fn``, if given),
    ``eval/kl_to_ref`` (mean over responses of Σ_t exact KL(π‖π_ref)) and ``eval/response_length``,
    and the responses themselves (one per prompt, in order).
    """
    device = policy.lm_head_weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = {"eval/scores": 0.0, "eval/gold_reward": 0.0, "eval/kl_to_ref": 0.0, "eval/response_length": 0.0}
    responses: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        query_ids, query_mask = encode_prompts(tokenizer, batch, max_prompt_length, device)
        response_ids, mask, _ = generate(policy, query_ids, query_mask, max_new_tokens, temperature, top_k,
                                         top_p, tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
        texts = decode_responses(tokenizer, response_ids, mask)
        responses += texts
        with torch.autocast(device.type, enabled=False):  # reward models score in fp32 under bf16
            sums["eval/scores"] += float(reward_fn(batch, texts, start // batch_size).sum())
            if gold_fn is not None:
                sums["eval/gold_reward"] += float(gold_fn(batch, texts, start // batch_size).sum())
        exp = score(policy, query_ids, query_mask, response_ids, mask, None, temperature, backend=backend)
        sums["eval/kl_to_ref"] += float(exp.kl_exact.sum())  # type: ignore[union-attr]
        sums["eval/response_length"] += float(mask.sum())
    out = {k: v / len(prompts) for k, v in sums.items()}
    if gold_fn is None:
        del out["eval/gold_reward"]
    return out, responses
