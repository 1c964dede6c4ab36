"""Bad input through the CLI: one line naming the file/record/field, exit code 2, no traceback,
and an existing good output dir stays byte-identical even with --overwrite.

The loaders' and configs' own unit tests (tests/data/test_loaders.py, tests/test_config_cli.py)
pin each message; here the same inputs go through ``rlhf`` end to end. Most cases call
``cli.main`` in-process (a subprocess costs seconds of imports); two run ``python -m rlhf_core``.
"""
import json
import warnings

import pytest

from rlhf_core.cli import main
from rlhf_core.config import PPOConfig
from rlhf_core.errors import DataError
from rlhf_core.phases.ppo import check_prompt_lengths


def good_output(tmp_path):
    """An existing rlhf run folder with content that must survive a failed --overwrite."""
    out = tmp_path / "run"
    (out / "sft").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"seed": 0}))
    (out / "sft" / "model.safetensors").write_bytes(bytes(range(256)))
    return out


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(capsys, argv, out):
    """Run the CLI over a good output with --overwrite; check the error contract; return the line."""
    before = snapshot(out)
    try:
        code = main([*argv, "--output-dir", str(out), "--overwrite"])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert snapshot(out) == before, "a failed run wrote over the existing output"
    return err


def jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


GOOD = {"prompt": "Review of a film:", "completion": " it was fine."}
DATA_CASES = {
    "missing file": ("sft", None, ["missing.jsonl", "file not found"]),
    "empty file": ("sft", b"", ["data.jsonl", "no records"]),
    "not utf-8": ("sft", jsonl(GOOD).encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n',
                  ["data.jsonl:2", "not valid UTF-8"]),
    "not json": ("sft", jsonl(GOOD, "{'prompt': 1"), ["data.jsonl:2", "not valid JSON"]),
    "misnamed field": ("sft", jsonl({"prompt": "a", "response": "b"}),
                       ["data.jsonl:1", "field 'completion'", "rename it to 'completion'"]),
    "wrong type": ("sft", jsonl(GOOD, {"prompt": 3, "completion": "b"}),
                   ["data.jsonl:2", "field 'prompt'", "expected a string, got an int"]),
    "empty prompt": ("sft", jsonl({"prompt": " ", "completion": "b"}), ["data.jsonl:1", "field 'prompt'", "empty"]),
    "empty response": ("sft", jsonl({"prompt": "a", "completion": ""}),
                       ["data.jsonl:1", "field 'completion'", "empty"]),
    "chosen is rejected": ("reward", jsonl({"prompt": "a", "chosen": "same", "rejected": "same"}),
                           ["data.jsonl:1", "field 'rejected'", "identical"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_file(case, capsys, tmp_path):
    command, content, needles = DATA_CASES[case]
    path = tmp_path / ("missing.jsonl" if content is None else "data.jsonl")
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = one_line_error(capsys, [command, "--model", str(tmp_path / "no-model"), "--data", str(path)],
                         good_output(tmp_path))
    assert all(n in err for n in needles), err


@pytest.mark.parametrize("flags, needle", [
    (["--ppo.learning_rate", "-1"], "ppo.learning_rate=-1.0: expected a positive number"),
    (["--ppo.clip_range", "0"], "ppo.clip_range=0.0: expected a positive number"),
    (["--ppo.gamma", "1.5"], "ppo.gamma=1.5: expected a number in [0, 1]"),
    (["--ppo.lam", "-0.1"], "ppo.lam=-0.1: expected a number in [0, 1]"),
    (["--ppo.batch_size", "9"], "divisible by num_mini_batches=2"),
    (["--ppo.on_long_prompt", "drop"], "ppo.on_long_prompt='drop': expected truncate or error"),
    (["--ppo.save_every", "-1"], "ppo.save_every=-1"),
    (["--ppo.device", "gpu"], "ppo.device='gpu': expected 'auto', 'cuda' or 'cpu'"),
    (["--ppo.mixed_precision", "fp16"], "ppo.mixed_precision='fp16': expected 'no' or 'bf16'"),
    (["--ppo.parallel", "fsdp2", "--ppo.value_model", "separate"], "ppo.parallel='fsdp2': expected 'ddp' with"),
    (["--ppo.shard_reference", "true"], "ppo.shard_reference=True: expected false unless parallel='fsdp2'"),
    (["--ppo.shard_reward_model", "true"], "ppo.shard_reward_model=True: expected false unless parallel='fsdp2'"),
    (["--ppo.learning_rat", "1"], "unrecognized arguments: --ppo.learning_rat"),  # no prefix matching
    (["--config", "{cfg}"], "cfg.json: unknown key 'ppo.learning_rat'"),
])
def test_invalid_configuration(flags, needle, capsys, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"ppo": {"learning_rat": 1e-5}}))
    flags = [f.replace("{cfg}", str(cfg)) for f in flags]
    assert needle in one_line_error(capsys, ["ppo", *flags], good_output(tmp_path))


def long_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(jsonl({"prompt": "A short one."}, {"prompt": "word " * 200}))
    return path


def test_long_prompt_error_names_record(capsys, tmp_path, tiny_model_dir):
    argv = ["ppo", "--policy", str(tiny_model_dir), "--prompts", str(long_prompts(tmp_path)),
            "--ppo.on_long_prompt", "error", "--ppo.max_prompt_length", "16"]
    err = one_line_error(capsys, argv, good_output(tmp_path))
    assert "prompts.jsonl:2: field 'prompt'" in err and "ppo.max_prompt_length=16" in err


def test_long_prompt_truncate_warns_once(tiny_parts, tmp_path):
    tok, _ = tiny_parts
    prompts = ["A short one.", "word " * 200, "word " * 300]
    cfg = PPOConfig(max_prompt_length=16, prompts="p.jsonl")
    with pytest.warns(UserWarning, match=r"p.jsonl: 2 of 3 prompts exceed .* \(first: record 2\)"):
        check_prompt_lengths(prompts, tok, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompt_lengths(prompts[:1], tok, cfg)
    with pytest.raises(DataError, match="p.jsonl:2: field 'prompt'"):
        check_prompt_lengths(prompts, tok, PPOConfig(max_prompt_length=16, prompts="p.jsonl", on_long_prompt="error"))


REWARDS = {
    "raises": ("def score(prompts, responses):\n    raise ValueError('judge offline')\n",
               "the reward raised ValueError: judge offline"),
    "nan": ("def score(prompts, responses):\n    return [float('nan')] * len(responses)\n", "non-finite score nan"),
    "wrong count": ("def score(prompts, responses):\n    return [0.0]\n", "scores, got 1"),
}


@pytest.mark.parametrize("case", list(REWARDS))
def test_bad_reward_function(case, capsys, tmp_path, tiny_model_dir):
    code, needle = REWARDS[case]
    (tmp_path / "judge.py").write_text(code)
    argv = ["ppo", "--policy", str(tiny_model_dir), "--reward", f"{tmp_path / 'judge.py'}:score",
            "--ppo.num_iterations", "1", "--ppo.batch_size", "4", "--ppo.response_length", "4",
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: reward batch 0:") and needle in err
    assert not (tmp_path / "out" / "ppo").exists()  # no policy saved


def test_subprocess_contract_and_debug_traceback(cli, tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_text(jsonl({"prompt": "a", "response": "b"}))
    out = good_output(tmp_path)
    before = snapshot(out)
    res = cli.run("sft", "--data", str(bad), "--output-dir", str(out), "--overwrite")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "data.jsonl:1: field 'completion'" in res.stderr and snapshot(out) == before
    res = cli.run("sft", "--data", str(bad), "--output-dir", str(out), "--overwrite", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr and "DataError" in res.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("phase", ["sft", "reward", "ppo"])
def test_cuda_asked_without_a_gpu_is_one_line_config_error(phase, capsys, tmp_path, tiny_model_dir):
    flags = (["--policy", str(tiny_model_dir), "--reward", "gold"] if phase == "ppo"
             else ["--model", str(tiny_model_dir)])
    err = one_line_error(capsys, [phase, *flags, f"--{phase}.device", "cuda"], good_output(tmp_path))
    assert f"{phase}.device: device='cuda' but torch.cuda.is_available() is False" in err, err
