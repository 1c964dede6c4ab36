"""Checkpoints written before the layout change of issue #16 still resume, and finish where the old
code finished (tests/fixtures/checkpoints_v1, made by its make_v1.sh with the code of 68fb8e5).

Each run there was cut after its first checkpoint; ``expected/`` holds the old code's final weights
of the uninterrupted run. The new code resumes the old checkpoint through the CLI and must land on
those weights; a fresh run of the new code must too (so the refactor changed no computation). The
tolerance is for another CPU's float rounding; on the machine that made the fixture both match to
the bit.
"""
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints_v1"
PPO = ["ppo", "--policy", "policy", "--reward", "gold", "--ppo.num_iterations", "2", "--ppo.save_every", "1",
       "--ppo.batch_size", "8", "--ppo.num_mini_batches", "2", "--ppo.ppo_epochs", "2", "--ppo.response_length", "8",
       "--ppo.num_threads", "1", "--ppo.eval_every", "0", "--ppo.keep_checkpoints", "3", "--output-dir"]
PRETRAIN = ["pretrain", "--model.vocab_size", "320", "--model.hidden_size", "32", "--model.num_layers", "1",
            "--model.num_heads", "2", "--model.intermediate_size", "64", "--model.max_position_embeddings", "64",
            "--pretrain.block_size", "32", "--pretrain.max_steps", "4", "--pretrain.save_every", "2",
            "--pretrain.batch_size", "8", "--pretrain.log_every", "1", "--output-dir"]


def assert_same_weights(got: Path, expected: Path) -> None:
    a, b = load_file(str(got)), load_file(str(expected))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{got.name}:{name}: {m}")


@pytest.mark.parametrize("phase, args, files", [
    ("ppo", PPO, ["model.safetensors", "value_head.safetensors"]),
    ("pretrain", PRETRAIN, ["model.safetensors"]),
])
def test_old_checkpoint_resumes_to_the_old_result(cli, tmp_path, phase, args, files):
    work = tmp_path / "fixture"
    shutil.copytree(FIXTURE, work)
    run = f"{phase}_run"
    assert [p.name for p in (work / run / "checkpoints" / phase).iterdir()] == ["step-000002" if phase == "pretrain"
                                                                                   else "step-000001"]
    resumed = cli.run(*args, run, "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    fresh = cli.run(*args, "fresh", cwd=work)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    for name in files:
        assert_same_weights(work / run / phase / name, work / "expected" / phase / name)
        assert_same_weights(work / "fresh" / phase / name, work / "expected" / phase / name)
