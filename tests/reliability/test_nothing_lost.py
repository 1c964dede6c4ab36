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
    other = root / "other_vocab"  # a classifier whose vocabulary is not the policy's (read from config.json)
    model.save_pretrained(other)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 64}))
    convo = root / "convo_eval.jsonl"
    convo.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    return {"big_tokenizer": big, "other_vocab": other, "convo_eval": convo}


@pytest.mark.parametrize("reward, extra, needle", [
    ("missing_folder", [], "reward model folder not found"),
    ("{policy}", [], "a LlamaForCausalLM, not a sequence classifier: as a reward its score head would be freshly "
                     "initialised"),
    ("{big_tokenizer}", [], "its tokenizer has"),
    ("{other_vocab}", ["--ppo.value_model", "separate", "--ppo.value_init_from_reward", "true"],
     "ppo.value_init_from_reward=true: the reward model's vocabulary"),
    ("gold", ["--ppo.eval_prompts", "{convo_eval}", "--ppo.chat_template", "never"],
     "convo_eval.jsonl:1: field 'prompt': a conversational prompt needs a chat template"),
])
def test_a_bad_reward_folder_fails_before_the_previous_run_is_touched(finished_run, tiny_model_dir, reward_dirs,
                                                                      capsys, reward, extra, needle):
    """Every check that can fail before anything is written runs before --overwrite touches the old run."""
    before = snapshot(finished_run)
    reward = reward.format(policy=tiny_model_dir, **reward_dirs)
    extra = [x.format(**reward_dirs) for x in extra]
    argv = ["ppo", "--policy", str(tiny_model_dir), "--output-dir", str(finished_run), *PPO, "--reward", reward,
            *extra, "--overwrite"]
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
    last = err.strip().splitlines()[-1]  # the error and what happened to the old run: one line
    assert last.startswith("error: ") and "no such column" in last and "the previous run in" in last and "is kept" in last
    assert snapshot(finished_run) == before
    assert not [p for p in finished_run.parent.iterdir() if ".replaced-" in p.name]  # no leftovers


FLAKY = '''
import os
import torch
from rlhf_core.ppo import advantage_estimator


def _calls(name):
    path = os.environ["FLAKY_DIR"] + "/" + name
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    open(path, "w").write(str(n))
    return n


@advantage_estimator(whiten=False, critic=False, groups=False, reads_rewards=True)
def flaky(*, rewards, mask, **kw):
    if _calls("estimator") == 3 and os.environ.get("FLAKY_BREAK"):
        raise ValueError("the third batch is bad")
    seq = (rewards * mask).sum(-1, keepdim=True)
    adv = (seq - seq.mean()) * mask
    return adv, adv


def reward(prompts, responses):
    if _calls("reward") == 3 and os.environ.get("FLAKY_BREAK"):  # 1: the evaluation before training
        raise KeyError("answer")
    return [len(r) / 10.0 for r in responses]


@advantage_estimator(whiten=False, critic=False, groups=False, reads_rewards=True)
def wrong_shape(*, rewards, **kw):
    return rewards[:, :1], rewards


@advantage_estimator(whiten=False, critic=False, groups=False, reads_rewards=True)
def a_list(*, rewards, **kw):
    return rewards.tolist(), rewards


@advantage_estimator(whiten=False, critic=False, groups=False, reads_rewards=True)
def one_value(*, rewards, **kw):
    return rewards.sum()
'''


