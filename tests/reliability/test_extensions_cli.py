"""Custom advantage estimators and losses from the command line (``file.py:function``), and their
one-line errors: exit code 2, nothing written over an existing run."""
import json

import pytest

from rlhf_core.cli import main

USER_CODE = '''
import torch
from rlhf_core.ppo import advantage_estimator, policy_loss_term

CALLS = []


@advantage_estimator(whiten=False, critic=False, groups=True, reads_rewards=True)
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


def undeclared_loss(*, logprobs, **kw):
    return -logprobs, {}


@policy_loss_term(sequence=False, critic=True)
def critic_loss(*, values, advantages, **kw):
    return -advantages * values, {}


@policy_loss_term(sequence=False, critic=False)
def one_value_per_row(*, logprobs, old_logprobs, advantages, **kw):
    return (-advantages * torch.exp(logprobs - old_logprobs)).sum(-1), {}

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
    (["--ppo.policy_loss", "nope"], "ppo.policy_loss: unknown policy loss 'nope'; registered: cispo, dual_clip"),
    (["--ppo.policy_loss", "{code}:nothing"], "ppo.policy_loss '{code}:nothing': {code} has no function 'nothing'"),
    (["--ppo.policy_loss", "{code}:undeclared_loss"], "has no declarations: decorate it with @policy_loss_term"),
    (["--ppo.policy_loss", "{bad}:f"], "ppo.policy_loss '{bad}:f': importing"),
    (["--ppo.policy_loss", "{code}:critic_loss", "--ppo.advantage_estimator", "grpo", "--ppo.group_size", "2"],
     "reads a critic's values, but ppo.advantage_estimator='grpo' is critic-free"),
    (["--ppo.clip_range_high", "0.1"], "ppo.clip_range_high=0.1 < ppo.clip_range_low=0.2"),
    (["--ppo.dual_clip_c", "1"], "ppo.dual_clip_c=1.0: expected a number > 1"),
    (["--ppo.dynamic_sampling", "true"], "ppo.dynamic_sampling=True: expected false unless group_size >= 2"),
    (["--ppo.kl_estimator", "k1", "--ppo.kl_penalty", "loss"], "its expected KL gradient is exactly 0"),
    (["--ppo.advantage_estimator", "{code}:undeclared_loss"], "does not declare whiten, critic, groups"),
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
    needle = needle.replace("{code}", str(code)).replace("{bad}", str(bad))
    assert main([*ppo_argv(tiny_model_dir, out, *flags), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert snapshot(out) == before


def test_a_user_policy_loss_breaking_its_contract_is_one_line_naming_it_and_the_iteration(tiny_model_dir, tmp_path,
                                                                                           capsys):
    code = tmp_path / "mine.py"
    code.write_text(USER_CODE)
    assert main(ppo_argv(tiny_model_dir, tmp_path / "run", "--ppo.policy_loss", f"{code}:one_value_per_row")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: ppo iteration 1: ppo.policy_loss '{code}:one_value_per_row' returned a per-token loss "
                          "of shape (4,); expected (B, T)") and "\n" not in err, err


def test_a_registered_loss_from_the_command_line_trains(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(ppo_argv(tiny_model_dir, out, "--ppo.policy_loss", "cispo", "--ppo.clip_range_low", "1",
                         "--ppo.clip_range_high", "0.28")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["ppo"]["policy_loss"] == "cispo" and config["ppo"]["clip_range_low"] == 1.0
