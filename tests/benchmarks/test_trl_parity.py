"""Parity with TRL 1.12's PPO on one fixed rollout batch: where we agree, and where we differ on purpose.

TRL computes everything inline in ``PPOTrainer.train()``, so its formulas cannot be called
alone. ``trl_rollout_math`` / ``trl_losses`` below are line-by-line transcriptions of the
installed ``trl==1.12.0`` file ``trl/experimental/ppo/ppo_trainer.py`` (line numbers cited),
kept here for testing only. They run without trl installed, so CI exercises the comparison;
with trl installed, extra tests check that the cited lines still read as transcribed, that
TRL's own helpers agree with ours, and run TRL to show its zero-slot metric bug (#7012).

Intentional differences, asserted exactly:
(a) TRL adds the score at ``sequence_length + 1`` — the first pad *after* the EOS (#1893,
    #3750) — and its value loss covers that pad too; we use the EOS. Extending our mask by one
    position reproduces TRL's rewards, advantages, returns and value loss.
(b) TRL whitens advantages with the unbiased (n−1) variance; we use the population variance.
(c) TRL's logged ``approxkl`` is ½·mean(Δ²) over *all* positions, padding included; ours is the
    masked mean of k3.
(d) TRL averages per-micro-batch stats over a (epochs, mini-batches, grad-accum) array whose
    slots are not all written when num_mini_batches > 1 and gradient_accumulation_steps > 1
    (#7012): the zeros pull ``val/ratio`` to 1/num_mini_batches.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_core.ppo import (approx_kl, compute_gae, kl_penalized_rewards, masked_whiten, policy_loss,
                           value_loss)



def _trl_available() -> bool:
    """find_spec, not import: importing trl costs seconds at collection time."""
    try:
        return importlib.util.find_spec("trl") is not None
    except (ImportError, ValueError):
        return False


HAS_TRL = _trl_available()
needs_trl = pytest.mark.skipif(not HAS_TRL, reason="trl==1.12.0 not installed (pip install -c constraints.txt -e .[bench])")

PAD, EOS = 0, 1
T = 8
EOS_AT = [2, 5, 6, 7, None, 0]  # EOS mid-row, at T-2, at T-1 (last slot), none (truncated), first token
HP = dict(kl_coef=0.05, gamma=0.99, lam=0.95, cliprange=0.2, cliprange_value=0.2)
TOL = dict(rtol=1e-10, atol=1e-12)  # float64 fixtures: the two implementations agree to rounding

# ----------------------------------------------------------------------------------------------
# The transcription (trl==1.12.0, trl/experimental/ppo/ppo_trainer.py unless noted)
# ----------------------------------------------------------------------------------------------
INVALID_LOGPROB = 1.0  # line 69


def trl_first_true_indices(bools):  # trl/experimental/utils.py lines 741-743
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).type(torch.long) + torch.arange(row_len, dtype=torch.long, device=bools.device)
    return torch.min(zero_or_index, dim=-1).values


def trl_masked_mean(values, mask):  # lines 237-242 (axis=None branch)
    return (values * mask).sum() / mask.sum()


def trl_masked_whiten(values, mask, shift_mean=True):  # lines 245-270 (masked_var unbiased=True)
    mean = trl_masked_mean(values, mask)
    variance = trl_masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_truncate_response(stop_token_id, pad_token_id, responses):  # lines 184-188
    trunc_idxs = trl_first_true_indices(responses == stop_token_id).unsqueeze(-1)
    idxs = torch.arange(responses.shape[1], device=responses.device).view(1, responses.shape[1])
    return torch.masked_fill(responses, idxs > trunc_idxs, pad_token_id)


def trl_rollout_math(responses, logprobs, ref_logprobs, values, scores, kl_estimator, hp=HP):
    """Lines 721-723, 727, 763-799: masks, KL, per-token rewards, GAE, returns, whitening."""
    postprocessed_responses = trl_truncate_response(EOS, PAD, responses)
    sequence_lengths = trl_first_true_indices(postprocessed_responses == PAD) - 1  # line 727
    response_idxs = torch.arange(responses.shape[1]).repeat(responses.shape[0], 1)  # line 763
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)  # line 769
    logr = ref_logprobs - logprobs  # line 773
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -hp["kl_coef"] * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores  # line 779
    lastgaelam = 0  # lines 787-795
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + hp["gamma"] * nextvalues - values[:, t]
        lastgaelam = delta + hp["gamma"] * hp["lam"] * lastgaelam
        advantages_reversed.append(lastgaelam)
    raw_advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = raw_advantages + values  # line 796
    advantages = trl_masked_whiten(raw_advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)  # line 798
    return dict(padding_mask=padding_mask, padding_mask_p1=padding_mask_p1, logprobs=logprobs, values=values,
                kl=kl, rewards=rewards, raw_advantages=raw_advantages, returns=returns, advantages=advantages)


def trl_losses(new_logprobs, vpred, mb_logprobs, mb_values, mb_return, mb_advantage, padding_mask,
               padding_mask_p1, hp=HP):
    """Lines 824-857 (one micro-batch = the whole batch): value loss, policy loss, stats."""
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, mb_values - hp["cliprange_value"], mb_values + hp["cliprange_value"])
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss = 0.5 * trl_masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - hp["cliprange"], 1.0 + hp["cliprange"])
    pg_loss = trl_masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    approxkl = 0.5 * (logprobs_diff**2).mean()
    return dict(vf_loss=vf_loss, pg_loss=pg_loss, pg_clipfrac=pg_clipfrac, approxkl=approxkl)


def trl_stats_slots(batch_size, per_device_train_batch_size, gradient_accumulation_steps, num_mini_batches,
                    num_ppo_epochs=1):
    """Lines 463-471, 631-638, 802-869: which (epoch, minibatch, micro) slots the loop writes."""
    local_batch_size = per_device_train_batch_size * gradient_accumulation_steps
    local_mini_batch_size = local_batch_size // num_mini_batches
    ratio_stats = torch.zeros((num_ppo_epochs, num_mini_batches, gradient_accumulation_steps))
    for ppo_epoch_idx in range(num_ppo_epochs):
        minibatch_idx = 0
        for _ in range(0, local_batch_size, local_mini_batch_size):
            gradient_accumulation_idx = 0
            for _ in range(0, local_mini_batch_size, per_device_train_batch_size):
                ratio_stats[ppo_epoch_idx, minibatch_idx, gradient_accumulation_idx] = 1.0  # ratio ≡ 1
                gradient_accumulation_idx += 1
            minibatch_idx += 1
    return ratio_stats


# ----------------------------------------------------------------------------------------------
# One fixed rollout batch
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1234)
    b = len(EOS_AT)
    responses = torch.randint(3, 50, (b, T), generator=g)  # tokens after the EOS are junk, as generate leaves them
    for i, e in enumerate(EOS_AT):
        if e is not None:
            responses[i, e] = EOS
    mask = torch.zeros(b, T, dtype=torch.long)  # ours: 1 through the EOS (inclusive)
    for i, e in enumerate(EOS_AT):
        mask[i, : T if e is None else e + 1] = 1
    rnd = lambda: torch.randn(b, T, generator=g, dtype=torch.float64)  # noqa: E731
    logprobs = -rnd().abs() - 0.1
    return dict(responses=responses, mask=mask, logprobs=logprobs, ref_logprobs=logprobs + 0.3 * rnd(),
                values=rnd(), scores=torch.randn(b, generator=g, dtype=torch.float64),
                new_logprobs=logprobs + 0.25 * rnd(), vpred=rnd())


def extend_one_past_eos(mask):
    """TRL's ~padding_mask_p1: our mask plus the position after the EOS (when it exists)."""
    p1 = mask.clone()
    p1[:, 1:] |= mask[:, :-1]
    return p1


