"""rlhf_core.distributed: 2 gloo ranks via torchrun equal one process on the concatenated batch.

Each 2-rank case launches ``python -m torch.distributed.run --standalone --nproc_per_node 2
worker.py CASE OUT`` (``--standalone`` picks a free port), then compares what the ranks saved.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_core import distributed as D, fsdp
from rlhf_core.ppo.advantages import masked_whiten
from rlhf_core.ppo.losses import explained_variance

WORKER = Path(__file__).with_name("worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_ranks(case: str, tmp_path: Path, nproc: int = 2, **env_vars: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env_vars}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), case, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


# --------------------------------------------------------------------------- single process


def test_shard_is_contiguous_balanced_and_covers_the_batch():
    items = list(range(11))
    for world in (1, 2, 3, 4, 11, 13):
        parts = [list(D.shard(items, r, world)) for r in range(world)]
        assert sum(parts, []) == items  # union in rank order = the global batch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert D.shard(items, 1, 2) == [6, 7, 8, 9, 10]
    assert torch.equal(D.shard(torch.arange(5), 0, 2), torch.arange(3))
    with pytest.raises(ValueError):
        D.shard(items, 2, 2)


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_from_env() is False
    assert (D.rank(), D.world_size(), D.is_main()) == (0, 1, True)
    D.barrier()
    model = torch.nn.Linear(3, 2)
    assert D.wrap_ddp(model) is model and fsdp.wrap_fsdp2(model) is model and D.unwrap(model) is model
    assert D.reduce_metrics({"a": 2.0}, {"a": 5}) == {"a": 2.0}
    assert D.global_count(7) == 7.0
    x = torch.randn(4, 5, dtype=torch.float64)
    mask = torch.arange(5).expand(4, 5) < torch.tensor([[5], [2], [0], [3]])
    assert torch.equal(masked_whiten(x, mask, moments=D.global_masked_moments), masked_whiten(x, mask))


def test_init_from_env_needs_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(D.DistributedError, match="torchrun"):
        D.init_from_env()


@pytest.mark.parametrize("fields, needle", [
    ({"parallel": "zero3"}, "sft.parallel='zero3': expected 'ddp' or 'fsdp2'"),
    ({"mixed_precision": "fp16", "parallel": "fsdp2"}, "sft.mixed_precision='fp16': expected 'no' or 'bf16'"),
    ({"parallel": "fsdp2", "mode": "lora"}, "sft.parallel='fsdp2': expected 'ddp' with LoRA/QLoRA"),
])
def test_parallel_options_are_checked_with_one_line(fields, needle):
    from rlhf_core.config import SFTConfig
    from rlhf_core.errors import ConfigError
    SFTConfig(parallel="fsdp2", mixed_precision="bf16").validate()  # the valid combinations
    SFTConfig(mixed_precision="bf16").validate()  # bf16 on one device (autocast, rlhf_core/precision.py)
    with pytest.raises(ConfigError) as err:
        SFTConfig(**fields).validate()
    assert needle in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- 2 gloo ranks


def test_global_whitening_equals_masked_whiten_on_the_concatenated_batch(tmp_path):
    r0, r1 = run_ranks("whiten", tmp_path)
    x, mask = r0["x"], r0["mask"]  # (7, 6) float64, NaN in padding; rank 0 holds 4 rows, rank 1 3
    for key, shift in (("white", True), ("white_noshift", False)):
        got = torch.cat([r0[key], r1[key]])
        torch.testing.assert_close(got, masked_whiten(x, mask, shift_mean=shift), rtol=0, atol=1e-12)
    valid = x[mask]
    torch.testing.assert_close(r0["mean"], valid.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(r1["var"], valid.var(unbiased=False), rtol=0, atol=1e-12)
    assert r0["count"] == r1["count"] == float(mask.sum())
    # "a" weighted by rows (4 on rank 0 with value 1, 3 on rank 1 with value 2), "b" a plain mean
    assert r0["metrics"] == r1["metrics"] == pytest.approx({"a": (4 * 1 + 3 * 2) / 7, "b": 5.0})
    assert r0["shard"] + r1["shard"] == list(range(11))
    # explained variance with the global variances = that of the concatenated batch (the trainer's metric)
    full = explained_variance(r0["values"], x, mask)
    assert 0.1 < float(full) < 0.99
    torch.testing.assert_close(r0["ev"], full, rtol=0, atol=1e-12)
    torch.testing.assert_close(r1["ev"], full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["ddp_sft", "fsdp2_sft"])
def test_data_parallel_sft_equals_single_process_on_the_global_batch(tmp_path, case):
    """3 AdamW steps, each rank half of 6 records, loss W·Σ_local nll / N_global (float64)."""
    r0, r1 = run_ranks(case, tmp_path)
    assert r0["world_size"] == 2
    for name, ref in r0["ref_state"].items():
        assert not torch.equal(ref, r0["init_state"][name]) or "norm" in name  # training moved it
        torch.testing.assert_close(r0["state"][name], ref, rtol=0, atol=1e-10, msg=name)
        torch.testing.assert_close(r1["state"][name], ref, rtol=0, atol=1e-10, msg=name)
    if case == "fsdp2_sft":  # bf16 mixed precision: fp32 master weights, losses within bf16 rounding
        assert r0["bf16_param_dtype"] == torch.float32
        fp32, bf16 = torch.tensor(r0["fp32_losses"]), torch.tensor(r0["bf16_losses"])
        torch.testing.assert_close(fp32, torch.tensor(r0["ref_losses"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=0)
        assert (bf16 - fp32).abs().max() > 1e-6  # the forward really ran in bf16
        assert r0["bf16_losses"] == r1["bf16_losses"]  # the global loss, identical on both ranks


def test_ppo_minibatch_gradient_equals_single_process(tmp_path):
    """policy + value + entropy loss, token-mean over the global minibatch, rows split 4/3."""
    r0, r1 = run_ranks("ppo", tmp_path)
    assert r0["grads"].keys() == r0["ref_grads"].keys()
    for name, ref in r0["ref_grads"].items():
        for r in (r0, r1):
            torch.testing.assert_close(r["grads"][name], ref, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kl, aggregation", [("k1,reward", "token-mean"), ("k3,loss", "token-mean"),
                                             ("exact,both", "token-mean"), ("k3,loss", "seq-mean-token-mean"),
                                             ("k1,reward", "seq-mean-token-sum-norm")])
def test_ppo_trainer_minibatch_step_on_two_ranks_equals_one_process(tmp_path, kl, aggregation):
    """The wired PPOTrainer: each rank's share of the aggregation's units + gradient all-reduce + reduced
    stats; prompts sharded. With the KL penalty in the loss (k3; the exact KL through kernels.fused_kl's
    backward) too, and with the per-sequence aggregations (rows 4/3 of uneven lengths)."""
    r0, r1 = run_ranks("ppo_trainer", tmp_path, RLHF_TEST_KL=kl, RLHF_TEST_AGG=aggregation)
    for name, ref in r0["ref_grads"].items():
        for r in (r0, r1):
            torch.testing.assert_close(r["grads"][name], ref, rtol=1e-5, atol=1e-7, msg=name)
    keys = ["loss/policy", "loss/value", "policy/entropy", "policy/approx_kl", "policy/grad_norm"]
    for key in keys + (["loss/kl"] if not kl.endswith("reward") else []):
        assert r0["stats"][key] == r1["stats"][key] == pytest.approx(r0["ref_stats"][key], rel=1e-5, abs=1e-7)
    if not kl.endswith("reward"):
        assert r0["ref_stats"]["loss/kl"] > 0.01  # a real KL term, not two zeros that agree
    assert r0["prompts"] + r1["prompts"] == r0["ref_prompts"]  # contiguous shards of the global batch


@pytest.mark.parametrize("correction", ["tis,token", "mis,sequence", "icepop,token"])
def test_rollout_correction_on_two_ranks_equals_one_process(tmp_path, correction):
    """μ ≠ π_old: each rank weighs its rows (per token, or per row at sequence level), the correction's metrics are
    sums, counts and maxima over both ranks, and the micro-batched gradient equals the one-process minibatch's."""
    r0, r1 = run_ranks("ppo_trainer", tmp_path, RLHF_TEST_CORRECTION=correction)
    for name, ref in r0["ref_grads"].items():
        for r in (r0, r1):
            torch.testing.assert_close(r["grads"][name], ref, rtol=1e-5, atol=1e-7, msg=name)
    ref = r0["ref_correction"]
    assert set(ref) >= {"check/logprob_gap", "check/logprob_gap_max", "correction/weight_mean",
                        "correction/ratio_min", "correction/ratio_max", "correction/masked_fraction"}
    assert r0["correction"] == r1["correction"] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    changed = ref["correction/truncated_fraction" if correction.startswith("tis") else "correction/masked_fraction"]
    assert 0 < changed < 1 and ref["check/logprob_gap"] > 0.05
    for key in ("loss/policy", "policy/approx_kl", "policy/grad_norm"):
        assert r0["stats"][key] == r1["stats"][key] == pytest.approx(r0["ref_stats"][key], rel=1e-5, abs=1e-7)


