"""Per-rank body of the distributed tests, launched by torchrun (see test_distributed.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 worker.py CASE OUT_DIR

Each case runs the distributed computation on every rank and, on rank 0 only (no collectives),
the single-process reference on the concatenated global batch; rank r saves ``OUT_DIR/rank{r}.pt``
and the test compares. Inputs are generated from fixed seeds, identical on every rank.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlhf_core import distributed as D, fsdp as FS  # noqa: E402

B, T = 7, 6  # global rows (odd: ranks hold 4 and 3), response length


def right_padded_mask(gen: torch.Generator, rows: int, width: int) -> torch.Tensor:
    """(rows, width) bool, row lengths in [0, width] (one row fully padded)."""
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    lengths[2] = 0
    return torch.arange(width).expand(rows, width) < lengths[:, None]


# --------------------------------------------------------------------------- whitening / metrics


def case_whiten() -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, generator=gen, dtype=torch.float64) * 3 + 5  # (B, T)
    x[~right_padded_mask(torch.Generator().manual_seed(1), B, T)] = float("nan")  # garbage in padding
    mask = right_padded_mask(torch.Generator().manual_seed(1), B, T)  # (B, T)
    xs, ms = D.shard(x), D.shard(mask)
    mean, var = D.global_masked_moments(xs, ms)
    metrics = D.reduce_metrics({"a": float(D.rank() + 1), "b": 10.0 * D.rank()},
                               counts={"a": float(len(xs))})
    from rlhf_core.ppo.advantages import masked_whiten
    from rlhf_core.ppo.losses import explained_variance
    values = torch.randn(B, T, generator=gen, dtype=torch.float64) + torch.nan_to_num(x) * 0.5  # (B, T)
    ev = explained_variance(D.shard(values), xs, ms, variance=lambda v, m: D.global_masked_moments(v, m)[1])
    return {"x": x, "mask": mask, "mean": mean, "var": var, "metrics": metrics, "values": values, "ev": ev,
            "white": masked_whiten(xs, ms, moments=D.global_masked_moments),
            "white_noshift": masked_whiten(xs, ms, shift_mean=False, moments=D.global_masked_moments),
            "shard": list(D.shard(list(range(11)))), "count": D.global_count(int(ms.sum()))}


# --------------------------------------------------------------------------- SFT with DDP / FSDP2


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """Float64 by default so the comparison tests the algebra, not float32 summation order."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def sft_batch(n: int = 6, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """``n`` records of different lengths; labels -100 on a 3-token prompt (as sft.encode_example)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + (i * 3) % 7
        ids = torch.randint(1, 64, (length,), generator=gen)
        labels = ids.clone()
        labels[:3] = -100
        out.append({"ids": ids, "labels": labels})
    return out