def ours(batch, mask, kl_estimator):
    """Our functional core on the batch with ``mask``; rollout tensors are 0 off the mask, as ours produces.

    Logprobs stay 0 past the EOS even when ``mask`` covers the pad after it: there is no sampled
    token there, so its KL is 0 (TRL's INVALID_LOGPROB on both sides gives the same 0).
    """
    lp, ref = batch["logprobs"] * batch["mask"], batch["ref_logprobs"] * batch["mask"]
    values = batch["values"] * mask
    rewards, kl = kl_penalized_rewards(batch["scores"], lp, ref, mask, HP["kl_coef"], kl_estimator)
    adv, returns = compute_gae(rewards, values, mask, HP["gamma"], HP["lam"])
    return dict(kl=kl, rewards=rewards, raw_advantages=adv, returns=returns, values=values)


# ----------------------------------------------------------------------------------------------
# Tests that need only torch (run in CI)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_kl_agrees(batch, kl_estimator):
    trl = trl_rollout_math(batch["responses"], batch["logprobs"], batch["ref_logprobs"], batch["values"],
                           batch["scores"], kl_estimator)
    mask = batch["mask"]
    assert torch.equal(~trl["padding_mask"], mask.bool())  # same notion of a valid token
    ours_kl = approx_kl(batch["logprobs"], batch["ref_logprobs"], kl_estimator)
    torch.testing.assert_close(ours_kl[mask.bool()], trl["kl"][mask.bool()], **TOL)
    assert torch.all(trl["kl"][~mask.bool()] == 0)  # INVALID_LOGPROB on both sides: log r = 0
    torch.testing.assert_close(ours(batch, mask, kl_estimator)["kl"], trl["kl"], **TOL)


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_score_position_differs_by_exactly_one_pad(batch, kl_estimator):
    """(a) TRL pays the score one slot after the EOS unless the EOS is in the last slot."""
    trl = trl_rollout_math(batch["responses"], batch["logprobs"], batch["ref_logprobs"], batch["values"],
                           batch["scores"], kl_estimator)
    got = ours(batch, batch["mask"], kl_estimator)
    expected_shift = torch.zeros(len(EOS_AT), T, dtype=torch.float64)
    for i, e in enumerate(EOS_AT):
        if e is not None and e < T - 1:  # EOS with a pad after it
            expected_shift[i, e] -= batch["scores"][i]
            expected_shift[i, e + 1] += batch["scores"][i]
    torch.testing.assert_close(trl["rewards"] - got["rewards"], expected_shift, **TOL)
    same_rows = [i for i, e in enumerate(EOS_AT) if e is None or e == T - 1]
    # Where the score lands on the same token, GAE and returns agree row for row.
    torch.testing.assert_close(got["raw_advantages"][same_rows], trl["raw_advantages"][same_rows], **TOL)
    torch.testing.assert_close(got["returns"][same_rows], trl["returns"][same_rows], **TOL)


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_shifted_mask_reproduces_trl(batch, kl_estimator):
    """(a) + (b): ours on TRL's one-past-EOS mask gives TRL's rewards, advantages, returns."""
    trl = trl_rollout_math(batch["responses"], batch["logprobs"], batch["ref_logprobs"], batch["values"],
                           batch["scores"], kl_estimator)
    mask_p1 = extend_one_past_eos(batch["mask"])
    assert torch.equal(mask_p1.bool(), ~trl["padding_mask_p1"])
    got = ours(batch, mask_p1, kl_estimator)
    for key in ("rewards", "raw_advantages", "returns", "values"):
        torch.testing.assert_close(got[key], trl[key], **TOL, msg=key)
    # (b) whitening over the response tokens: TRL divides by the unbiased std, we by the population std.
    valid = batch["mask"].bool()
    x = got["raw_advantages"][valid]
    n = x.numel()
    var_pop = ((x - x.mean()) ** 2).mean()
    var_unb = var_pop * n / (n - 1)
    ours_white = masked_whiten(got["raw_advantages"], batch["mask"])
    scale = torch.sqrt((var_pop + 1e-8) / (var_unb + 1e-8))
    torch.testing.assert_close(trl["advantages"], ours_white * scale, **TOL)