def test_dapo_terms_under_torchrun_keep_the_ranks_in_step(tmp_path):
    """Dynamic sampling refills each rank's share in the same number of rounds on every rank (generation,
    scoring and the reductions stay collective), each rank keeps whole groups, and the replicas agree."""
    r0, r1 = run_ranks("ppo_dapo", tmp_path)
    for m0, m1 in zip(r0["metrics"], r1["metrics"]):
        assert m0 == m1  # reduced metrics, identical on both ranks
    assert sum(m["dynamic/dropped_groups"] for m in r0["metrics"]) > 0
    for r in (r0, r1):
        for ids in r["group_ids"]:
            assert len(ids) == 4 and all(ids.count(i) == 2 for i in ids)
    for name, w in r0["weights"].items():
        torch.testing.assert_close(r1["weights"][name], w, rtol=0, atol=0, msg=name)


def test_sharded_evaluation_equals_one_process_exactly(tmp_path):
    """LM loss and reward-model metrics: each rank runs 2 of the 4 batches (7 items), the gathered
    result is bitwise the one-process value on both ranks."""
    r0, r1 = run_ranks("eval", tmp_path)
    assert r0["ref_calls"] == 8 and r0["calls"] == r1["calls"] == 4  # 4 LM + 4 RM forwards in one process
    assert r0["loss"] == r1["loss"] == r0["ref_loss"]
    assert r0["metrics"] == r1["metrics"] == r0["ref_metrics"]
    assert set(r0["metrics"]) == {"loss", "accuracy_labels", "margin", "accuracy_gold"}


