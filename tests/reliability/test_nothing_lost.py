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


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["ppo", "--policy", str(tiny_model_dir), "--output-dir", str(out), *PPO]) == 0
    return out


@pytest.fixture(scope="module")
def reward_dirs(tiny_model_dir, tmp_path_factory):
    """A reward classifier saved with a tokenizer that has more tokens than its embeddings."""
    from rlhf_core.models import build_reward_model_from_lm, load_tokenizer
    root = tmp_path_factory.mktemp("rewards")
    tok = load_tokenizer(str(tiny_model_dir))
    model = build_reward_model_from_lm(str(tiny_model_dir), tokenizer=tok)
    big = root / "big_tokenizer"
    model.save_pretrained(big)
    tok.add_tokens([f"<extra_{i}>" for i in range(model.config.vocab_size - len(tok) + 5)])
    tok.save_pretrained(big)
    return {"big_tokenizer": big}


@pytest.mark.parametrize("reward, needle", [
    ("missing_folder", "reward model folder not found"),
    ("{policy}", "a LlamaForCausalLM, not a sequence classifier: as a reward its score head would be freshly "
                 "initialised"),
    ("{big_tokenizer}", "its tokenizer has"),
])
def test_a_bad_reward_folder_fails_before_the_previous_run_is_touched(finished_run, tiny_model_dir, reward_dirs,
                                                                      capsys, reward, needle):
    before = snapshot(finished_run)
    reward = reward.format(policy=tiny_model_dir, **reward_dirs)
    argv = ["ppo", "--policy", str(tiny_model_dir), "--output-dir", str(finished_run), *PPO, "--reward", reward,
            "--overwrite"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert snapshot(finished_run) == before


def test_overwrite_keeps_the_finished_run_when_the_new_one_fails_before_its_first_checkpoint(
        finished_run, tiny_model_dir, tmp_path, capsys):
    """A failure that only the run itself can find (the reward raises at iteration 1): the finished run
    is put back, byte for byte; once the new run has a checkpoint, a later failure keeps the new one."""
    before = snapshot(finished_run)
    code = tmp_path / "reward.py"
    code.write_text("def broken(prompts, responses):\n    raise ValueError('no such column')\n")
    argv = ["ppo", "--policy", str(tiny_model_dir), "--output-dir", str(finished_run), *PPO,
            "--reward", f"{code}:broken", "--overwrite"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no such column" in err and "the previous run in" in err and "is kept" in err
    assert snapshot(finished_run) == before
    assert not [p for p in finished_run.parent.iterdir() if ".replaced-" in p.name]  # no leftovers