def test_losses_agree_and_value_loss_needs_the_extra_pad(batch):
    trl = trl_rollout_math(batch["responses"], batch["logprobs"], batch["ref_logprobs"], batch["values"],
                           batch["scores"], "k1")
    mask, mask_p1 = batch["mask"], extend_one_past_eos(batch["mask"])
    out = trl_losses(batch["new_logprobs"], batch["vpred"], trl["logprobs"], trl["values"], trl["returns"],
                     trl["advantages"], trl["padding_mask"], trl["padding_mask_p1"])
    pg, pg_stats = policy_loss(batch["new_logprobs"] * mask, batch["logprobs"] * mask, trl["advantages"], mask,
                               HP["cliprange"])
    torch.testing.assert_close(pg, out["pg_loss"], **TOL)
    # TRL casts the clip indicator with .float(): float32 rounding of the same fraction.
    torch.testing.assert_close(pg_stats["policy/clipfrac"].float(), out["pg_clipfrac"])
    vpred = batch["vpred"]
    vf_p1, _ = value_loss(vpred, trl["values"], trl["returns"], mask_p1, HP["cliprange_value"])
    torch.testing.assert_close(vf_p1, out["vf_loss"], **TOL)  # same tokens -> same number
    vf_eos, _ = value_loss(vpred, trl["values"], trl["returns"], mask, HP["cliprange_value"])
    assert not torch.isclose(vf_eos, out["vf_loss"])  # TRL also regresses the pad after the EOS
    # (c) TRL's approxkl: ½·Δ² averaged over every slot, padding (Δ = 0 there) included.
    delta = (batch["new_logprobs"] - batch["logprobs"]) * mask
    torch.testing.assert_close(out["approxkl"], 0.5 * (delta**2).sum() / delta.numel(), **TOL)
    k3 = torch.expm1(delta) - delta
    torch.testing.assert_close(pg_stats["policy/approx_kl"], k3[mask.bool()].mean(), **TOL)


