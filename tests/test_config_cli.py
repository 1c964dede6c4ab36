"""Config parsing, validation and the CLI's error contract (one line, exit code 2, nothing written)."""
import json
import subprocess
import sys

import pytest

from rlhf_core.cli import build_parser, main
from rlhf_core.config import PHASES, PipelineConfig, PPOConfig, SFTConfig
from rlhf_core.errors import ConfigError


def test_every_field_has_help():
    for cls in [*PHASES.values(), type(PipelineConfig().model), type(PipelineConfig().task)]:
        for name, _, help_text in cls.help_lines():
            assert help_text.strip(), f"{cls.__name__}.{name} has no help"


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sft", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name, _, help_text in SFTConfig.help_lines():
        assert f"--sft.{name}" in text
    assert "LoRA rank" in text


def test_overrides_are_typed():
    cfg = PipelineConfig()
    cfg.apply_override("sft.learning_rate", "1e-4")
    cfg.apply_override("ppo.adaptive_kl", "true")
    cfg.apply_override("sft.lora_target_modules", "q_proj,k_proj")
    assert cfg.sft.learning_rate == 1e-4 and isinstance(cfg.sft.learning_rate, float)
    assert cfg.ppo.adaptive_kl is True
    assert cfg.sft.lora_target_modules == ["q_proj", "k_proj"]


@pytest.mark.parametrize("key,value,needle", [
    ("sft.learning_rate", "-1", "sft.learning_rate"),
    ("ppo.clip_range", "0", "ppo.clip_range"),
    ("ppo.gamma", "1.5", "ppo.gamma"),
    ("ppo.lam", "-0.1", "ppo.lam"),
    ("ppo.batch_size", "31", "divisible by num_mini_batches"),
    ("ppo.kl_estimator", "k9", "ppo.kl_estimator"),
    ("ppo.kl_penalty", "both", "ppo.kl_penalty='both' with ppo.kl_estimator='k1': expected one of reward ("),
    ("ppo.kl_penalty", "everywhere", "ppo.kl_penalty='everywhere' with ppo.kl_estimator='k1'"),
    ("ppo.top_k", "50", "ppo.top_k=50: expected 0: PPO rollouts sample the full softmax"),
    ("ppo.top_p", "0.9", "ppo.top_p=0.9: expected 1.0: PPO rollouts sample the full softmax"),
    ("sft.mode", "8bit", "sft.mode"),
    ("sft.batch_size", "abc", "expected an integer"),
])
def test_invalid_values_raise_one_line(key, value, needle):
    cfg = PipelineConfig()
    with pytest.raises(ConfigError) as exc:
        cfg.apply_override(key, value)
        cfg.validate()
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"ppo": {"learning_rat": 1e-5}}))
    with pytest.raises(ConfigError, match=r"cfg.json: unknown key 'ppo.learning_rat'"):
        PipelineConfig.from_dict(json.loads(path.read_text()), source=str(path))


def test_round_trip_through_dict():
    cfg = PipelineConfig()
    cfg.apply_override("ppo.kl_coef", "0.2")
    again = PipelineConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_ppo_defaults_valid():
    PPOConfig().validate()


def _cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "rlhf_core", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("flags, needle", [
    (["--ppo.clip_range", "-1"], "ppo.clip_range"),
    (["--ppo.kl_estimator", "k3", "--ppo.kl_penalty", "both"], "ppo.kl_penalty='both' with ppo.kl_estimator='k3'"),
])
def test_cli_bad_config_exits_2_without_traceback(tmp_path, flags, needle):
    out = tmp_path / "run"
    res = _cli(["ppo", "--output-dir", str(out), *flags], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert needle in res.stderr
    assert not out.exists(), "nothing is written for an invalid config"


def test_cli_unparseable_config_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = _cli(["sft", "--config", str(bad), "--output-dir", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 2 and "bad.json" in res.stderr and "Traceback" not in res.stderr


def test_cli_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    res = _cli(["pipeline", "--output-dir", str(out)], tmp_path)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    res = _cli(["pipeline", "--output-dir", str(out), "--overwrite"], tmp_path)
    assert res.returncode == 2 and "not an rlhf run folder" in res.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_parser_knows_all_commands():
    parser = build_parser()
    for command in ("pretrain", "sft", "reward", "ppo", "pipeline"):
        ns = parser.parse_args([command, "--output-dir", "x"])
        assert ns.command == command
    assert parser.parse_args(["report", "runs/demo"]).output_dir == "runs/demo"
