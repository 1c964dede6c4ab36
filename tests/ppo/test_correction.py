"""Rollout correction (rlhf_core/ppo/correction.py): the weights and metrics against naive float64 loops, the policy
term they multiply, bad settings (one line, exit 2, nothing written), and short PPO runs in every mode."""
import math
import subprocess
import sys
import warnings

import pytest
import torch

from rlhf_core.config import PPOConfig
from rlhf_core.errors import ConfigError, UserCodeError
from rlhf_core.ppo import experience_maker
from rlhf_core.ppo.correction import ROLLOUT_CORRECTIONS, importance_ratio, register_rollout_correction
from rlhf_core.ppo.experience import Experience
from rlhf_core.ppo.experience_maker import apply_rollout_correction
from rlhf_core.ppo.losses import POLICY_LOSSES
from rlhf_core.ppo.objective import loss_terms

from .test_trainer import make_trainer, weights

LENGTHS = (5, 1, 3, 4, 2, 5)


def batch(seed: int = 0, spread: float = 0.6) -> Experience:
    """Rows of uneven length with π_old and μ logprobs a few tenths apart (garbage on padding)."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    mask = torch.tensor([[t < n for t in range(T)] for n in LENGTHS])
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    behavior = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    behavior = torch.where(mask, behavior, torch.full_like(behavior, float("nan")))  # padding never read
    return Experience(query_ids=torch.zeros(B, 1, dtype=torch.long), query_mask=torch.ones(B, 1, dtype=torch.long),
                      response_ids=torch.ones(B, T, dtype=torch.long), mask=mask, logprobs=old, ref_logprobs=old,
                      scores=torch.zeros(B, dtype=torch.float64), behavior_logprobs=behavior,
                      advantages=torch.randn(B, T, generator=g, dtype=torch.float64) * mask)


def naive(exp: Experience, name: str, level: str, c: float, low: float, high: float) -> list[list[float]]:
    """w per valid token, as plain Python loops: ρ = π_old/μ (token) or its product over the row (sequence)."""
    out = []
    for row, n in enumerate(LENGTHS):
        logs = [float(exp.logprobs[row, t] - exp.behavior_logprobs[row, t]) for t in range(n)]
        ratios = [math.exp(x) for x in logs] if level == "token" else [math.exp(sum(logs))] * n
        if name == "tis":
            out.append([min(r, c) for r in ratios])
        else:
            lo, hi = (1 / c, c) if name == "mis" else (low, high)
            out.append([r if lo <= r <= hi else 0.0 for r in ratios])
    return out


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("name", ["tis", "mis", "icepop"])
def test_weights_and_metrics_match_naive_loops(name, level):
    exp = batch()
    c, low, high = 1.3, 0.7, 1.6
    cfg = PPOConfig(rollout_correction=name, rollout_correction_level=level, rollout_correction_threshold=c,
                    rollout_correction_low=low, rollout_correction_high=high)
    out, m = apply_rollout_correction(exp, ROLLOUT_CORRECTIONS[name], cfg)
    want = naive(exp, name, level, c, low, high)
    for row, n in enumerate(LENGTHS):
        assert out.correction_weights[row, :n].tolist() == pytest.approx(want[row], rel=1e-12, abs=1e-15)
        assert out.correction_weights[row, n:].eq(0).all()
    units = [w for row in want for w in (row if level == "token" else row[:1])]  # a response counts once
    ratios = [w for row in naive(exp, "tis", level, math.inf, 0, 0) for w in (row if level == "token" else row[:1])]
    gaps = [abs(float(exp.logprobs[r, t] - exp.behavior_logprobs[r, t])) for r, n in enumerate(LENGTHS)
            for t in range(n)]
    assert m["check/logprob_gap"] == pytest.approx(sum(gaps) / len(gaps), rel=1e-12)
    assert m["check/logprob_gap_max"] == pytest.approx(max(gaps), rel=1e-12)
    assert m["correction/weight_mean"] == pytest.approx(sum(units) / len(units), rel=1e-12)
    assert m["correction/weight_max"] == pytest.approx(max(units), rel=1e-12)
    assert m["correction/ratio_min"] == pytest.approx(min(ratios)) and m["correction/ratio_max"] == pytest.approx(
        max(ratios))
    masked = sum(w == 0 for w in units) / len(units)
    truncated = sum(0 < w < r * (1 - 1e-12) for w, r in zip(units, ratios)) / len(units)
    assert m["correction/masked_fraction"] == pytest.approx(masked)
    assert m["correction/truncated_fraction"] == pytest.approx(truncated)
    assert (masked if name != "tis" else truncated) > 0.1  # the bounds are exercised here


def test_the_weights_multiply_the_policy_term_and_nothing_else():
    exp = batch()
    cfg = PPOConfig(rollout_correction="tis", rollout_correction_threshold=1.3)
    corrected, _ = apply_rollout_correction(exp, ROLLOUT_CORRECTIONS["tis"], cfg)
    lp = (exp.logprobs + 0.1).requires_grad_()
    kw = dict(logprobs=lp, values=None, entropy=torch.ones_like(lp), kl=None, config=cfg,
              policy_loss=POLICY_LOSSES["ppo"])
    plain, _ = loss_terms(exp=exp, **kw)
    weighted, _ = loss_terms(exp=corrected, **kw)
    valid = exp.mask
    torch.testing.assert_close(weighted["policy"][1][valid], (corrected.correction_weights * plain["policy"][1])[valid])
    torch.testing.assert_close(weighted["entropy"][1], plain["entropy"][1])


def test_sequence_ratios_are_bounded_before_the_exp():
    old = torch.zeros(1, 40, dtype=torch.float64)
    ratio = importance_ratio(old, old - 2.0, torch.ones(1, 40), "sequence")  # log-product 80
    assert torch.isfinite(ratio).all() and float(ratio[0, 0]) == pytest.approx(math.exp(20))


def test_a_user_correction_is_called_and_checked():
    exp, cfg = batch(), PPOConfig(rollout_correction="_half")
    register_rollout_correction("_half")(lambda *, ratio, mask, **kw: 0.5 * torch.ones_like(ratio))
    try:
        out, m = apply_rollout_correction(exp, ROLLOUT_CORRECTIONS["_half"], cfg)
        assert out.correction_weights[exp.mask].eq(0.5).all() and m["correction/weight_mean"] == 0.5
        for bad in (lambda **kw: torch.ones(2), lambda *, ratio, **kw: -ratio):
            with pytest.raises(UserCodeError, match="ppo.rollout_correction '_half' returned"):
                apply_rollout_correction(exp, bad, cfg)
        with pytest.raises(ValueError, match="already registered"):
            register_rollout_correction("_half")(lambda **kw: None)
    finally:
        del ROLLOUT_CORRECTIONS["_half"]


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "rlhf_core", "ppo", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("flags, needle", [
    (["--ppo.rollout_correction_threshold", "1"], "ppo.rollout_correction_threshold=1.0: expected a number > 1"),
    (["--ppo.rollout_correction_low", "3", "--ppo.rollout_correction_high", "2"],
     "ppo.rollout_correction_low=3 > ppo.rollout_correction_high=2"),
    (["--ppo.rollout_correction_high", "0.9", "--ppo.rollout_correction_low", "0.5"],
     "ppo.rollout_correction_high=0.9: expected a number > 1"),
    (["--ppo.rollout_correction_level", "row"], "ppo.rollout_correction_level='row'"),
    (["--ppo.rollout_correction", "tis_typo"], "ppo.rollout_correction: unknown rollout correction 'tis_typo'"),
    (["--ppo.rollout_correction", "mis", "--ppo.loss_fn", "LOSS"], "ppo.rollout_correction='mis' is not supported "
                                                                   "yet with a whole-loss replacement (ppo.loss_fn)"),
])
def test_bad_settings_are_one_line_exit_2_and_write_nothing(tmp_path, flags, needle):
    (tmp_path / "loss.py").write_text("def whole(**kw):\n    return 0.0, {}\n")
    out = tmp_path / "run"
    res = _cli(["--output-dir", str(out), *[f.replace("LOSS", "loss.py:whole") for f in flags]], tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert needle in res.stderr
    assert not out.exists()


def test_the_trainer_refuses_a_correction_with_a_whole_loss_argument():
    with pytest.raises(ConfigError, match="not supported yet with a whole-loss replacement"):
        make_trainer(rollout_correction="tis", loss_fn=lambda **kw: (torch.zeros(()), {}))


def engine_off_by(monkeypatch, size: float, seed: int = 3) -> None:
    """A rollout engine whose logprobs differ from the trainer's: μ = the sampling loop's + noise (the noise
    restarts from ``seed`` at every call of this function)."""
    real = getattr(experience_maker.sampled_logprobs, "unpatched", experience_maker.sampled_logprobs)
    g = torch.Generator().manual_seed(seed)

    def noisy(policy, hidden, response_ids, mask, *a, **k):
        lp = real(policy, hidden, response_ids, mask, *a, **k)
        return lp + size * torch.randn(lp.shape, generator=g) * mask
    noisy.unpatched = real
    monkeypatch.setattr(experience_maker, "sampled_logprobs", noisy)


KEYS = ("check/logprob_gap", "check/logprob_gap_max", "correction/weight_mean", "correction/weight_max",
        "correction/ratio_min", "correction/ratio_max", "correction/truncated_fraction", "correction/masked_fraction")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("name", ["tis", "mis", "icepop"])
def test_a_ppo_run_logs_the_correction_every_iteration(monkeypatch, name, level):
    engine_off_by(monkeypatch, 0.3)
    t = make_trainer(rollout_correction=name, rollout_correction_level=level, rollout_correction_threshold=1.1,
                     rollout_correction_low=0.8, rollout_correction_high=1.25)
    with pytest.warns(UserWarning, match="check/logprob_gap"):  # the health check flags a gap past 1e-3
        runs = [t.step() for _ in range(2)]
    for m in runs:
        assert set(KEYS) <= set(m) and all(math.isfinite(m[k]) for k in KEYS)
        assert 0.1 < m["check/logprob_gap"] < 0.5 and m["check/logprob_gap_max"] > m["check/logprob_gap"]
        assert m["correction/ratio_min"] < 1 < m["correction/ratio_max"]
        changed = m["correction/truncated_fraction"] if name == "tis" else m["correction/masked_fraction"]
        assert 0 < changed < 1 and m["check/first_ratio_dev"] < 1e-4  # π_old is the trainer's own forward


@pytest.mark.parametrize("name, level", [("tis", "token"), ("mis", "sequence"), ("icepop", "token")])
def test_corrected_micro_batches_accumulate_the_full_minibatch_gradient(monkeypatch, name, level):
    """Two PPO iterations (2 epochs × 2 minibatches each, so later steps run at θ ≠ θ_old) with μ ≠ π_old: micro-batches
    of 2 rows end on the weights of one pass per minibatch. The weights really cut (metrics), and they matter
    (without the correction the weights differ)."""
    settings = dict(rollout_correction=name, rollout_correction_level=level, rollout_correction_threshold=1.1,
                    rollout_correction_low=0.8, rollout_correction_high=1.25)
    runs = {}
    for label, extra in (("full", dict(micro_batch_size=0)), ("micro", dict(micro_batch_size=2)), ("none", {})):
        engine_off_by(monkeypatch, 0.3)  # the same μ for every run
        t = make_trainer(learning_rate=2e-2, **extra, **(settings if label != "none" else {}))  # big steps: the clip acts
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the health check flags the gap (tested above)
            metrics = [t.step() for _ in range(2)]
        runs[label] = (weights(t), metrics)
    (full, m_full), (micro, m_micro), (plain, _) = runs["full"], runs["micro"], runs["none"]
    changed = "correction/truncated_fraction" if name == "tis" else "correction/masked_fraction"
    assert all(0 < m[changed] < 1 for m in m_full) and [m[changed] for m in m_full] == [m[changed] for m in m_micro]
    assert max(m["policy/clipfrac"] for m in m_full) > 0  # the clip was active in these updates
    for k in full:  # fp32 rounding of the accumulation, carried by Adam's steps of ~2e-2: ~2e-6 (also uncorrected)
        torch.testing.assert_close(micro[k], full[k], atol=1e-5, rtol=0, msg=k)
    assert max(float((plain[k] - full[k]).abs().max()) for k in full) > 1e-3


def test_without_a_mismatch_the_weights_are_one():
    m = make_trainer(rollout_correction="mis", rollout_correction_level="sequence").step()
    assert m["check/logprob_gap"] < 1e-5 and m["correction/masked_fraction"] == 0
    assert m["correction/weight_mean"] == pytest.approx(1, abs=1e-5)


def test_masking_every_token_silences_the_policy_term(monkeypatch):
    """The weights reach the update: an icepop band no ratio falls in zeroes the policy loss; the value loss trains."""
    engine_off_by(monkeypatch, 2.0)
    t = make_trainer(rollout_correction="icepop", rollout_correction_low=0.999, rollout_correction_high=1.001)
    before = {k: v.clone() for k, v in t.policy.state_dict().items()}
    m = t.step()
    assert m["correction/masked_fraction"] > 0.99 and abs(m["loss/policy"]) < 1e-6 and m["loss/value"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in t.policy.state_dict().items())


def test_bf16_sampling_is_a_real_gap_the_correction_measures():
    m = make_trainer(mixed_precision="bf16", rollout_correction="tis").step()
    assert 1e-4 < m["check/logprob_gap"] < 0.05 and m["correction/ratio_max"] > 1.0


def test_the_experience_keeps_mu_and_pi_old_apart(monkeypatch):
    engine_off_by(monkeypatch, 0.3)
    t = make_trainer(rollout_correction="tis", trace=True)
    t.step()
    exp = t.trace
    assert not torch.equal(exp["behavior_logprobs"], exp["logprobs"])
    want = torch.exp(exp["logprobs"] - exp["behavior_logprobs"]).clamp(max=2.0) * exp["mask"]
    torch.testing.assert_close(exp["correction_weights"], want)
    plain = make_trainer(trace=True)
    plain.step()
    assert plain.trace["behavior_logprobs"] is None and plain.trace["correction_weights"] is None


def test_a_correction_named_as_file_py_function_runs(tmp_path, monkeypatch):
    """docs/rollout.md's example, named as file.py:function: two-sided truncation at [1/C, C]."""
    (tmp_path / "my_corr.py").write_text("def tis_floor(*, ratio, threshold, **kw):\n"
                                         "    return ratio.clamp(1 / threshold, threshold)\n")
    engine_off_by(monkeypatch, 0.3)
    t = make_trainer(rollout_correction=f"{tmp_path / 'my_corr.py'}:tis_floor", rollout_correction_threshold=1.1,
                     trace=True)
    m = t.step()
    w = t.trace["correction_weights"][t.trace["mask"].bool()]
    assert float(w.min()) == pytest.approx(1 / 1.1) and float(w.max()) == pytest.approx(1.1)
    assert m["correction/truncated_fraction"] > 0
