"""Every phase resolves its ``device`` option and places its models there before training.

No GPU here: each phase's ``resolve_device`` is replaced by a recorder that answers "cpu" (its
logic is tested in tests/distributed), and its ``place`` by one that records where the phase
asked to put which model — the wiring a CUDA run
depends on (a phase that forgot to place its model would train on the CPU beside an idle GPU).
"""
from __future__ import annotations

import pytest
import torch

from rlhf_core.config import PPOConfig, PretrainConfig, RewardConfig, SFTConfig
from rlhf_core.phases import ppo, pretrain, reward_model, sft
from rlhf_core.tracking import MetricsLogger

from .conftest import TINY


@pytest.fixture
def placements(monkeypatch):
    seen: list[tuple] = []
    for module in (pretrain, sft, reward_model, ppo):
        monkeypatch.setattr(module, "resolve_device", lambda cfg, phase: seen.append(("resolve", cfg.device))
                            or torch.device("cpu"))
        monkeypatch.setattr(module, "place", lambda model, device, m=module.__name__:
                            seen.append((m.rsplit(".", 1)[1], type(model).__name__, device)) or model)
    return seen


def test_each_phase_places_its_model_on_the_resolved_device(placements, pretrained, task, tmp_path):
    base = str(pretrained[0])
    log = MetricsLogger(None)
    pretrain.run(PretrainConfig(block_size=32, batch_size=8, max_steps=1, device="cpu"), tmp_path / "pt", log,
                 model_cfg=TINY, task=task)
    sft.run(SFTConfig(model=base, batch_size=8, max_steps=1, device="auto"), tmp_path / "sft", log, task=task)
    reward_model.run(RewardConfig(model=base, batch_size=8, max_steps=1, device="cuda"), tmp_path / "rm", log,
                     task=task)
    ppo.run(PPOConfig(policy=base, reward="gold", batch_size=4, num_mini_batches=1, ppo_epochs=1,
                      response_length=4, num_iterations=1, eval_every=0, device="auto"), tmp_path / "ppo", log,
            task=task)
    cpu = torch.device("cpu")
    assert placements == [
        ("resolve", "cpu"), ("pretrain", "LlamaForCausalLM", cpu),
        ("resolve", "auto"), ("sft", "LlamaForCausalLM", cpu),
        ("resolve", "cuda"), ("reward_model", "LlamaForSequenceClassification", cpu),
        ("resolve", "auto"), ("ppo", "PolicyWithValue", cpu),
    ], placements
