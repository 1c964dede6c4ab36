"""One dataclass per phase. Every field carries a help string (it becomes ``rlhf PHASE --help``).
PPO's lives in config_ppo.py, the fields the phases share in config_common.py; all are importable from here.

A config file (JSON or YAML) holds one section per phase (``pretrain``, ``sft``, ``reward``,
``ppo``) plus top-level ``seed`` and ``preset``; command-line overrides are dotted
(``--sft.learning_rate 1e-4``). ``validate()`` raises :class:`ConfigError` with one clear line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config_base import ConfigBase, coerce, load_config_file, opt, parse_literal  # noqa: F401 (public here)
from .config_common import LoraFields, PhaseCommon, TrainCommon  # noqa: F401 (public here)
from .config_ppo import KL_PENALTIES, LOSS_AGGREGATIONS, PPOConfig  # noqa: F401 (public here)
from .errors import ConfigError



@dataclass
class TinyModelConfig(ConfigBase):
    """Shape of the random-init Llama-style model of the ``tiny`` preset (q/v projections for LoRA)."""
    _section = "model"
    vocab_size: int = opt(512, "BPE vocabulary size of the locally trained tokenizer")
    hidden_size: int = opt(64, "width of the residual stream")
    num_layers: int = opt(4, "number of decoder layers (2 layers cannot learn negation well enough for the RM)")
    num_heads: int = opt(4, "attention heads (hidden_size must divide evenly)")
    intermediate_size: int = opt(192, "MLP inner width")
    max_position_embeddings: int = opt(256, "longest sequence the model sees")

    def validate(self) -> None:
        for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            self.check(getattr(self, k) > 0, k, "a positive integer")
        self.check(self.hidden_size % self.num_heads == 0, "hidden_size", "a multiple of num_heads")


@dataclass
class TaskConfig(ConfigBase):
    """The embedded offline task: sizes of each generated split."""
    _section = "task"
    n_corpus: int = opt(3000, "raw domain documents for phase 0")
    n_sft: int = opt(1500, "prompt/completion pairs for phase 1")
    n_preferences: int = opt(3000, "prompt/chosen/rejected triples for phase 2")
    n_prompts: int = opt(512, "PPO training prompts")
    n_eval_prompts: int = opt(64, "held-out prompts on which the gold reward is measured")
    label_noise: float = opt(0.1, "probability a preference label is flipped (the RM never sees the gold scorer)")

    def validate(self) -> None:
        for k in ("n_corpus", "n_sft", "n_preferences", "n_prompts", "n_eval_prompts"):
            self.check(getattr(self, k) > 0, k, "a positive integer")
        self.check(0.0 <= self.label_noise < 0.5, "label_noise", "a probability in [0, 0.5)")


@dataclass
class PretrainConfig(TrainCommon):
    """Phase 0: domain causal-LM pretraining on raw text cut into fixed blocks."""
    _section = "pretrain"
    model: str = opt("tiny", "'tiny' (random init from the model section) or a local HF model folder")
    tokenizer: str = opt("", "tokenizer folder (default: the model's; with 'tiny': trained on the data)")
    data: str = opt("", "text data: JSONL/parquet with a 'text' field, or a datasets folder (default: embedded task)")
    block_size: int = opt(64, "tokens per training block (group_texts)")
    learning_rate: float = opt(3e-3, "peak AdamW learning rate")
    epochs: float = opt(2.0, "passes over the grouped blocks")

    def validate(self) -> None:
        super().validate()
        self.check(self.block_size > 1, "block_size", "an integer > 1")


@dataclass
class SFTConfig(LoraFields, TrainCommon):
    """Phase 1: supervised fine-tuning with the loss on response tokens only."""
    _section = "sft"
    model: str = opt("", "base model folder (default in the pipeline: phase 0's output)")
    data: str = opt("", "prompt/completion or messages data (default: embedded task)")
    mode: str = opt("full", "'full', 'lora' or 'qlora' (4-bit nf4, double quant, bf16 compute)")
    max_length: int = opt(96, "longest prompt+response in tokens; longer records are truncated")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (on by default under qlora)")
    merge_adapter: bool = opt(True, "merge LoRA weights into the base when saving (qlora saves the adapter)")
    learning_rate: float = opt(1e-3, "peak AdamW learning rate")
    epochs: float = opt(2.0, "passes over the SFT pairs")

    def validate(self) -> None:
        super().validate()
        self.validate_lora()
        self.check(self.mode in ("full", "lora", "qlora"), "mode", "one of full, lora, qlora")
        self.check(self.max_length > 1, "max_length", "an integer > 1")


@dataclass
class RewardConfig(LoraFields, TrainCommon):
    """Phase 2: a scalar reward model trained with the pairwise Bradley-Terry loss."""
    _section = "reward"
    model: str = opt("", "backbone folder (default in the pipeline: phase 0's output)")
    tokenizer: str = opt("", "the reward model's own tokenizer folder (default: the backbone's)")
    data: str = opt("", "prompt/chosen/rejected data (default: embedded task)")
    mode: str = opt("full", "'full' or 'lora' (the score head is always trained)")
    max_length: int = opt(96, "longest prompt+response in tokens")
    learning_rate: float = opt(1e-3, "peak AdamW learning rate")
    epochs: float = opt(3.0, "passes over the preference triples")

    def validate(self) -> None:
        super().validate()
        self.validate_lora()
        self.check(self.mode in ("full", "lora"), "mode", "one of full, lora")
        self.check(self.max_length > 1, "max_length", "an integer > 1")


PHASES: dict[str, type[ConfigBase]] = {
    "pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig,
}


@dataclass
class PipelineConfig:
    """The whole run: top-level seed and preset plus one section per phase."""
    seed: int = 0
    preset: str = "tiny"
    report_to: str = "none"  # trackers, comma-separated: none, tensorboard, wandb, trackio (trackers.py)
    project: str = "rlhf-core"  # the trackers' project (W&B, trackio)
    run_name: str = ""  # the trackers' run name (default: the output folder's name)
    tags: list[str] = field(default_factory=list)  # W&B tags
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    SECTIONS = ("model", "task", "pretrain", "sft", "reward", "ppo")
    TRACKING = ("report_to", "project", "run_name", "tags")  # may change on --resume

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PipelineConfig":
        known = {"seed", "preset", *cls.TRACKING, *cls.SECTIONS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
        out = cls()
        for name in cls.SECTIONS:
            if name in data:
                if not isinstance(data[name], dict):
                    raise ConfigError(f"{source}: section '{name}' must be a mapping")
                section_cls = type(getattr(out, name))
                setattr(out, name, section_cls.from_dict(data[name], source))
        if "seed" in data:
            out.seed = coerce(data["seed"], int, f"{source}: seed")
        if "preset" in data:
            out.preset = coerce(data["preset"], str, f"{source}: preset")
        for key in cls.TRACKING:
            if key in data:
                setattr(out, key, coerce(data[key], list[str] if key == "tags" else str, f"{source}: {key}"))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "preset": self.preset, **{k: getattr(self, k) for k in self.TRACKING},
                **{name: getattr(self, name).to_dict() for name in self.SECTIONS}}

    def apply_override(self, dotted: str, raw: str) -> None:
        if dotted in self.TRACKING:
            setattr(self, dotted, coerce(raw, list[str] if dotted == "tags" else str, f"--{dotted}"))
            return
        if dotted in ("seed", "preset"):
            setattr(self, dotted, coerce(parse_literal(raw) if dotted == "seed" else raw,
                                         int if dotted == "seed" else str, f"--{dotted}"))
            return
        section, _, key = dotted.partition(".")
        if section not in self.SECTIONS or not key:
            raise ConfigError(f"--{dotted}: unknown override (use --SECTION.FIELD, sections: {', '.join(self.SECTIONS)})")
        setattr(self, section, getattr(self, section).override(key, raw, f"--{dotted}"))

    def validate(self) -> None:
        for name in self.SECTIONS:
            getattr(self, name).validate()
