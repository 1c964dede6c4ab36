"""Nothing lost, nothing silent: a full disk, the umask, and the errors a run meets after it started."""
import errno
import json
import os
import stat

import pytest

from rlhf_core import checkpoint
from rlhf_core.cli import main

PPO = ["--reward", "gold", "--ppo.num_iterations", "3", "--ppo.save_every", "1", "--ppo.batch_size", "4",
       "--ppo.num_mini_batches", "1", "--ppo.response_length", "4", "--ppo.eval_every", "0"]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(tiny_model_dir, tmp_path, capsys,
                                                                            monkeypatch):
    real, calls = checkpoint.save_file, []

    def fills_up(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    out = tmp_path / "run"
    assert main(["ppo", "--policy", str(tiny_model_dir), "--output-dir", str(out), *PPO]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's own warnings
    assert err.startswith("error: ") and "no space left on device" in err, err
    assert "--resume" in err
    ckpts = out / "checkpoints" / "ppo"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001"]  # no torn step-2, step-1 intact
    checkpoint.verify_checkpoint(ckpts / "step-000001")


def test_a_safetensors_disk_full_error_is_recognised_too(tmp_path):
    class SafetensorError(Exception):
        pass
    with pytest.raises(checkpoint.DiskFullError, match="no space left on device"):
        with checkpoint.atomic_dir(tmp_path / "model"):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                  "\"No space left on device\" })")
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())


def test_outputs_honour_the_umask(tiny_model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(["ppo", "--policy", str(tiny_model_dir), "--output-dir", str(out), *PPO]) == 0
    finally:
        os.umask(old)
    for path in [out / "ppo", out / "checkpoints" / "ppo" / "step-000003"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    for path in [out / "summary.json", out / "config.json", out / "ppo" / "model.safetensors",
                 out / "checkpoints" / "ppo" / "step-000003" / "state.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert json.loads((out / "summary.json").read_text())["ppo"]["iterations"] == 3
