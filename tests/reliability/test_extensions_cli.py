"""Custom advantage estimators and losses from the command line (``file.py:function``), and their
one-line errors: exit code 2, nothing written over an existing run."""
import json

import pytest

from rlhf_core.cli import main

USER_CODE = '''
import torch
from rlhf_core.ppo import advantage_estimator

CALLS = []


@advantage_estimator(whiten=False, critic=False, groups=True)
def group_median(*, rewards, mask, group_size, **kw):
    """A_i = R_i - median of its group (R_i from the KL-penalised rewards)."""
    seq = (rewards * mask).sum(-1).view(-1, group_size)
    adv = (seq - seq.median(dim=1, keepdim=True).values).reshape(-1, 1) * mask
    open(__file__ + ".calls", "a").write("estimator\\n")
    return adv, adv


def clipped_per_token(*, logprobs, exp, config, **kw):
    """The clipped surrogate as per-token terms: the trainer aggregates them."""
    open(__file__ + ".calls", "a").write("loss\\n")
    ratio = torch.exp(logprobs - exp.logprobs)
    clipped = ratio.clamp(1 - config.clip_range, 1 + config.clip_range)
    return torch.maximum(-exp.advantages * ratio, -exp.advantages * clipped), {}


def broken(**kw):
    raise RuntimeError("boom")

raise_on_import = False
'''


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def ppo_argv(model, out, *flags):
    return ["ppo", "--policy", str(model), "--reward", "gold", "--output-dir", str(out),
            "--ppo.num_iterations", "2", "--ppo.batch_size", "4", "--ppo.num_mini_batches", "1",
            "--ppo.response_length", "4", "--ppo.eval_every", "0", *flags]


def test_estimator_and_loss_from_a_file_train_a_critic_free_policy(tiny_model_dir, tmp_path, capsys):
    code = tmp_path / "mine.py"
    code.write_text(USER_CODE)
    out = tmp_path / "run"
    assert main(ppo_argv(tiny_model_dir, out, "--ppo.advantage_estimator", f"{code}:group_median",
                         "--ppo.loss_fn", f"{code}:clipped_per_token", "--ppo.group_size", "2")) == 0
    calls = (tmp_path / "mine.py.calls").read_text().split()
    assert calls.count("estimator") == 2 and calls.count("loss") == 2 * 4  # 2 iterations x 4 epochs
    assert not (out / "ppo" / "value_head.safetensors").exists()  # critic-free: no value head saved
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in records if r.get("phase") == "ppo" and r.get("step", 0) > 0]
    assert ppo and "loss/value" not in ppo[-1] and "check/first_ratio_dev" in ppo[-1]


@pytest.mark.parametrize("flags, needle", [
    (["--ppo.advantage_estimator", "mine"], "ppo.advantage_estimator: unknown advantage estimator 'mine'"),
    (["--ppo.advantage_estimator", "{code}:nothing"], "has no function 'nothing'"),
    (["--ppo.advantage_estimator", "{code}:group_median"], "ppo.group_size=1: advantage_estimator"),
    (["--ppo.advantage_estimator", "grpo", "--ppo.group_size", "3"], "ppo.batch_size"),
    (["--ppo.loss_fn", "{code}"], "ppo.loss_fn="),
    (["--ppo.loss_fn", "{bad}:f"], "importing"),
    (["--ppo.loss_aggregation", "sum"], "ppo.loss_aggregation"),
    (["--ppo.whiten_advantages", "maybe"], "ppo.whiten_advantages"),
])
def test_bad_extension_settings_are_one_line_and_write_nothing(tiny_model_dir, tmp_path, capsys, flags, needle):
    code, bad = tmp_path / "mine.py", tmp_path / "bad.py"
    code.write_text(USER_CODE)
    bad.write_text("raise ImportError('no such thing')\n")
    out = tmp_path / "run"
    (out / "ppo").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    flags = [f.replace("{code}", str(code)).replace("{bad}", str(bad)) for f in flags]
    assert main([*ppo_argv(tiny_model_dir, out, *flags), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert snapshot(out) == before
