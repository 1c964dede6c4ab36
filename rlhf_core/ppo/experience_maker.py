"""Experience making: steps 1–7 of a PPO iteration, from prompts to an advantaged :class:`Experience`.

``make_experience`` draws the prompts, generates (with DAPO's dynamic sampling), scores the text (with the
missing-EOS penalty and DAPO's overlong shaping), runs the policy/reference forward and finishes with
``compute_advantages``: per-token rewards with the KL where ``ppo.kl_penalty`` puts it, the estimator, the
whitening and the KL loss term's weight per row — the pure part, which the enumeration proofs
(benchmarks/loss_gradients.py) call directly. Kept apart from the trainer as OpenRLHF keeps its
experience maker: each half can be tested alone.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..config import PPOConfig
from ..errors import UserCodeError, user_code
from .advantages import masked_whiten
from .correction import importance_ratio, logprob_gap, weight_stats
from .experience import Experience
from .policy import PolicyWithValue
from .rewards import approx_kl, kl_in_rewards, kl_penalized_rewards, sequence_kls
from .rollout import decode_responses, encode_prompts, generate, sampled_logprobs, score
from .utils import masked_mean, masked_var


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
    with user_code(f"ppo.advantage_estimator {estimator.name!r}"):  # (or a built-in refusing its input)
        out = estimator(rewards=rewards, **kw)
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


def apply_rollout_correction(exp: Experience, correction: Callable[..., torch.Tensor], cfg: PPOConfig,
                             total: Callable[[float], float] = float, top: Callable[[float], float] = float
                             ) -> tuple[Experience, dict[str, float]]:
    """The rollout correction's weights from π_old (``exp.logprobs``) and μ (``exp.behavior_logprobs``), set as
    ``exp.correction_weights``, and its metrics over the (global) batch.

    Formula: ρ = π_old/μ at ``ppo.rollout_correction_level`` (``correction.importance_ratio``), w = correction(ρ,
    ...) with ``ppo.rollout_correction_threshold`` / ``_low`` / ``_high``; w is 0 on padding, detached.
    Metrics: ``check/logprob_gap`` (mean |log μ − log π_old| over valid tokens), ``check/logprob_gap_max``, and
    over tokens or responses (the level) ``correction/weight_mean``, ``_max``, ``correction/ratio_min``,
    ``_max``, ``correction/truncated_fraction`` (0 < w < ρ) and ``correction/masked_fraction`` (w = 0).

    Args:
        total: a sum over ranks (``distributed.global_count``); top: a max over ranks (``global_max``).
    Shapes: exp's (B, T) fields -> correction_weights (B, T).
    Raises:
        UserCodeError: a correction that returns anything but finite weights ≥ 0 of shape (B, T).
    """
    mask, level = exp.mask, cfg.rollout_correction_level
    ratio = importance_ratio(exp.logprobs, exp.behavior_logprobs, mask, level)  # (B, T)
    where = f"ppo.rollout_correction {cfg.rollout_correction!r}"
    with user_code(where):
        w = correction(ratio=ratio, old_logprobs=exp.logprobs, behavior_logprobs=exp.behavior_logprobs, mask=mask,
                       level=level, threshold=cfg.rollout_correction_threshold, low=cfg.rollout_correction_low,
                       high=cfg.rollout_correction_high)
    valid = mask.bool()
    if not (isinstance(w, torch.Tensor) and w.shape == mask.shape and bool(w[valid].isfinite().all())
            and bool((w[valid] >= 0).all())):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise UserCodeError(f"{where} returned {got}; expected finite weights >= 0 of shape (B, T) = {tuple(mask.shape)}")
    w = torch.where(valid, w.detach().to(exp.logprobs.dtype), torch.zeros_like(exp.logprobs))  # (B, T)
    gap_sum, gap_max, tokens = logprob_gap(exp.behavior_logprobs, exp.logprobs, mask)
    s = weight_stats(w, ratio, mask, level)
    units = max(total(s["units"]), 1.0)
    low = -top(-s["ratio_min"])
    metrics = {"check/logprob_gap": total(gap_sum) / max(total(tokens), 1.0), "check/logprob_gap_max": top(gap_max),
               "correction/weight_mean": total(s["weight_sum"]) / units, "correction/weight_max": top(s["weight_max"]),
               "correction/ratio_max": top(s["ratio_max"]), "correction/ratio_min": low if low < float("inf") else 0.0,
               "correction/truncated_fraction": total(s["truncated"]) / units,
               "correction/masked_fraction": total(s["masked"]) / units}
    return replace(exp, correction_weights=w), metrics


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
                    generator: torch.Generator, iteration: int, sharded: bool = False,
                    correction: Callable[..., torch.Tensor] | None = None, engine: Any = None
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
    4. log π_old and values from the sampling loop's states, the reference's forward and the exact KL. With a
       rollout ``correction`` (extensions.resolve_rollout_correction) π_old and the values come from the
       trainer's own forward, the sampling loop's logprobs are μ (``behavior_logprobs``; a rollout engine
       hands its own in here) and ``apply_rollout_correction`` sets the weights. With a rollout ``engine``
       (``vllm_engine.VLLMEngine``: the policy's weights synced in first) the engine samples and its logprobs are
       μ; π_old and the values then always come from the trainer's forward.
    5–7. rewards, advantages and KL weights (``compute_advantages``); overlong filtering masks the
       truncated responses out of the loss (``loss_mask``).

    Returns:
        (experience, metrics of the rollout, extras: prompts, texts and raw advantages of this rank).
    """
    device = policy.lm_head_weight.device
    k, need = cfg.group_size, cfg.batch_size // D.world_size()
    rounds: list[dict[str, Any]] = []
    kept_groups, dropped, t_generate = 0, 0, 0.0
    t_sync = engine.sync(policy.model) if engine is not None else 0.0  # the weights of this iteration's policy
    for r in range(cfg.dynamic_sampling_max_rounds if cfg.dynamic_sampling else 1):
        batch = draw_prompts()
        ids = [r * (cfg.batch_size // k) + i // k for i in range(len(batch))]
        prompts, group_ids = list(D.shard(batch)), torch.tensor(list(D.shard(ids)), dtype=torch.long)
        query_ids, query_mask = encode_prompts(tokenizer, prompts, cfg.max_prompt_length, device)
        t_round = time.perf_counter()
        if engine is not None:  # (b, T) ids, mask, (b,) has_eos, (b, T) the engine's log μ; no hidden states
            response_ids, mask, has_eos, behavior = engine.generate(query_ids, query_mask, generator)
            hidden = None
        else:
            response_ids, mask, has_eos, hidden = generate(
                policy, query_ids, query_mask, cfg.response_length, cfg.temperature, cfg.top_k, cfg.top_p,
                tokenizer.eos_token_id, tokenizer.pad_token_id, generator, return_hidden=True, stop_together=sharded)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_generate += time.perf_counter() - t_round
        if engine is None:
            behavior = None if correction is None else sampled_logprobs(
                policy, hidden, response_ids, mask, cfg.temperature, cfg.kernel_backend)  # (b, T) log μ
        texts = decode_responses(tokenizer, response_ids, mask)
        with torch.autocast(device.type, enabled=False):  # a reward model scores in fp32 under bf16 training
            raw = reward(prompts, texts, iteration).float()  # (b,) the reward source's scores
        flat = flat_groups(raw, k) if cfg.dynamic_sampling else torch.zeros(len(prompts) // k, dtype=torch.bool)
        rounds.append(dict(prompts=prompts, texts=texts, raw=raw, group_ids=group_ids, query_ids=query_ids,
                           query_mask=query_mask, response_ids=response_ids, mask=mask, has_eos=has_eos,
                           hidden=hidden, flat=flat, behavior=behavior))
        kept_groups, dropped = kept_groups + int((~flat).sum()), dropped + int(flat.sum())
        if D.global_count(int(kept_groups * k < need)) == 0:  # every rank has its share
            break
    rows = _select_rows(rounds, need, k)
    cat = {key: _pad_cat([rd[key][sel] for rd, sel in zip(rounds, rows) if len(sel)], left=key.startswith("query"),
                         value=tokenizer.pad_token_id if key.endswith("_ids") else 0)
           for key in ("query_ids", "query_mask", "response_ids", "mask") + ("hidden",) * (engine is None)
           + ("behavior",) * bool(correction or engine)}
    pick = lambda key: torch.cat([rd[key][sel.to(rd[key].device)] for rd, sel in zip(rounds, rows)])  # noqa: E731
    prompts = [rd["prompts"][i] for rd, sel in zip(rounds, rows) for i in sel.tolist()]
    texts = [rd["texts"][i] for rd, sel in zip(rounds, rows) for i in sel.tolist()]
    raw, has_eos, group_ids = pick("raw"), pick("has_eos"), pick("group_ids")
    mask = cat["mask"]
    shaping = overlong_penalty(mask.sum(1).cpu(), cfg.response_length, cfg.overlong_buffer, cfg.overlong_penalty)
    scores = raw - cfg.missing_eos_penalty * (~has_eos.cpu()).float() + shaping  # (B,)
    exp = score(policy, cat["query_ids"], cat["query_mask"], cat["response_ids"], mask, scores, cfg.temperature,
                cfg.kl_estimator, cfg.kernel_backend,
                cat.get("hidden") if cfg.rollout_logprobs and correction is None else None, reference=needs_reference(cfg))
    exp = replace(exp, group_ids=group_ids.to(device), behavior_logprobs=cat.get("behavior"),
                  loss_mask=(mask.bool() & has_eos.to(device).unsqueeze(-1)) if cfg.overlong_filter else None)
    corrected = {}
    if correction is not None:
        exp, corrected = apply_rollout_correction(exp, correction, cfg, D.global_count, D.global_max)
    elif engine is not None:  # no weights, but the engine-vs-trainer gap is still measured
        gap_sum, gap_max, tokens = logprob_gap(exp.behavior_logprobs, exp.logprobs, mask)
        corrected = {"check/logprob_gap": D.global_count(gap_sum) / max(D.global_count(tokens), 1.0),
                     "check/logprob_gap_max": D.global_max(gap_max)}
    exp, info = compute_advantages(exp, estimator, cfg, kl_coef, D.global_masked_moments, D.global_max)
    kls = {}  # not measured without the reference pass
    if needs_reference(cfg):
        kls = {f"objective/kl_{k_}": float(v.mean())
               for k_, v in sequence_kls(exp.logprobs, exp.ref_logprobs, exp.kl_exact, mask).items()}
        kls["objective/kl"] = float(exp.kl.sum(1).mean())
    eos = float(has_eos.float().mean())
    metrics = {
        **kls, **corrected,
        "objective/scores": float(exp.scores.mean()),
        "objective/rlhf_reward": float(exp.scores.mean()) - kl_coef * float(exp.kl.sum(1).mean()),
        "response/length": float(mask.sum(1).float().mean()),
        "response/eos_fraction": eos,
        "check/truncated_fraction": 1.0 - eos,
        "check/degenerate_advantages": info["check/degenerate_advantages"],
        "time/generate": t_generate,
        **({"time/weight_sync": t_sync} if engine is not None else {}),
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


def needs_reference(cfg: PPOConfig) -> bool:
    """Whether the rollout runs the reference policy: a KL term needs it, ``measure_kl`` asks for it. At
    ``kl_coef = 0`` without the adaptive controller no KL enters the reward or the loss, so the reference
    forward is skipped (TRL's GRPO does the same at its default beta = 0); the ``objective/kl*`` metrics
    are then absent (unmeasured, not zero) and the held-out evaluation still measures ``eval/kl_to_ref``."""
    return cfg.kl_coef > 0 or cfg.adaptive_kl or cfg.measure_kl


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
