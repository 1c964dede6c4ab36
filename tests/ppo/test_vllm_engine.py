"""The vLLM rollout engine (rlhf_core/ppo/vllm_engine.py): refusals in one line (these run everywhere), and with
vLLM installed (.venv-vllm, `make vllm-test`) top-1 parity with the torch engine, behavior logprobs against the
trainer's forward before and after an update, LoRA merged weights, and a killed-and-resumed run against an
uninterrupted one, byte for byte."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_core.config import PPOConfig, TinyModelConfig
from rlhf_core.errors import ConfigError
from rlhf_core.ppo import vllm_engine
from rlhf_core.ppo.rollout import encode_prompts, generate, score

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed: make vllm-test runs these in .venv-vllm")
# vLLM's CPU attention has kernels for head sizes 32, 64, ... but not 16 (the tiny preset's 64/4).
TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
ROOT = Path(__file__).resolve().parents[2]
# fp32 both sides, but other kernels (oneDNN GEMMs, vLLM's attention): measured max |Δ| ≈ 2e-6 on this model.
LOGPROB_TOL = 1e-4


def env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", RLHF_NO_PROGRESS="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(ConfigError, match=r"pip install -e \.\[vllm\]") as e:
        vllm_engine.check_settings(PPOConfig(rollout_engine="vllm"))
    assert "\n" not in str(e.value)


def test_the_engine_name_is_checked_and_every_parallel_layout_is_served(monkeypatch):
    with pytest.raises(ConfigError, match="ppo.rollout_engine='vlm': expected 'torch' or 'vllm'"):
        PPOConfig(rollout_engine="vlm").validate()
    monkeypatch.setattr(vllm_engine, "import_vllm", lambda: None)  # as if installed
    for parallel in ("ddp", "fsdp2"):  # one engine per rank; FSDP2 gathers the full weights per sync
        vllm_engine.check_settings(PPOConfig(rollout_engine="vllm", parallel=parallel))
    vllm_engine.check_settings(PPOConfig(parallel="fsdp2"))  # the torch engine: nothing to check


def cli(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_core", "pipeline", "--output-dir", str(out), "--preset", "tiny",
                           *args], capture_output=True, text=True, env=env(), timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--ppo.rollout_engine", "vllm"], "vLLM is not installed" if not HAS_VLLM else "no kernel for the policy's head size 16"),
])
def test_cli_refuses_in_one_line_exit_2_nothing_written(tmp_path, args, message):
    out = tmp_path / "run"
    r = cli(out, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()


@needs_vllm
def test_a_model_vllm_cannot_load_is_named():
    with pytest.raises(ConfigError, match=r"cannot load the policy's architecture \['NoSuchForCausalLM'\]"):
        vllm_engine.check_model(SimpleNamespace(architectures=["NoSuchForCausalLM"], hidden_size=64,
                                                num_attention_heads=2))
    vllm_engine.check_model(SimpleNamespace(architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=2))


@pytest.fixture(scope="module")
def parts():
    from rlhf_core.testing import tiny_setup
    tok, model, task = tiny_setup(n_prompts=16, n_eval_prompts=4, model_cfg=TINY)
    return tok, model, task


def engine_for(model, tok, lora=False, **fields):
    cfg = PPOConfig(**{"response_length": 16, "max_prompt_length": 48, "temperature": 0.7, **fields})
    return vllm_engine.VLLMEngine(model, cfg, tok.eos_token_id, tok.pad_token_id, is_lora=lora), cfg


def policy_logprobs(model, tok, query_ids, query_mask, response_ids, mask, temperature):
    from rlhf_core.ppo.policy import PolicyWithValue
    policy = PolicyWithValue(model, value_model="none")
    return score(policy, query_ids, query_mask, response_ids, mask, None, temperature, reference=False).logprobs


@needs_vllm
def test_top1_tokens_match_the_torch_engine_and_logprobs_match_the_forward(parts):
    tok, model, task = parts
    engine, cfg = engine_for(model, tok)
    from rlhf_core.ppo.policy import CausalLMView
    query_ids, query_mask = encode_prompts(tok, task.prompts[:8], cfg.max_prompt_length)
    ids_v, mask_v, eos_v, _ = engine.generate(query_ids, query_mask, greedy=True)
    ids_t, mask_t, eos_t = generate(CausalLMView(model), query_ids, query_mask, cfg.response_length,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, greedy=True)
    assert torch.equal(ids_v, ids_t) and torch.equal(mask_v, mask_t) and torch.equal(eos_v, eos_t)
    # sampled at the temperature: vLLM's log μ of each token against the trainer's forward on the same tokens
    ids, mask, has_eos, behavior = engine.generate(query_ids, query_mask, torch.Generator().manual_seed(0))
    assert mask.sum() > 0 and ((ids == tok.pad_token_id) | mask.bool()).all()
    assert torch.equal(has_eos, (ids == tok.eos_token_id).any(1))
    ours = policy_logprobs(model, tok, query_ids, query_mask, ids, mask, cfg.temperature)
    assert (behavior[~mask.bool()] == 0).all()
    assert (behavior - ours).abs().max() < LOGPROB_TOL
    # the seeds come from the generator: the same generator state gives the same rollout
    again = engine.generate(query_ids, query_mask, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids) and torch.equal(again[3], behavior)


@needs_vllm
def test_an_update_reaches_the_engine_and_old_weights_bring_the_old_output_back(parts):
    from rlhf_core.ppo.policy import PolicyWithValue
    from rlhf_core.ppo.trainer import PPOTrainer
    tok, model, task = parts
    import copy
    model = copy.deepcopy(model)
    cfg = PPOConfig(rollout_engine="vllm", batch_size=8, num_mini_batches=1, ppo_epochs=1, response_length=8,
                    max_prompt_length=48, learning_rate=3e-2, eval_every=0, num_iterations=1, seed=3)
    trainer = PPOTrainer(cfg, PolicyWithValue(model), tok, lambda p, r: [x.count("e") / max(len(x), 1) for x in r],
                         task.prompts)
    engine = trainer.engine
    query_ids, query_mask = encode_prompts(tok, task.prompts[:8], cfg.max_prompt_length)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    greedy_before = engine.generate(query_ids, query_mask, greedy=True)[0]
    metrics = trainer.step()  # syncs (unchanged weights), samples with vLLM, updates the policy
    assert metrics["check/logprob_gap_max"] < LOGPROB_TOL and "time/weight_sync" in metrics
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    engine.sync(model)
    greedy_after = engine.generate(query_ids, query_mask, greedy=True)[0]
    assert not torch.equal(greedy_before, greedy_after)
    ids, mask, _, behavior = engine.generate(query_ids, query_mask, torch.Generator().manual_seed(1))
    ours = policy_logprobs(model, tok, query_ids, query_mask, ids, mask, cfg.temperature)
    assert (behavior - ours).abs().max() < LOGPROB_TOL
    old = copy.deepcopy(model)
    old.load_state_dict(before)
    engine.sync(old)
    assert torch.equal(engine.generate(query_ids, query_mask, greedy=True)[0], greedy_before)


@needs_vllm
def test_a_compiled_engine_takes_each_sync_too(parts):
    """--ppo.vllm_compile: the torch.compile'd model reads the reloaded weights (not constants frozen at compile
    time): behavior logprobs match the forward of whichever weights were synced last."""
    import copy
    tok, model, task = parts
    engine, cfg = engine_for(model, tok, vllm_compile=True)
    query_ids, query_mask = encode_prompts(tok, task.prompts[:8], cfg.max_prompt_length)

    def gap(synced, other=None):
        ids, mask, _, behavior = engine.generate(query_ids, query_mask, torch.Generator().manual_seed(0))
        lp = policy_logprobs(other or synced, tok, query_ids, query_mask, ids, mask, cfg.temperature)
        return float((behavior - lp).abs().max())
    assert gap(model) < LOGPROB_TOL
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    engine.sync(moved)
    assert gap(moved) < LOGPROB_TOL < 1e-2 < gap(moved, other=model)


@needs_vllm
def test_lora_goes_in_merged_and_the_adapters_stay(parts):
    import copy

    from peft import LoraConfig, get_peft_model
    tok, model, task = parts
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in lora.named_parameters():
        if "lora_B" in n:  # B = 0 at init would make the merge a no-op
            torch.nn.init.normal_(p, std=0.5)
    engine, cfg = engine_for(lora, tok, lora=True)
    query_ids, query_mask = encode_prompts(tok, task.prompts[:8], cfg.max_prompt_length)
    ids, mask, _, behavior = engine.generate(query_ids, query_mask, torch.Generator().manual_seed(2))
    ours = policy_logprobs(lora, tok, query_ids, query_mask, ids, mask, cfg.temperature)
    base = policy_logprobs(model, tok, query_ids, query_mask, ids, mask, cfg.temperature)
    assert (behavior - ours).abs().max() < LOGPROB_TOL < (behavior - base).abs().max()
    assert any("lora_A" in n for n, _ in lora.named_parameters())  # merged in a copy only


@needs_vllm
def test_rollout_correction_and_dynamic_sampling_take_the_engines_logprobs(parts):
    import copy

    from rlhf_core.ppo.policy import PolicyWithValue
    from rlhf_core.ppo.trainer import PPOTrainer
    tok, model, task = parts
    cfg = PPOConfig(rollout_engine="vllm", rollout_correction="tis", dynamic_sampling=True, group_size=2,
                    advantage_estimator="grpo", batch_size=8, num_mini_batches=1, ppo_epochs=1, response_length=8,
                    max_prompt_length=48, eval_every=0, num_iterations=1, kl_coef=0.0)
    seen = []
    trainer = PPOTrainer(cfg, PolicyWithValue(copy.deepcopy(model), value_model="none"), tok,
                         lambda p, r: [float(len(x) % 2) for x in r], task.prompts)
    generate = trainer.engine.generate
    trainer.engine.generate = lambda *a, **k: seen.append(generate(*a, **k)) or seen[-1]
    metrics = trainer.step()
    assert len(seen) == metrics["dynamic/rounds"] >= 1  # every round sampled by vLLM
    assert metrics["check/logprob_gap_max"] < LOGPROB_TOL and 0.99 < metrics["correction/weight_mean"] < 1.01


PPO = ["--reward", "gold", "--ppo.rollout_engine", "vllm", "--ppo.num_iterations", "6", "--ppo.save_every", "1",
       "--ppo.batch_size", "8", "--ppo.num_mini_batches", "2", "--ppo.response_length", "8", "--ppo.num_threads", "1",
       "--ppo.eval_every", "0"]


@needs_vllm
def test_killed_and_resumed_vllm_run_ends_byte_identical(parts, tmp_path):
    tok, model, _ = parts
    model.save_pretrained(tmp_path / "policy"), tok.save_pretrained(tmp_path / "policy")
    ref, run = tmp_path / "ref", tmp_path / "run"
    cmd = lambda out, *more: [sys.executable, "-m", "rlhf_core", "ppo", "--policy", str(tmp_path / "policy"),  # noqa
                              "--output-dir", str(out), *PPO, *more]
    r = subprocess.run(cmd(ref), capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(cmd(run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    ckpts, deadline = run / "checkpoints" / "ppo", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (ckpts / "step-000003").is_dir():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "finished before the kill"
    r = subprocess.run(cmd(run, "--resume"), capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("model.safetensors", "value_head.safetensors"):
        assert (ref / "ppo" / name).read_bytes() == (run / "ppo" / name).read_bytes(), name


@needs_vllm
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_under_torchrun_each_rank_samples_with_its_own_engine_on_the_current_full_weights(parts, tmp_path, parallel):
    """2 ranks, each sampling its 4 of the 8 prompts with its own in-process engine. At every iteration every
    rank's behavior logprobs equal the trainer's forward (the max is over both ranks): each engine got this
    iteration's weights, under FSDP2 the full weights gathered from the shards (placeholder or stale weights
    would be nats away). Rank 0 alone writes; the policy trained."""
    from safetensors.torch import load_file
    tok, model, _ = parts
    model.save_pretrained(tmp_path / "policy"), tok.save_pretrained(tmp_path / "policy")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlhf_core.cli",
           "ppo", "--policy", str(tmp_path / "policy"), "--output-dir", str(out), *PPO[:4], "--ppo.num_iterations", "3",
           *PPO[8:], "--ppo.learning_rate", "1e-2", "--ppo.parallel", parallel, "--ppo.save_every", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    iterations = [m for m in lines if "loss/policy" in m]
    assert [m["step"] for m in iterations] == [1, 2, 3]
    for m in iterations:
        assert m["check/logprob_gap_max"] < LOGPROB_TOL and m["time/weight_sync"] > 0, m
    assert json.loads((out / "summary.json").read_text())["ppo"]["world_size"] == 2
    before, after = load_file(tmp_path / "policy" / "model.safetensors"), load_file(out / "ppo" / "model.safetensors")
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-3
