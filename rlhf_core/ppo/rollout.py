"""Rollout: sample responses with a KV cache, then score them into an :class:`Experience`.

``make_experience`` is steps 1–7 of a PPO iteration (prompts, generation with DAPO's dynamic sampling,
scoring, rewards, advantages) and ``compute_advantages`` its last, pure part. ``generate`` is a plain
sampling loop (no ``model.generate``): one trunk forward over the
left-padded prompts fills the cache, then one token per step, with logits only for the last
position (B, V). ``score`` runs one no-grad forward of the reference and, unless the sampling
loop's hidden states are passed in, one of the policy (logprobs + values), through the fused
logprob kernel — never a [B, T, V] tensor.

References: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (left padding,
position ids, truncation without EOS, the missing-EOS penalty).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kernels import fused_logprobs_kl

from .. import distributed as D
from ..config import PPOConfig
from ..errors import UserCodeError
from .experience import Experience
from .policy import IGNORE_INDEX, CausalLMView, PolicyWithValue, position_ids_for, response_hidden
from .advantages import masked_whiten
from .rewards import approx_kl, kl_in_rewards, kl_penalized_rewards, sequence_kls


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


def compute_scores(reward_fn: Callable[..., torch.Tensor], prompts: list[str], responses: list[str],
                   has_eos: torch.Tensor, missing_eos_penalty: float = 0.0, batch_index: int = 0
                   ) -> torch.Tensor:
    """Scores (B,) from the reward, minus ``missing_eos_penalty`` for truncated responses.

    ``reward_fn`` is a validated source (see ``reward_sources.checked_reward``) returning (B,).
    """
    scores = reward_fn(prompts, responses, batch_index).float()  # (B,)
    if missing_eos_penalty:
        # Truncated text can still read well; without a penalty PPO learns to never stop.
        scores = scores - missing_eos_penalty * (~has_eos.cpu()).float()
    return scores


@torch.no_grad()
def score(policy: PolicyWithValue, query_ids: torch.Tensor, query_mask: torch.Tensor,
          response_ids: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor | None,
          temperature: float = 1.0, kl_estimator: str = "k1", backend: str = "auto",
          hidden: torch.Tensor | None = None) -> Experience:
    """Logprobs and values (policy; none without a critic), ref_logprobs and the exact per-token KL
    (reference) of a rollout.

    One pass over the vocabulary (``kernels.fused_logprobs_kl``) gives log π(a_t), log π_ref(a_t)
    and the exact full-vocabulary KL(π‖π_ref) of every token from both models' hidden states, so
    ``kl_exact`` is always measured (the ``objective/kl_exact`` metric) at no extra sweep.
    ``hidden`` (B, T, H): the policy's states from the sampling loop (``generate(...,
    return_hidden=True)``); given, the policy's forward pass is skipped. They are the distribution the
    tokens were drawn from; a fresh forward gives the same numbers up to float rounding.

    ``kl`` is set to the exact KL when ``kl_estimator="exact"`` (else None: the trainer applies the
    k1/k2/k3 estimator).
    Shapes: query (B, Lq); response/mask (B, T); scores (B,) or None (zeros, to be replaced by the
    reward once it is computed: the trainer scores the text after this, step 4).
    Returns: an Experience with rewards/advantages/returns left empty (filled by the trainer).
    """
    if hidden is not None:
        ids = torch.cat([query_ids, response_ids], dim=1)  # (B, Lq+T)
        attn = torch.cat([query_mask.long(), mask.long()], dim=1)  # (B, Lq+T)
    else:
        hidden, ids, attn = response_hidden(policy, query_ids, query_mask, response_ids, mask)  # (B, T, H)
    with policy.reference() as ref:
        ref_hidden, _, _ = response_hidden(ref, query_ids, query_mask, response_ids, mask)  # (B, T, H')
        ref_weight = ref.lm_head_weight
    b, t, h = hidden.shape
    targets = response_ids.masked_fill(~mask.bool(), IGNORE_INDEX).reshape(-1)  # (B·T,)
    lp, lq, kl = fused_logprobs_kl(hidden.reshape(b * t, h), policy.lm_head_weight, ref_hidden.reshape(b * t, -1),
                                   ref_weight, targets, temperature, backend, IGNORE_INDEX)  # (B·T,) each
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


# --------------------------------------------------------------------------- experience making


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score.

    Formula: with L_max = ``max_length`` and L_cache = ``buffer``,
        0 for |y| ≤ L_max − L_cache;  penalty·((L_max − L_cache) − |y|)/L_cache for L_max − L_cache < |y| ≤ L_max,
    so −penalty at |y| = L_max (a response can be no longer here). 0 everywhere when ``buffer`` is 0.

    Shapes: lengths (B,) -> (B,) float32.
    """
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    over = (lengths - (max_length - buffer)).clamp_min(0)  # (B,) tokens into the buffer
    return -penalty * over / buffer