@pytest.mark.parametrize("what, argv_extra, needle, saved_step", [
    ("estimator", ["--ppo.advantage_estimator", "{code}:flaky"],
     "ppo iteration 3: ppo.advantage_estimator '{code}:flaky' raised ValueError: the third batch is bad", 2),
    ("reward", ["--reward", "{code}:reward", "--ppo.advantage_estimator", "{code}:flaky"],
     "reward batch 2: the reward raised KeyError", 1),
])
def test_user_code_failing_mid_run_saves_the_state_before_and_resumes_exactly(tiny_model_dir, tmp_path, capsys,
                                                                             monkeypatch, what, argv_extra, needle,
                                                                             saved_step):
    """An estimator (or reward) of the user's raising at iteration N: one line naming it and the iteration,
    exit 2, the state before iteration N checkpointed (save_every 0: no other); fixed, --resume ends
    byte-identical to a run that never failed."""
    code = tmp_path / "flaky.py"
    code.write_text(FLAKY)
    argv_extra = [a.format(code=code) for a in argv_extra]
    common = ["ppo", "--policy", str(tiny_model_dir), *PPO, "--ppo.num_iterations", "4", "--ppo.save_every", "0",
              *argv_extra]
    for name in ("ref", "run"):
        (tmp_path / f"calls-{name}").mkdir()
    monkeypatch.setenv("FLAKY_DIR", str(tmp_path / "calls-ref"))
    assert main([*common, "--output-dir", str(tmp_path / "ref")]) == 0
    capsys.readouterr()
    monkeypatch.setenv("FLAKY_DIR", str(tmp_path / "calls-run"))
    monkeypatch.setenv("FLAKY_BREAK", "1")
    assert main([*common, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and needle.format(code=code) in err, err
    assert f"the state before iteration {saved_step + 1} is saved" in err and "--resume" in err
    ckpts = tmp_path / "run" / "checkpoints" / "ppo"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{saved_step:06d}"]
    monkeypatch.delenv("FLAKY_BREAK")
    assert main([*common, "--output-dir", str(tmp_path / "run"), "--resume"]) == 0
    for name in ("model.safetensors",):
        assert (tmp_path / "run" / "ppo" / name).read_bytes() == (tmp_path / "ref" / "ppo" / name).read_bytes()


@pytest.mark.parametrize("function, needle", [
    ("wrong_shape", "returned advantages of shape (4, 1); expected (B, T)"),
    ("a_list", "returned advantages of shape list; expected (B, T)"),
    ("one_value", "returned Tensor; expected (advantages, returns), each (B, T)"),
])
def test_an_estimator_breaking_its_contract_is_one_line(tiny_model_dir, tmp_path, capsys, function, needle):
    code = tmp_path / "flaky.py"
    code.write_text(FLAKY)
    argv = ["ppo", "--policy", str(tiny_model_dir), *PPO, "--ppo.advantage_estimator", f"{code}:{function}",
            "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: ppo iteration 1: ppo.advantage_estimator '{code}:{function}' ") and needle in err
    assert "no checkpoint was written yet" in err


def _loss(kind):
    import torch

    def loss_fn(*, logprobs, exp, aggregate, **kw):
        per_token = -exp.advantages * torch.exp(logprobs - exp.logprobs)
        if kind == "raises":
            raise RuntimeError("my bug")
        if kind == "3-D":
            return per_token.unsqueeze(-1), {}
        if kind == "no tuple":
            return aggregate(per_token)
        if kind == "string stats":
            return aggregate(per_token), {"mine": "high"}
        return per_token.sum(-1), {}
    return loss_fn


@pytest.mark.parametrize("kind, needle", [
    ("raises", "raised RuntimeError: my bug"), ("3-D", "returned a loss of shape (2, 4, 1); expected a scalar"),
    ("no tuple", "returned Tensor; expected (loss, stats dict)"), ("string stats", "stats that are not a dict"),
    ("non-scalar", "returned a loss of shape (2,)"),
])
def test_a_loss_fn_breaking_its_contract_is_one_line(make_trainer, kind, needle):
    from rlhf_core.errors import UserCodeError
    t = make_trainer(loss_fn=_loss(kind))
    with pytest.raises(UserCodeError) as exc:
        t.train()
    msg = str(exc.value)
    assert msg.startswith("ppo iteration 1: ppo.loss_fn 'loss_fn' ") and needle in msg and "\n" not in msg, msg