def collate(records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(len(r["ids"]) for r in records)
    ids = torch.zeros(len(records), width, dtype=torch.long)
    labels = torch.full((len(records), width), -100, dtype=torch.long)
    att = torch.zeros(len(records), width, dtype=torch.long)
    for i, r in enumerate(records):
        ids[i, :len(r["ids"])], labels[i, :len(r["ids"])], att[i, :len(r["ids"])] = r["ids"], r["labels"], 1
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def summed_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    return nll, int((targets != -100).sum())


def train_sft(model: torch.nn.Module, records: list, steps: int, distributed: bool) -> list[float]:
    """AdamW + grad clipping on the same records every step; token-mean loss over the global batch.
    Returns the global token-mean loss of each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    losses = []
    for _ in range(steps):
        local = D.shard(records) if distributed else records
        nll, n_local = summed_nll(model, collate(list(local)))
        # DDP averages gradients over W ranks: W·Σ_local/N_global makes the average Σ_all/N_global.
        n_global = D.global_count(n_local) if distributed else n_local
        scale = D.world_size() if distributed else 1
        loss = nll * scale / max(n_global, 1)
        total = loss.detach().double().clone()
        losses.append((D.all_reduce_sum(total) if distributed else total).item() / scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return losses


def sft_case(wrap: str) -> dict:
    records, steps = sft_batch(), 3
    model = tiny_llama()
    wrapped = D.wrap_ddp(model) if wrap == "ddp" else FS.wrap_fsdp2(model)
    train_sft(wrapped, records, steps, distributed=True)
    if wrap == "fsdp2":  # gather the DTensor shards into full tensors on every rank
        state = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    else:
        state = {k: v.detach().clone() for k, v in D.unwrap(wrapped).state_dict().items()}
    out: dict = {"state": state}
    if wrap == "fsdp2":  # bf16 compute (MixedPrecisionPolicy) on a float32 model: works on CPU/gloo
        bf16 = FS.wrap_fsdp2(tiny_llama(dtype=torch.float32), mixed_precision_bf16=True)
        out["bf16_losses"] = train_sft(bf16, records, steps, distributed=True)
        out["bf16_param_dtype"] = next(bf16.parameters()).dtype
        out["fp32_losses"] = train_sft(FS.wrap_fsdp2(tiny_llama(dtype=torch.float32)), records, steps, True)
    if D.is_main():
        ref = tiny_llama()
        out["ref_losses"] = train_sft(ref, records, steps, distributed=False)
        out["ref_state"] = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        out["init_state"] = tiny_llama().state_dict()
    return out


# --------------------------------------------------------------------------- PPO minibatch gradient


def ppo_experience(policy, gen: torch.Generator):
    from rlhf_core.ppo.experience import Experience
    from rlhf_core.ppo.policy import response_logprobs
    lq = 4
    query_ids = torch.randint(1, 64, (B, lq), generator=gen)
    query_mask = torch.ones(B, lq, dtype=torch.bool)
    query_mask[0, :2] = False  # left padding
    query_mask[3, :1] = False
    response_ids = torch.randint(1, 64, (B, T), generator=gen)
    mask = right_padded_mask(gen, B, T)
    with torch.no_grad():
        logprobs, values, _ = response_logprobs(policy, query_ids, query_mask, response_ids, mask,
                                                backend="torch", with_values=True)
    noise = lambda: torch.randn(B, T, generator=gen) * mask  # noqa: E731
    return Experience(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, mask=mask,
                      logprobs=logprobs + 0.3 * noise(), ref_logprobs=logprobs + 0.3 * noise(),
                      scores=torch.randn(B, generator=gen),
                      values=values + 0.5 * noise(), advantages=noise(), returns=noise(),
                      kl_coef=torch.rand(B, generator=gen))


def ppo_grads(policy, exp, weight: float) -> dict[str, torch.Tensor]:
    from rlhf_core.ppo.policy import response_logprobs
    from rlhf_core.ppo.trainer import ppo_loss
    from rlhf_core.config import PPOConfig
    cfg = PPOConfig(clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, ent_coef=0.01)
    policy.zero_grad(set_to_none=True)
    logprobs, values, entropy = response_logprobs(policy, exp.query_ids, exp.query_mask, exp.response_ids, exp.mask,
                                                  backend="torch", with_values=True, with_entropy=True)
    loss, _ = ppo_loss(logprobs=logprobs, values=values, entropy=entropy, exp=exp, config=cfg)
    (loss * weight).backward()
    params = policy.trainable_parameters()
    D.all_reduce_gradients(params)  # Σ_r of n_r/N·∇loss_r = ∇(token-mean over the global minibatch)
    return {n: p.grad.detach().clone() for n, p in policy.named_parameters()
            if p.requires_grad and not n.startswith("ref_model.")}


def case_ppo() -> dict:
    from rlhf_core.ppo.policy import PolicyWithValue
    policy = PolicyWithValue(tiny_llama())
    exp = ppo_experience(policy, torch.Generator().manual_seed(5))
    start, end = D.shard_bounds(len(exp), D.rank(), D.world_size())
    local = exp.index(slice(start, end))
    n_global = D.global_count(int(local.mask.sum()))
    out: dict = {"grads": ppo_grads(policy, local, float(local.mask.sum()) / n_global)}
    if D.is_main():
        out["ref_grads"] = ppo_grads_single(policy, exp)
    return out


def ppo_grads_single(policy, exp) -> dict[str, torch.Tensor]:
    """The reference: the whole minibatch in one process (all_reduce_gradients skipped)."""
    real = D.all_reduce_gradients
    D.all_reduce_gradients = lambda params: None
    try:
        return ppo_grads(policy, exp, 1.0)
    finally:
        D.all_reduce_gradients = real


def single_process():
    """Context: every distributed helper behaves as in one process (rank 0's reference run)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        real = D.is_initialized
        D.is_initialized = lambda: False
        try:
            yield
        finally:
            D.is_initialized = real
    return ctx()


def case_ppo_trainer() -> dict:
    """PPOTrainer.minibatch_step (micro-batches of 2) on a 4/3 row split vs the whole minibatch."""
    from rlhf_core.config import PPOConfig, TinyModelConfig
    from rlhf_core.testing import tiny_setup
    from rlhf_core.ppo.policy import PolicyWithValue
    from rlhf_core.ppo import experience_maker
    from rlhf_core.ppo.rollout import next_prompt_batch
    from rlhf_core.ppo.trainer import PPOTrainer
    tiny = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    estimator, penalty = os.environ.get("RLHF_TEST_KL", "k1,reward").split(",")  # the KL penalty's placement
    correction = os.environ.get("RLHF_TEST_CORRECTION", "none,token").split(",")  # a rollout correction: name,level
    cfg = PPOConfig(batch_size=8, num_mini_batches=2, micro_batch_size=2, ent_coef=0.01, eval_every=0,
                    kl_estimator=estimator, kl_penalty=penalty,
                    loss_aggregation=os.environ.get("RLHF_TEST_AGG", "token-mean"),
                    rollout_correction=correction[0], rollout_correction_level=correction[1],
                    rollout_correction_threshold=1.2, rollout_correction_low=0.8, rollout_correction_high=1.25)

    def trainer() -> PPOTrainer:
        tok, model, task = tiny_setup(n_prompts=8, n_eval_prompts=1, model_cfg=tiny)
        torch.manual_seed(0)
        policy = PolicyWithValue(model)  # the reference is a copy made here
        with torch.no_grad():  # move the policy off its reference, so the KL and its gradient are not 0
            head = model.get_output_embeddings().weight
            head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(9)) * 0.3)
        return PPOTrainer(cfg, policy, tok, lambda p, r: [0.0] * len(r), task.prompts)

    def grads(t: PPOTrainer) -> dict[str, torch.Tensor]:
        return {n: p.grad.clone() for n, p in t.policy.named_trainable_parameters().items()}

    def prompts(t: PPOTrainer) -> list[str]:  # what step() rolls out on this rank
        batch, _ = next_prompt_batch(t.prompts, t._order, t.cfg.batch_size, t.cfg.group_size, t.shuffle_gen)
        return list(D.shard(batch))

    def corrected(t: PPOTrainer, exp):
        """μ ≠ π_old (π_old + noise): the correction's weights and its metrics reduced over the ranks."""
        if t.correction is None:
            return exp, {}
        noise = torch.randn(full.mask.shape, generator=torch.Generator().manual_seed(11)) * full.mask  # (B, T)
        behavior = exp.logprobs + 0.3 * (noise if exp is full else noise[start:end])
        return experience_maker.apply_rollout_correction(replace(exp, behavior_logprobs=behavior), t.correction, cfg,
                                                         D.global_count, D.global_max)

    t = trainer()
    full = ppo_experience(t.policy, torch.Generator().manual_seed(5))
    start, end = D.shard_bounds(len(full), D.rank(), D.world_size())
    exp, corr = corrected(t, full.index(slice(start, end)))
    stats = t.minibatch_step(exp)
    out: dict = {"grads": grads(t), "stats": stats, "prompts": prompts(t), "correction": corr}
    if D.is_main():
        with single_process():
            ref = trainer()
            exp, out["ref_correction"] = corrected(ref, full)
            out["ref_stats"] = ref.minibatch_step(exp)
            out["ref_grads"] = grads(ref)
            out["ref_prompts"] = prompts(ref)
    return out