@pytest.mark.parametrize("ga,nmb,expected", [(1, 1, 1.0), (1, 2, 1.0), (2, 2, 0.5), (4, 4, 0.25), (4, 2, 0.5)])
def test_trl_stats_average_unwritten_zero_slots(ga, nmb, expected):
    """(d) #7012: with ratio ≡ 1 TRL reports mean(ratio_stats) = written slots / all slots."""
    slots = trl_stats_slots(batch_size=8 * ga, per_device_train_batch_size=8, gradient_accumulation_steps=ga,
                            num_mini_batches=nmb, num_ppo_epochs=2)
    assert slots.mean().item() == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# Tests against the installed trl==1.12.0
# ----------------------------------------------------------------------------------------------
CITED_LINES = {  # line number in ppo_trainer.py -> the code our transcription copies
    69: "INVALID_LOGPROB = 1.0",
    727: "sequence_length = first_true_indices(postprocessed_response == processing_class.pad_token_id) - 1",
    769: "values = torch.masked_fill(values, padding_mask_p1, 0)",
    774: 'kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr',
    778: "actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)",
    779: "rewards[actual_start, actual_end] += scores",
    797: "advantages = masked_whiten(advantages, ~padding_mask)",
    837: "vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1[micro_batch_inds])",
    846: "pg_loss = masked_mean(pg_loss_max, ~padding_mask[micro_batch_inds])",
    857: "approxkl = 0.5 * (logprobs_diff**2).mean()",
    903: 'metrics["val/ratio"] = self.accelerator.gather_for_metrics(ratio_stats).mean().item()',
}


@needs_trl
def test_transcription_cites_the_installed_lines():
    import trl
    if trl.__version__ != "1.12.0":
        pytest.skip(f"transcription is of trl 1.12.0, found {trl.__version__}")
    spec = importlib.util.find_spec("trl.experimental.ppo.ppo_trainer")
    lines = Path(spec.origin).read_text().splitlines()
    for number, code in CITED_LINES.items():
        assert lines[number - 1].split("  #")[0].strip() == code, f"ppo_trainer.py:{number} changed"


@needs_trl
def test_trl_helpers_match_transcription(batch):
    from trl.experimental.ppo import ppo_trainer as trl_ppo
    from trl.experimental.utils import first_true_indices
    resp = batch["responses"]
    assert torch.equal(first_true_indices(resp == EOS), trl_first_true_indices(resp == EOS))
    assert torch.equal(trl_ppo.truncate_response(EOS, PAD, resp), trl_truncate_response(EOS, PAD, resp))
    m = batch["mask"].bool()
    torch.testing.assert_close(trl_ppo.masked_whiten(batch["values"], m), trl_masked_whiten(batch["values"], m), **TOL)


@needs_trl
@pytest.mark.parametrize("ga,nmb,expected", [(1, 2, 1.0), (2, 2, 0.5)])
def test_trl_logs_val_ratio_diluted_by_zero_slots(tmp_path, ga, nmb, expected):
    """(d) run TRL itself: in its first PPO epoch the ratio is 1, yet val/ratio reads 1/nmb when ga > 1."""
    from datasets import Dataset
    from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel,
                              PreTrainedTokenizerFast, TrainerCallback)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    vocab = {"<pad>": 0, "</s>": 1, **{chr(97 + i): 2 + i for i in range(26)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", padding_side="left")
    cfg = GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, pad_token_id=0, eos_token_id=1,
                     num_labels=1)
    torch.manual_seed(0)
    models_ = [GPT2LMHeadModel(cfg), GPT2LMHeadModel(cfg), GPT2ForSequenceClassification(cfg),
               GPT2ForSequenceClassification(cfg)]
    logs = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs_=None, **kw):
            logs.append(kw.get("logs") or logs_)

    args = PPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                     num_sample_generations=0, save_strategy="no", disable_tqdm=True, logging_steps=1,
                     gradient_checkpointing=False, per_device_train_batch_size=2, gradient_accumulation_steps=ga,
                     num_mini_batches=nmb, num_ppo_epochs=1, total_episodes=2 * ga, response_length=4,
                     learning_rate=1e-12)  # a vanishing step keeps the ratio at 1 to float precision
    data = Dataset.from_dict({"input_ids": [[2, 3, 4]] * 8})
    trainer = PPOTrainer(args=args, processing_class=tok, model=models_[0], ref_model=models_[1],
                         reward_model=models_[2], value_model=models_[3], train_dataset=data,
                         eval_dataset=data, callbacks=[Keep()])
    trainer.train()
    ratio = [entry["val/ratio"] for entry in logs if entry and "val/ratio" in entry]
    assert len(ratio) == 1 and ratio[0] == pytest.approx(expected, abs=1e-4)
    assert math.isfinite(ratio[0]) and np.isfinite(expected)
