"""Checkpoints: exact state round trip, atomic layout, and torn/corrupted ones are never loaded silently."""
import json
import random

import numpy as np
import pytest
import torch

from rlhf_core.errors import CheckpointError
from rlhf_core.checkpoint import (capture_state, latest_checkpoint, list_checkpoints,
                                  load_checkpoint, restore_state, save_checkpoint, verify_checkpoint)
from rlhf_core.phases.ppo import resume_trainer


def small_run(seed: int = 0):
    """A linear model after two AdamW steps with a LambdaLR schedule, plus a generator."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, generator=gen)).pow(2).sum().backward()
        opt.step(), sched.step()
    return model, opt, sched, gen


def test_state_round_trip_is_exact(tmp_path):
    model, opt, sched, gen = small_run(0)
    random.seed(5), np.random.seed(6)
    path = save_checkpoint(tmp_path, 2, *capture_state(dict(model.named_parameters()), opt, sched, {"g": gen}))
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen))
    other, opt2, sched2, gen2 = small_run(1)  # different weights, moments, schedule position, RNG
    tensors, meta = load_checkpoint(path)
    restore_state(tensors, meta, dict(other.named_parameters()), opt2, sched2, {"g": gen2})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sched2.state_dict()["last_epoch"] == 2 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen2)) == expected


def test_layout_manifest_and_keep_last(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.ones(2) * step}, {"step": step}, keep=2)
    (tmp_path / ".step-000004.tmp-dead").mkdir()  # left by a crash mid-write
    save_checkpoint(tmp_path, 4, {"w": torch.ones(2)}, {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]
    manifest = verify_checkpoint(tmp_path / "step-000003")
    assert set(manifest["files"]) == {"tensors.safetensors", "state.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert load_checkpoint(tmp_path / "step-000003")[1] == {"step": 3}


def truncate(path):
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])


def flip_byte(path):
    target = path / "state.json"
    data = bytearray(target.read_bytes())
    data[2] ^= 1  # same size, different content
    target.write_bytes(bytes(data))


def drop_manifest(path):
    (path / "manifest.json").unlink()


def garble_manifest(path):
    (path / "manifest.json").write_text("{ not json")


@pytest.mark.parametrize("damage, message", [
    (truncate, "truncated"), (flip_byte, "sha256"), (drop_manifest, "no manifest.json"),
    (garble_manifest, "not a valid manifest"),
])
def test_damaged_checkpoint_is_detected_and_skipped(damage, message, tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"w": torch.full((4,), float(step))}, {"step": step}, keep=5)
    damage(tmp_path / "step-000002")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "step-000002")
    with pytest.warns(UserWarning, match=f"step-000002.*{message}"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    damage(tmp_path / "step-000001")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no valid checkpoint among 2"):
        latest_checkpoint(tmp_path)


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None and list_checkpoints(tmp_path) == []


def test_trainer_resumes_from_previous_good_checkpoint(make_trainer, tmp_path):
    trainer = make_trainer(num_iterations=2)
    trainer.train(tmp_path)
    truncate(tmp_path / "step-000002")
    fresh = make_trainer(num_iterations=2)
    with pytest.warns(UserWarning, match="step-000002"):
        assert resume_trainer(fresh, fresh.cfg, tmp_path) == 1
    tensors, _ = load_checkpoint(tmp_path / "step-000001")
    assert all(torch.equal(p, tensors[f"param.{n}"]) for n, p in fresh.policy.named_trainable_parameters().items())
    assert json.loads((tmp_path / "step-000001" / "state.json").read_text())["ppo"]["iteration"] == 1


def test_checkpoint_of_another_world_size_loads_with_a_warning_and_reseeds_sampling(make_trainer, tmp_path):
    """A 2-rank checkpoint (as written under torchrun: rank 1's RNG states under ``rank1.``) resumed
    in one process: shared state loads, sampling gets a new (seed, rank, iteration) stream."""
    trainer = make_trainer(num_iterations=1)
    trainer.train(tmp_path)
    tensors, meta = load_checkpoint(tmp_path / "step-000001")
    assert meta["rng"]["world_size"] == 1 and not any(k.startswith("rank1.") for k in tensors)
    tensors.update({f"rank1.{k}": v for k, v in tensors.items() if k.startswith("rng.")})
    meta["rng"].update(world_size=2, rank1=meta["rng"])
    fresh = make_trainer(num_iterations=2)
    with pytest.warns(UserWarning, match="checkpoint written by 2 ranks, resumed on 1"):
        fresh.load_state(tensors, meta)
    assert fresh.iteration == 1 and torch.equal(fresh.shuffle_gen.get_state(), trainer.shuffle_gen.get_state())
    assert all(torch.equal(p, tensors[f"param.{n}"]) for n, p in fresh.policy.named_trainable_parameters().items())
    assert not torch.equal(fresh.sample_gen.get_state(), trainer.sample_gen.get_state())
    expected = torch.Generator().manual_seed(fresh.cfg.seed * 1_000_003 + 1)
    assert torch.equal(fresh.sample_gen.get_state(), expected.get_state())


def test_a_setting_newer_than_the_checkpoint_matches_at_its_default():
    from rlhf_core.checkpoint import check_resume_config
    from rlhf_core.errors import ConfigError
    saved = {"ppo": {"kl_coef": 0.2}}  # written before kl_penalty existed
    defaults = {"ppo": {"kl_coef": 0.2, "kl_penalty": "reward"}}
    check_resume_config(saved, {"ppo": {"kl_coef": 0.2, "kl_penalty": "reward"}}, "", defaults)
    with pytest.raises(ConfigError, match=r"ppo.kl_penalty='loss' differs from the interrupted run's None"):
        check_resume_config(saved, {"ppo": {"kl_coef": 0.2, "kl_penalty": "loss"}}, "", defaults)
    with pytest.raises(ConfigError, match="ppo.kl_penalty"):  # without defaults: any new key differs
        check_resume_config(saved, {"ppo": {"kl_coef": 0.2, "kl_penalty": "reward"}}, "")