def test_device_preference_resolves_per_rank(monkeypatch):
    assert D.device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.device() == D.device("auto") == torch.device("cpu")
    with pytest.raises(D.DistributedError, match="device='cuda' but torch.cuda.is_available"):
        D.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.device("auto") == D.device("cuda") == torch.device("cuda", 1)  # torchrun's local rank
    assert D.device("cpu") == torch.device("cpu")  # asked for, even with a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # 2 ranks, 1 GPU (gloo smoke): shared
    assert D.device() == torch.device("cuda", 0)


def test_ppo_fsdp2_trains_like_ddp_and_saves_the_gathered_policy(tmp_path):
    """parallel='fsdp2': blocks + trunk sharded, gradients reduce-scattered as a sum, lm_head and
    value head replicated; two iterations equal the DDP trainer's (itself equal to one process)."""
    from transformers import AutoModelForCausalLM
    r0, r1 = run_ranks("ppo_fsdp2", tmp_path)
    assert r0["sharded"] and r1["sharded"]
    # the ranks stopped sampling at different steps under DDP; FSDP2 kept both going to the longer
    assert any(a != b for a, b in zip(r0["ddp_lengths"], r1["ddp_lengths"])), (r0["ddp_lengths"], r1["ddp_lengths"])
    for i in range(2):
        assert r0["fsdp_lengths"][i] == r1["fsdp_lengths"][i] == max(r0["ddp_lengths"][i], r1["ddp_lengths"][i])
    for key in ("loss/policy", "loss/value", "objective/scores", "objective/kl", "policy/grad_norm"):
        for m_ddp, m_fsdp in zip(r0["ddp_metrics"], r0["fsdp_metrics"]):
            assert m_fsdp[key] == pytest.approx(m_ddp[key], rel=1e-4, abs=1e-6), key
    for name, ddp in r0["ddp_weights"].items():
        torch.testing.assert_close(r0["fsdp_weights"][name], ddp, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(r1["ddp_weights"][name], ddp, rtol=0, atol=0, msg=name)  # DDP replicas agree
    # shard_reference: the reference's trunk sharded too (its forward a collective): same training
    assert r0["ref_sharded"] and r1["ref_sharded"]
    for m_ddp, m_ref in zip(r0["ddp_metrics"], r0["ref_sharded_metrics"]):
        assert m_ref["objective/kl"] == pytest.approx(m_ddp["objective/kl"], rel=1e-4, abs=1e-6)
    for name, ddp in r0["ddp_weights"].items():
        torch.testing.assert_close(r0["ref_sharded_weights"][name], ddp, rtol=1e-4, atol=1e-6, msg=name)
    for r in (r0, r1):
        for name, v in r["ddp_value_head"].items():
            torch.testing.assert_close(r["value_head"][name], v, rtol=1e-4, atol=1e-6, msg=name)
    # bf16 compute (MixedPrecisionPolicy) keeps fp32 parameters and optimizer state, and trains
    assert r0["bf16_dtypes"] == ["torch.float32"]
    assert r0["bf16_metrics"][0]["loss/value"] != r0["fsdp_metrics"][0]["loss/value"]  # bf16 did compute
    for m in r0["bf16_metrics"]:
        assert all(math.isfinite(v) for v in m.values()) and m["policy/grad_norm"] > 0
    # the replicated reference computes in the policy's bf16: at iteration 1 (same weights) the policy's
    # full forward and the reference's agree exactly (the fp32 reference before gave 5.4e-7 exact, 1.3e-4 k1)
    first = r0["bf16_forward_metrics"][0]
    assert first["objective/kl_exact"] == first["objective/kl_k1"] == 0.0
    assert r0["bf16_forward_metrics"][1]["objective/kl_exact"] > 1e-4  # and the KL is live once π moves
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, v in saved.state_dict().items():
        torch.testing.assert_close(v, r0["fsdp_weights"][name], rtol=0, atol=0, msg=name)
