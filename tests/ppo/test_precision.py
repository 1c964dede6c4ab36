"""--PHASE.mixed_precision bf16 on one device: bf16 compute under autocast, fp32 weights, optimizer state,
logprobs, values, KL and losses; the invariant checks judged at bf16's own tolerance; bad input one line."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rlhf_core import precision
from rlhf_core.cli import main
from rlhf_core.config import PPOConfig
from rlhf_core.errors import ConfigError
from rlhf_core.ppo.rollout import encode_prompts, score

from .test_trainer import make_trainer, setup

pytestmark = pytest.mark.skipif(not precision.cpu_bf16_flags(), reason="this CPU has no native bf16")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from rlhf_core.models import build_tiny_model
    tok, task = setup()
    from .test_trainer import TINY
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(tok, TINY, 0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_bf16_logprobs_values_and_kl_are_fp32_and_close_to_fp32():
    t = make_trainer()
    tok, task = setup()
    q, qm = encode_prompts(tok, task.prompts[:8], 32)
    g = torch.Generator().manual_seed(0)
    r = torch.randint(3, 200, (8, 6), generator=g)
    m = torch.ones_like(r)
    ref = score(t.policy, q, qm, r, m, None)
    with precision.autocast(dataclasses.replace(t.cfg, mixed_precision="bf16"), torch.device("cpu")):
        low = score(t.policy, q, qm, r, m, None)
    for name in ("logprobs", "ref_logprobs", "values", "kl_exact"):
        a, b = getattr(ref, name), getattr(low, name)
        assert b.dtype == torch.float32, name
        assert name == "kl_exact" or not torch.equal(a, b), name  # bf16 did compute (the KL: 0, policy = ref)
        # bf16 rounds each layer's activations to 8 bits of mantissa: logprobs move by ~1e-2
        torch.testing.assert_close(b, a, atol=0.1, rtol=0.05, msg=name)
    assert (low.logprobs - ref.logprobs).abs().mean() < 0.02


def test_a_bf16_ppo_step_keeps_fp32_master_weights_and_judges_its_invariants_at_bf16_tolerance(recwarn):
    t = make_trainer(mixed_precision="bf16", kl_estimator="exact", kl_penalty="both")
    ref = make_trainer(kl_estimator="exact", kl_penalty="both")
    m, m_ref = t.step(), ref.step()
    assert all(p.dtype == torch.float32 for p in t.params)
    assert all(v.dtype == torch.float32 for s in t.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
               and v.dim() > 0)
    assert m["check/bf16"] == 1.0 and "check/bf16" not in m_ref
    assert 0 < m["check/first_ratio_dev"] < 0.25 and m["check/logprob_gap"] < 0.05  # bf16's own mismatch
    assert m_ref["check/first_ratio_dev"] < 1e-4
    assert not [w for w in recwarn if "check/first_ratio_dev" in str(w.message) or "logprob_gap" in str(w.message)]


def test_the_same_minibatch_gives_close_losses_and_gradients_in_bf16():
    from .test_trainer import uneven_experience
    out = []
    for mp in ("no", "bf16"):
        t = make_trainer(mixed_precision=mp, kl_estimator="k3", kl_penalty="loss", ent_coef=0.01)
        exp = uneven_experience(t)
        with precision.autocast(t.cfg, t.device):
            stats = t.minibatch_step(exp)
        out.append((stats, {n: p.grad.clone() for n, p in t.policy.named_trainable_parameters().items()}))
    (s32, g32), (s16, g16) = out
    for key in ("loss/policy", "loss/value", "loss/kl", "policy/entropy"):
        assert s16[key] == pytest.approx(s32[key], rel=0.05, abs=1e-3), key
    cos = sum(float((g16[n] * g32[n]).sum()) for n in g32) / (
        sum(float(g.square().sum()) for g in g16.values()) ** 0.5 * sum(float(g.square().sum()) for g in g32.values()) ** 0.5)
    assert 0.98 < cos < 1.0  # the same direction, bf16's rounding aside


def test_the_objective_math_is_immune_to_autocast():
    """The fused kernels turn autocast off and the losses are elementwise fp32/fp64: the enumeration of
    docs/losses.md gives the same numbers inside a bf16 autocast block."""
    spec = importlib.util.spec_from_file_location("loss_gradients", ROOT / "benchmarks" / "loss_gradients.py")
    lg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lg)
    batches = lg.Batches(lg.Tree(seed=0), k=2)
    plain = lg.placement_deviation(batches, "rloo", "exact", "both")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = lg.placement_deviation(batches, "rloo", "exact", "both")
    assert plain == auto and plain[0] < 1e-10


def test_bf16_sft_trains_in_bf16_and_records_the_precision(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}."}) + "\n" for i in range(24)))
    common = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--sft.max_steps", "3", "--sft.batch_size", "4"]
    assert main([*common, "--sft.mixed_precision", "bf16", "--output-dir", str(tmp_path / "bf16")]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "fp32")]) == 0
    low, ref = (json.loads((tmp_path / d / "summary.json").read_text())["sft"] for d in ("bf16", "fp32"))
    assert low["precision"] == "bf16 autocast" and ref["precision"] == "fp32"
    assert low["train_loss"] != ref["train_loss"] and low["train_loss"] == pytest.approx(ref["train_loss"], rel=0.05)
    from safetensors.torch import load_file
    assert {v.dtype for v in load_file(tmp_path / "bf16" / "sft" / "model.safetensors").values()} == {torch.float32}


def test_bf16_on_a_cpu_without_it_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    out = tmp_path / "run"
    argv = ["ppo", "--policy", str(tiny_model_dir), "--reward", "gold", "--ppo.mixed_precision", "bf16",
            "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: ppo.mixed_precision=bf16: this CPU has neither AVX512-BF16 nor AMX-BF16, so bf16 would be "
                   "emulated and slower than fp32; use 'no'")
    assert not out.exists()
    with pytest.raises(ConfigError):
        precision.check_bf16(torch.device("cpu"), "sft.mixed_precision")
    assert PPOConfig(mixed_precision="bf16").mixed_precision == "bf16"  # no longer needs parallel='fsdp2'
