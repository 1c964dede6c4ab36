"""The one pipeline: presets as data, input wiring, stop-after, resume, and the QLoRA merge before PPO."""
import json
from pathlib import Path

import pytest

from rlhf_core.cli import main
from rlhf_core.config import PipelineConfig
from rlhf_core.errors import ConfigError
from rlhf_core.pipeline import wire_inputs
from rlhf_core.presets import PRESETS, get_preset

SMALL = ["--task.n_corpus", "120", "--task.n_sft", "40", "--task.n_preferences", "8", "--task.n_prompts", "8",
         "--task.n_eval_prompts", "4", "--model.vocab_size", "300", "--model.hidden_size", "32",
         "--model.num_layers", "1", "--model.num_heads", "2", "--model.intermediate_size", "64",
         "--model.max_position_embeddings", "64", "--pretrain.max_steps", "2", "--pretrain.batch_size", "5",
         "--pretrain.block_size", "32", "--sft.max_steps", "2", "--sft.batch_size", "5", "--sft.max_length", "48",
         "--reward.max_steps", "2", "--reward.batch_size", "5", "--reward.max_length", "48",
         "--ppo.num_iterations", "1", "--ppo.batch_size", "4", "--ppo.num_mini_batches", "2",
         "--ppo.response_length", "6", "--ppo.eval_every", "0"]


def test_every_preset_is_data_the_pipeline_understands():
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.description and preset.phases
        assert set(preset.phases) <= {"pretrain", "sft", "reward", "ppo"}
        assert list(preset.phases) == sorted(preset.phases, key=["pretrain", "sft", "reward", "ppo"].index)
        for phase, fields in preset.inputs.items():
            section = getattr(PipelineConfig(), phase)
            assert set(fields) <= set(section.to_dict()), (name, phase)
            for template in fields.values():  # only {out} and the preset's own models
                template.format(out="OUT", **{m: m.upper() for m in preset.models})
        assert not preset.task_tokenizer or preset.task_tokenizer in preset.models
    with pytest.raises(ConfigError, match="preset 'huge': unknown .*tiny, smollm2"):
        get_preset("huge")


def test_wiring_fills_only_what_the_user_left_empty(tmp_path):
    cfg = PipelineConfig(preset="smollm2")
    cfg.apply_override("ppo.reward", "my_judge.py:score")
    wire_inputs(cfg, tmp_path, {"base": Path("/models/base"), "reward_backbone": Path("/models/minilm")})
    assert cfg.sft.model == "/models/base" and cfg.reward.model == "/models/minilm"
    assert cfg.ppo.policy == str(tmp_path / "sft") and cfg.ppo.reward == "my_judge.py:score"
    cfg = PipelineConfig(preset="tiny")
    cfg.apply_override("sft.mode", "qlora")
    wire_inputs(cfg, tmp_path, {})
    assert cfg.sft.model == str(tmp_path / "pretrain")
    assert cfg.ppo.policy == str(tmp_path / "sft_merged")  # PPO reads the adapter merged into its base


def test_qlora_sft_is_merged_before_ppo(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pipeline", "--output-dir", str(out), *SMALL, "--sft.mode", "qlora"]) == 0
    assert (out / "sft" / "adapter_config.json").is_file()  # SFT saved the adapter (4-bit base)
    assert (out / "sft_merged" / "model.safetensors").is_file() and not (out / "sft_merged" / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["ppo"]["policy"] == str(out / "sft_merged")
    summary = json.loads((out / "summary.json").read_text())
    assert summary.keys() == {"pipeline", "pretrain", "sft", "reward", "ppo"} and summary["pipeline"]["preset"] == "tiny"
    assert (out / "data" / "corpus.jsonl").is_file() and (out / "ppo" / "value_head.safetensors").is_file()


def test_stop_after_and_resume_keep_finished_phases(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pipeline", "--output-dir", str(out), *SMALL, "--stop-after", "sft"]) == 0
    assert json.loads((out / "summary.json").read_text()).keys() == {"pipeline", "pretrain", "sft"}
    sft_weights = (out / "sft" / "model.safetensors").stat().st_mtime_ns
    assert main(["pipeline", "--output-dir", str(out), *SMALL, "--resume"]) == 0
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == sft_weights  # not trained again
    assert json.loads((out / "summary.json").read_text()).keys() == {"pipeline", "pretrain", "sft", "reward", "ppo"}
    samples = (out / "ppo" / "samples.md").read_text()
    assert samples.startswith("| prompt | before PPO (gold) | after PPO (gold) |")
    assert "## Sample generations" in (out / "report.md").read_text()