def _spread(x: torch.Tensor, mask: torch.Tensor, moments: Callable, global_max: Callable[[float], float]
            ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(mean, population variance, degenerate) of ``x``'s valid entries. Degenerate: every entry equal up
    to rounding (std ≤ 1e-6·max|x|), where whitening would divide noise by ~0 (√1e-8 = 1e-4 at best)."""
    mean, var = moments(x, mask)
    biggest = global_max(float(torch.where(mask.bool(), x.abs(), torch.zeros_like(x)).max()) if x.numel() else 0.0)
    return mean, var, bool(torch.sqrt(var) <= 1e-6 * biggest)


def _local_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .utils import masked_mean, masked_var
    return masked_mean(x, mask), masked_var(x, mask, unbiased=False)


def _checked_estimator(name: str, out: Any, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimator's (advantages, returns), or a one-line UserCodeError naming it."""
    where = f"ppo.advantage_estimator {name!r}"
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise UserCodeError(f"{where} returned {type(out).__name__}; expected (advantages, returns), each (B, T)")
    for what, t in zip(("advantages", "returns"), out):
        if not isinstance(t, torch.Tensor) or t.shape != mask.shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise UserCodeError(f"{where} returned {what} of shape {got}; expected (B, T) = {tuple(mask.shape)}")
        if not bool(torch.isfinite(t[mask.bool()]).all()):
            raise UserCodeError(f"{where} returned non-finite {what}")
    return out[0], out[1]


def compute_advantages(exp: Experience, estimator: Any, cfg: PPOConfig, kl_coef: float,
                       moments: Callable | None = None, global_max: Callable[[float], float] = float
                       ) -> tuple[Experience, dict[str, Any]]:
    """Steps 5–7 of an iteration on a scored rollout: per-token rewards, advantages, and the KL loss
    term's weight per row.

    5. r_t = score·[t = last] − β·kl_t where ``ppo.kl_penalty`` puts the KL in the reward
       (``kl_in_rewards``); with ``whiten_rewards``, r ← (r − μ_r)/σ_r + μ_r.
    6. (A, returns) from ``estimator`` (``extensions.Estimator``) with ``group_ids``.
    7. With the estimator's ``whiten``: A ← (A − μ_A)/σ_A over the (global) batch.
    The KL loss term's weight of row i is β·w_i/(σ_r·σ_A), w_i the estimator's ``return_weight``
    (∂A_i/∂R_i): the loss-placed KL is scaled as the reward-placed one reaches the advantage, so
    ``kl_penalty=both`` splits one penalty consistently. A degenerate spread (every value equal: a batch
    whose scores are all equal and whose KL sits in the loss) is not divided by: its σ counts as 1 (the
    advantages are then 0 and the KL term keeps weight β·w_i), and ``check/degenerate_advantages`` is 1.

    Args:
        exp: scored rollout (logprobs, ref_logprobs, kl_exact, scores, values, mask, group_ids).
        moments: ``(x, mask) -> (mean, population variance)``, default this batch's; the trainer passes
            the global one (``distributed.global_masked_moments``). global_max: the max over ranks.
    Returns:
        (exp with rewards, kl, advantages, returns, kl_coef; {"raw_advantages", metrics...}).
    """
    moments = moments or _local_moments
    mask = exp.mask
    kl = (exp.kl_exact if cfg.kl_estimator == "exact"
          else approx_kl(exp.logprobs, exp.ref_logprobs, cfg.kl_estimator)) * mask  # (B, T) the penalty's KL
    rewards, _ = kl_penalized_rewards(exp.scores, exp.logprobs, exp.ref_logprobs, mask, kl_coef,
                                      kl=kl_in_rewards(kl, mask, cfg.kl_penalty))
    scale = torch.ones(len(exp), dtype=rewards.dtype, device=rewards.device)  # (B,) how R_i reaches A_i
    degenerate = False
    if cfg.whiten_rewards:  # (r - mu)/sigma + mu: keeps the mean, see advantages.masked_whiten
        mean, var, flat = _spread(rewards, mask, moments, global_max)
        if not flat:
            rewards = masked_whiten(rewards, mask, shift_mean=False, moments=lambda x, m: (mean, var))
            scale = scale * torch.rsqrt(var + 1e-8)
        degenerate = flat
    kw = dict(values=exp.values, mask=mask, scores=exp.scores, gamma=cfg.gamma, lam=cfg.lam,
              group_size=cfg.group_size, group_ids=exp.group_ids)
    try:
        out = estimator(rewards=rewards, **kw)
    except Exception as e:  # the user's code (or a built-in estimator refusing its input)
        raise UserCodeError(f"ppo.advantage_estimator {estimator.name!r} raised {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    advantages, returns = _checked_estimator(estimator.name, out, mask)
    scale = scale * estimator.row_weights(rewards, mask, group_size=cfg.group_size, group_ids=exp.group_ids)
    used = advantages
    if estimator.whiten:
        mean, var, flat = _spread(advantages, mask, moments, global_max)
        if flat:
            used = torch.zeros_like(advantages)
        else:
            used = masked_whiten(advantages, mask, moments=lambda x, m: (mean, var))
            scale = scale * torch.rsqrt(var + 1e-8)
        degenerate = degenerate or flat
    kl_rows = kl_coef * scale if cfg.kl_penalty != "reward" else None
    exp = replace(exp, rewards=rewards, kl=kl, advantages=used, returns=returns, kl_coef=kl_rows)
    return exp, {"raw_advantages": advantages, "check/degenerate_advantages": float(degenerate)}


def _pad_cat(parts: list[torch.Tensor], left: bool = False, value: float = 0) -> torch.Tensor:
    """Concatenate along rows, padding dim 1 to the longest (on the left for prompts)."""
    width = max(t.shape[1] for t in parts)
    pads = [(0, 0) * (t.dim() - 2) + ((width - t.shape[1], 0) if left else (0, width - t.shape[1])) for t in parts]
    return torch.cat([F.pad(t, p, value=value) for t, p in zip(parts, pads)], dim=0)


def flat_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which contiguous groups of ``group_size`` rows have all their scores equal (up to 1e-6 relative):
    no advantage spread, no learning signal (DAPO's dynamic sampling drops them). (B,) -> (B/k,) bool."""
    g = scores.view(-1, group_size)
    return (g.amax(1) - g.amin(1)) <= 1e-6 * g.abs().amax(1).clamp_min(1.0)


def make_experience(policy: PolicyWithValue, tokenizer: Any, reward: Callable[..., torch.Tensor], estimator: Any,
                    cfg: PPOConfig, kl_coef: float, draw_prompts: Callable[[], list[str]],
                    generator: torch.Generator, iteration: int, sharded: bool = False
                    ) -> tuple[Experience, dict[str, Any], dict[str, Any]]:
    """Steps 1–7 of a PPO iteration: a scored, advantaged rollout of this rank's share of the batch.

    1. prompts: ``draw_prompts()`` gives the next global batch (groups of ``group_size`` contiguous
       copies); this rank takes its contiguous shard. Rows of one prompt share a group id.
    2. generate with the KV cache (no grad), keeping the states the tokens were sampled from.
    3. scores: the reward source on the decoded text (validated before any weight changes), minus the
       missing-EOS penalty, plus DAPO's overlong shaping.
       With ``dynamic_sampling``: groups whose reward-source scores are all equal are dropped and steps
       1–3 repeat on further prompts until this rank's share is full (every rank runs as many rounds,
       at most ``dynamic_sampling_max_rounds``); still short, the first dropped groups fill the rest.
    4. log π_old and values from the sampling loop's states, the reference's forward and the exact KL.
    5–7. rewards, advantages and KL weights (``compute_advantages``); overlong filtering masks the
       truncated responses out of the loss (``loss_mask``).

    Returns:
        (experience, metrics of the rollout, extras: prompts, texts and raw advantages of this rank).
    """
    device = policy.lm_head_weight.device
    k, need = cfg.group_size, cfg.batch_size // D.world_size()
    rounds: list[dict[str, Any]] = []
    kept_groups, dropped, t_generate = 0, 0, 0.0
    for r in range(cfg.dynamic_sampling_max_rounds if cfg.dynamic_sampling else 1):
        batch = draw_prompts()
        ids = [r * (cfg.batch_size // k) + i // k for i in range(len(batch))]
        prompts, group_ids = list(D.shard(batch)), torch.tensor(list(D.shard(ids)), dtype=torch.long)
        query_ids, query_mask = encode_prompts(tokenizer, prompts, cfg.max_prompt_length, device)
        t_round = time.perf_counter()
        response_ids, mask, has_eos, hidden = generate(
            policy, query_ids, query_mask, cfg.response_length, cfg.temperature, cfg.top_k, cfg.top_p,
            tokenizer.eos_token_id, tokenizer.pad_token_id, generator, return_hidden=True, stop_together=sharded)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_generate += time.perf_counter() - t_round
        texts = decode_responses(tokenizer, response_ids, mask)
        with torch.autocast(device.type, enabled=False):  # a reward model scores in fp32 under bf16 training
            raw = reward(prompts, texts, iteration).float()  # (b,) the reward source's scores
        flat = flat_groups(raw, k) if cfg.dynamic_sampling else torch.zeros(len(prompts) // k, dtype=torch.bool)
        rounds.append(dict(prompts=prompts, texts=texts, raw=raw, group_ids=group_ids, query_ids=query_ids,
                           query_mask=query_mask, response_ids=response_ids, mask=mask, has_eos=has_eos,
                           hidden=hidden, flat=flat))
        kept_groups, dropped = kept_groups + int((~flat).sum()), dropped + int(flat.sum())
        if D.global_count(int(kept_groups * k < need)) == 0:  # every rank has its share
            break
    rows = _select_rows(rounds, need, k)
    cat = {key: _pad_cat([rd[key][sel] for rd, sel in zip(rounds, rows) if len(sel)], left=key.startswith("query"),
                         value=tokenizer.pad_token_id if key.endswith("_ids") else 0)
           for key in ("query_ids", "query_mask", "response_ids", "mask", "hidden")}
    pick = lambda key: torch.cat([rd[key][sel.to(rd[key].device)] for rd, sel in zip(rounds, rows)])  # noqa: E731
    prompts = [rd["prompts"][i] for rd, sel in zip(rounds, rows) for i in sel.tolist()]
    texts = [rd["texts"][i] for rd, sel in zip(rounds, rows) for i in sel.tolist()]
    raw, has_eos, group_ids = pick("raw"), pick("has_eos"), pick("group_ids")
    mask = cat["mask"]
    shaping = overlong_penalty(mask.sum(1).cpu(), cfg.response_length, cfg.overlong_buffer, cfg.overlong_penalty)
    scores = raw - cfg.missing_eos_penalty * (~has_eos.cpu()).float() + shaping  # (B,)
    exp = score(policy, cat["query_ids"], cat["query_mask"], cat["response_ids"], mask, scores, cfg.temperature,
                cfg.kl_estimator, cfg.kernel_backend, cat["hidden"] if cfg.rollout_logprobs else None)
    exp = replace(exp, group_ids=group_ids.to(device),
                  loss_mask=(mask.bool() & has_eos.to(device).unsqueeze(-1)) if cfg.overlong_filter else None)
    exp, info = compute_advantages(exp, estimator, cfg, kl_coef, D.global_masked_moments, D.global_max)
    seq_kl = {f"objective/kl_{k_}": float(v.mean())
              for k_, v in sequence_kls(exp.logprobs, exp.ref_logprobs, exp.kl_exact, mask).items()}
    eos = float(has_eos.float().mean())
    metrics = {
        "objective/kl": float(exp.kl.sum(1).mean()),
        **seq_kl,
        "objective/scores": float(exp.scores.mean()),
        "objective/rlhf_reward": float(exp.scores.mean()) - kl_coef * float(exp.kl.sum(1).mean()),
        "response/length": float(mask.sum(1).float().mean()),
        "response/eos_fraction": eos,
        "check/truncated_fraction": 1.0 - eos,
        "check/degenerate_advantages": info["check/degenerate_advantages"],
        "time/generate": t_generate,
    }
    if cfg.overlong_buffer:
        metrics["response/overlong_penalty"] = float(shaping.mean())
    for name, mean in getattr(getattr(reward, "source", None), "last", {}).items():  # several reward sources
        metrics[f"objective/reward/{name}"] = mean  # of the last round drawn
    if cfg.dynamic_sampling:
        metrics.update({"dynamic/dropped_groups": D.global_count(dropped), "dynamic/rounds": float(len(rounds)),
                        "dynamic/refilled_with_flat": D.global_count(sum(int(rd["flat"][sel // k].sum())
                                                                         for rd, sel in zip(rounds, rows)) / k)})
    extras = {"prompts": prompts, "responses": texts, "raw_advantages": info["raw_advantages"]}
    return exp, metrics, extras


def _select_rows(rounds: list[dict[str, Any]], need: int, k: int) -> list[torch.Tensor]:
    """Row indices to keep from each round: groups with a score spread first, in round order, up to
    ``need`` rows; then flat groups, in round order, if still short. Returns one (n_r,) int64 per round."""
    chosen: list[list[int]] = [[] for _ in rounds]
    left = need
    for want_flat in (False, True):
        for j, rd in enumerate(rounds):
            for g in range(len(rd["flat"])):
                if left > 0 and bool(rd["flat"][g]) == want_flat:
                    chosen[j] += list(range(g * k, g * k + k))
                    left -= k
    return [torch.tensor(sorted(c), dtype=torch.long) for c in chosen]
