"""Phase 2: the Bradley-Terry loss vs a float64 formula, last-token scoring, end-to-end training."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_core.config import RewardConfig
from rlhf_core.errors import ConfigError
from rlhf_core.models import build_reward_model_from_lm, load_reward_model, load_tokenizer
from rlhf_core.phases import reward_model
from rlhf_core.phases.common import train_loop
from rlhf_core.phases.reward_model import pairwise_loss
from rlhf_core.ppo.reward_sources import encode_for_reward, reward_forward, reward_scores
from rlhf_core.tracking import MetricsLogger


def test_pairwise_loss_matches_float64_formula():
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(64, generator=g) * 5
    rejected = torch.randn(64, generator=g) * 5
    chosen[:3] = torch.tensor([40.0, -40.0, 0.0])  # saturated both ways, and a tie
    rejected[:3] = torch.tensor([-40.0, 40.0, 0.0])
    naive = sum(-math.log(1.0 / (1.0 + math.exp(-(c - r)))) for c, r in
                zip(chosen.double().tolist(), rejected.double().tolist())) / 64
    loss = pairwise_loss(chosen, rejected)
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(naive, rel=1e-5)


def test_score_is_read_at_last_real_token_whatever_the_padding(pretrained):
    base, _, _ = pretrained
    tok = load_tokenizer(str(base))
    model = build_reward_model_from_lm(str(base), tokenizer=tok).eval()
    seqs = encode_for_reward(tok, ["Review of The Silent River:"] * 2, [" great.", " it was a very long and dull film."], 64)
    assert all(s[-1] == tok.eos_token_id for s in seqs)
    with torch.no_grad():
        batched = reward_forward(model, seqs, tok.pad_token_id)                        # (2,) padded together
        alone = torch.cat([reward_forward(model, [s], tok.pad_token_id) for s in seqs])  # no padding
    assert torch.allclose(batched, alone, atol=1e-5)


def run_rm(pretrained, task, tmp_path, **kw):
    base, _, _ = pretrained
    cfg = RewardConfig(model=str(base), batch_size=16, learning_rate=3e-3, log_every=5, eval_fraction=0.25, **kw)
    logger = MetricsLogger(None)
    out = tmp_path / f"rm-{cfg.mode}"
    return out, cfg, reward_model.run(cfg, out, logger, task=task), logger


def test_bradley_terry_training_fits_pairs(pretrained, task):
    """The loss, its gradient path and the optimizer loop fit 16 pairs (memorisation, not quality)."""
    base, _, _ = pretrained
    tok = load_tokenizer(str(base))
    model = build_reward_model_from_lm(str(base), tokenizer=tok)
    pairs = reward_model.encode_pairs(task.preferences[:16], tok, 96)
    cfg = RewardConfig(model=str(base), batch_size=8, learning_rate=1e-2, max_steps=30, epochs=100)
    before = reward_model.evaluate(model, pairs, tok.pad_token_id, 16)

    def loss_fn(idx):
        chosen, rejected = reward_model.pair_rewards(model, [pairs[i] for i in idx], tok.pad_token_id)
        return pairwise_loss(chosen, rejected), 0

    train_loop(model, loss_fn, len(pairs), cfg, MetricsLogger(None), "reward", torch.Generator().manual_seed(0))
    after = reward_model.evaluate(model, pairs, tok.pad_token_id, 16)
    assert after["loss"] < before["loss"] - 0.3 and after["accuracy_labels"] >= 0.9 and after["margin"] > 0.5


def test_reward_phase_end_to_end_saves_classifier(pretrained, task, tmp_path):
    out, cfg, summary, logger = run_rm(pretrained, task, tmp_path, max_steps=10)
    for key in ("eval_accuracy", "eval_accuracy_against", "eval_accuracy_labels", "eval_margin",
                "train_loss", "wall_seconds"):
        assert key in summary
    assert summary["eval_accuracy_against"] == "gold"
    assert 0 <= summary["eval_accuracy"] <= 1 and math.isfinite(summary["eval_margin"])
    steps, accs = logger.series("reward", "eval/accuracy")
    assert steps == [0, 10] and accs[-1] == summary["eval_accuracy"]
    assert logger.series("reward", "loss/train")[0] == [5, 10]

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    rm, rm_tok = load_reward_model(str(out))
    held = task.preferences[:8]
    prompts = [r["prompt"] for r in held]
    a = reward_scores(model, tok, prompts, [r["chosen"] for r in held], cfg.max_length)
    b = reward_scores(rm, rm_tok, prompts, [r["chosen"] for r in held], cfg.max_length)
    assert torch.allclose(a, b) and a.std() > 0


def test_lora_reward_model_trains_adapters_and_score_head(pretrained, task, tmp_path):
    base, _, _ = pretrained
    tok = load_tokenizer(str(base))
    model = build_reward_model_from_lm(str(base), mode="lora", tokenizer=tok)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert all("score" in n or "lora_" in n for n in trainable)

    out, _, summary, _ = run_rm(pretrained, task, tmp_path, mode="lora", max_steps=6)
    saved, backbone = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert "score.weight" in saved and not any("lora_" in k for k in saved)  # merged, plain classifier
    changed = {k for k in saved if k in backbone and not torch.equal(saved[k], backbone[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_missing_backbone_is_one_line_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        reward_model.run(RewardConfig(model=str(tmp_path / "absent")), tmp_path / "o", MetricsLogger(None))
    assert "absent" in str(err.value) and "\n" not in str(err.value)