def case_ppo_dapo() -> dict:
    """Two PPO iterations on 2 ranks with DAPO's dynamic sampling (a reward flat for half the prompts),
    overlong shaping and filtering, and the gspo loss: every rank must run as many generation rounds
    (no hang), keep whole groups, and end with the same weights."""
    from rlhf_core.config import PPOConfig, TinyModelConfig
    from rlhf_core.testing import tiny_setup
    from rlhf_core.ppo.policy import PolicyWithValue
    from rlhf_core.ppo.trainer import PPOTrainer
    tiny = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    cfg = PPOConfig(batch_size=8, num_mini_batches=1, micro_batch_size=2, eval_every=0, response_length=4,
                    advantage_estimator="grpo", group_size=2, dynamic_sampling=True, dynamic_sampling_max_rounds=4,
                    overlong_buffer=2, overlong_filter=True, policy_loss="gspo", clip_range_low=0.05,
                    clip_range_high=0.06, num_iterations=2)
    tok, model, task = tiny_setup(n_prompts=32, n_eval_prompts=1, model_cfg=tiny)
    torch.manual_seed(0)

    def reward(prompts, responses):  # flat (all 0) for prompts of odd length
        return [float(len(r) % 3 == 0) if len(p) % 2 == 0 else 0.0 for p, r in zip(prompts, responses)]
    t = PPOTrainer(cfg, PolicyWithValue(model, value_model="none"), tok, reward, task.prompts)
    seen = []
    real = t.update
    t.update = lambda buffer: (seen.append(buffer.experience.group_ids.tolist()), real(buffer))[1]
    metrics = [t.step(), t.step()]
    return {"metrics": metrics, "group_ids": seen,
            "weights": {k: v.detach().clone() for k, v in t.policy.model.state_dict().items()}}


def case_eval() -> dict:
    """eval_lm_loss and the reward model's evaluate with 7 items in batches of 2 (4 batches: 2 + 2
    per rank), against the same calls in one process; forwards counted per rank."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from rlhf_core.phases.common import eval_lm_loss
    from rlhf_core.phases.reward_model import evaluate
    records = sft_batch(n=7)
    lm = tiny_llama(dtype=torch.float32)
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4, num_labels=1,
                                                    pad_token_id=0))
    calls = []
    for m in (lm, rm):
        m.register_forward_hook(lambda *_: calls.append(1))
    pairs = [(records[i]["ids"].tolist(), records[(i + 3) % 7]["ids"].tolist()) for i in range(7)]
    gold = [True, False, None, True, True, False, True]

    def run() -> tuple:
        calls.clear()
        loss = eval_lm_loss(lm, 7, 2, lambda idx: collate([records[i] for i in idx]))
        return loss, evaluate(rm, pairs, 0, 2, gold), len(calls)

    loss, metrics, n_calls = run()
    out: dict = {"loss": loss, "metrics": metrics, "calls": n_calls}
    if D.is_main():
        with single_process():
            out["ref_loss"], out["ref_metrics"], out["ref_calls"] = run()
    return out


def case_ppo_fsdp2() -> dict:
    """Two PPO iterations of a 2-rank trainer with parallel='fsdp2' against the same with 'ddp'
    (equal to one process: case_ppo_trainer), from the same weights and seeds. Sampling is
    patched to emit EOS a quarter of the time, so the ranks finish generating at different steps
    (the sharded run must keep both ranks stepping together). Then the sharded policy is gathered
    and saved by rank 0."""
    from rlhf_core.config import PPOConfig, TinyModelConfig
    from rlhf_core.phases.ppo import save_policy
    from rlhf_core.testing import tiny_setup
    from rlhf_core.ppo import experience_maker, rollout
    from rlhf_core.ppo.policy import PolicyWithValue
    from rlhf_core.ppo.trainer import PPOTrainer
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    base = dict(batch_size=8, num_mini_batches=2, micro_batch_size=2, ppo_epochs=2, response_length=10,
                learning_rate=3e-3, max_grad_norm=0.5, eval_every=0, seed=3)
    real_sample = rollout.sample_next

    def eos_often(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, greedy=False):
        tok = real_sample(logits, temperature, top_k, top_p, generator, greedy)
        u = torch.rand(tok.shape, generator=generator, device=tok.device)
        return torch.where(u < 0.25, torch.full_like(tok, eos), tok)
    rollout.sample_next = eos_often

    def run(parallel: str, mixed_precision: str = "no", shard_reference: bool = False, **extra
            ) -> tuple[PPOTrainer, list[dict], list[int]]:
        tok, model, task = tiny_setup(n_prompts=16, n_eval_prompts=1, model_cfg=tiny)
        torch.manual_seed(0)
        cfg = PPOConfig(**base, parallel=parallel, mixed_precision=mixed_precision, shard_reference=shard_reference,
                        **extra)
        t = PPOTrainer(cfg, PolicyWithValue(model), tok,
                       lambda p, r: [len(x) / 10.0 for x in r], task.prompts)
        lengths = []
        real_generate = experience_maker.generate

        def spy(*a, **k):
            out = real_generate(*a, **k)
            lengths.append(out[0].shape[1])
            return out
        experience_maker.generate = spy  # make_experience generates
        try:
            metrics = [t.step(), t.step()]
        finally:
            experience_maker.generate = real_generate
        return t, metrics, lengths

    tok_probe, _, _ = tiny_setup(n_prompts=1, n_eval_prompts=1, model_cfg=tiny)
    eos = tok_probe.eos_token_id
    ddp, ddp_metrics, ddp_lengths = run("ddp")
    fsdp, fsdp_metrics, fsdp_lengths = run("fsdp2")
    bf16, bf16_metrics, _ = run("fsdp2", "bf16")
    # the policy's logprobs from a full forward (not the sampling loop's states): at iteration 1 the
    # reference must compute exactly what the bf16 policy computes
    _, bf16_forward_metrics, _ = run("fsdp2", "bf16", rollout_logprobs=False)
    ref_sharded, ref_sharded_metrics, _ = run("fsdp2", shard_reference=True)
    full = FS.full_state_dict(fsdp.policy.model)  # every rank
    out: dict = {"ddp_lengths": ddp_lengths, "fsdp_lengths": fsdp_lengths, "sharded": fsdp.sharded,
                 "ddp_metrics": ddp_metrics, "fsdp_metrics": fsdp_metrics, "bf16_metrics": bf16_metrics,
                 "bf16_forward_metrics": bf16_forward_metrics,
                 "bf16_dtypes": sorted({str(p.dtype) for p in bf16.params}),
                 "ref_sharded": FS.is_sharded(ref_sharded.policy.ref_model), "ref_sharded_metrics": ref_sharded_metrics,
                 "ref_sharded_weights": {k: v.clone() for k, v in FS.full_state_dict(ref_sharded.policy.model).items()},
                 "ddp_weights": {k: v.detach().clone() for k, v in ddp.policy.model.state_dict().items()},
                 "value_head": {k: v.detach().clone() for k, v in fsdp.policy.value_head.state_dict().items()},
                 "ddp_value_head": {k: v.detach().clone() for k, v in ddp.policy.value_head.state_dict().items()}}
    if D.is_main():
        out["fsdp_weights"] = {k: v.clone() for k, v in full.items()}
        save_policy(fsdp.policy, tok_probe, Path(os.environ["RLHF_TEST_OUT"]) / "saved", state_dict=full)
    rollout.sample_next = real_sample
    return out


CASES = {"whiten": case_whiten, "ppo_fsdp2": case_ppo_fsdp2, "ddp_sft": lambda: sft_case("ddp"), "fsdp2_sft": lambda: sft_case("fsdp2"),
         "ppo": case_ppo, "ppo_trainer": case_ppo_trainer, "eval": case_eval, "ppo_dapo": case_ppo_dapo}

if __name__ == "__main__":
    case, out_dir = sys.argv[1], sys.argv[2]
    os.environ["RLHF_TEST_OUT"] = out_dir
    D.init_from_env()
    try:
        result = CASES[case]()
        result["world_size"] = D.world_size()
        torch.save(result, os.path.join(out_dir, f"rank{D.rank()}.pt"))
    finally:
        D.barrier()
        if D.is_initialized():
            import torch.distributed as dist
            dist.destroy_process_group()
    # skip interpreter finalization: gloo threads torn down there abort now and then (rlhf_core/cli.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
