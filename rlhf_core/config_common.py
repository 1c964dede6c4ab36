"""The fields the phase configs share: PhaseCommon (every training phase, PPO included), TrainCommon (the
supervised phases) and LoraFields. The phases' own dataclasses: config.py (pretrain, SFT, reward model, the
pipeline) and config_ppo.py (PPO)."""
from __future__ import annotations

from dataclasses import dataclass

from .config_base import ConfigBase, opt


@dataclass
class PhaseCommon(ConfigBase):
    """Fields every training phase shares, the supervised ones and PPO (steps: optimizer steps;
    PPO logs and saves per iteration)."""
    learning_rate: float = opt(1e-3, "peak AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay (TRL's PPO uses 0)")
    batch_size: int = opt(16, "sequences per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    seed: int = opt(0, "seed for init, shuffling, dropout and sampling")
    log_every: int = opt(10, "log metrics every N optimizer steps")
    save_every: int = opt(200, "write a resumable checkpoint every N optimizer steps "
                               "(and at the end; 0: end only)")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints (older ones are deleted)")
    max_skipped_steps: int = opt(10, "stop with an error after N optimizer steps in a row skipped for a "
                                     "non-finite loss or gradient")
    device: str = opt("auto", "'auto' (cuda:LOCAL_RANK when torch sees a GPU, else cpu), 'cuda' or 'cpu'")
    parallel: str = opt("ddp", "under torchrun: 'ddp' (a full replica per rank) or 'fsdp2' (fully_shard per "
                               "transformer block: weights, gradients and optimizer state sharded over ranks; "
                               "full models only; PPO shards the policy's trunk, the value head stays replicated)")
    mixed_precision: str = opt("no", "'no' or 'bf16': bf16 compute (autocast on one device; FSDP2's MixedPrecisionPolicy "
                                     "with parallel='fsdp2'), fp32 weights, optimizer state, logprobs, KL and losses; "
                                     "refused on a device without native bf16 (rlhf_core/precision.py)")

    def validate(self) -> None:
        self.check(self.learning_rate > 0, "learning_rate", "a positive number")
        self.check(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        self.check(self.batch_size > 0, "batch_size", "a positive integer")
        self.check(self.max_grad_norm >= 0, "max_grad_norm", "a number >= 0")
        self.check(self.log_every > 0, "log_every", "a positive integer")
        self.check(self.save_every >= 0, "save_every", "an integer >= 0")
        self.check(self.keep_checkpoints > 0, "keep_checkpoints", "a positive integer")
        self.check(self.max_skipped_steps > 0, "max_skipped_steps", "a positive integer")
        self.check(self.device in ("auto", "cuda", "cpu"), "device", "'auto', 'cuda' or 'cpu'")
        self.check(self.parallel in ("ddp", "fsdp2"), "parallel", "'ddp' or 'fsdp2'")
        self.check(self.mixed_precision in ("no", "bf16"), "mixed_precision", "'no' or 'bf16'")


@dataclass
class TrainCommon(PhaseCommon):
    """Fields every supervised phase (pretrain, SFT, reward model) adds."""
    epochs: float = opt(1.0, "passes over the training data (fractions allowed)")
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: no limit)")
    warmup_ratio: float = opt(0.05, "fraction of steps with linear LR warm-up")
    eval_fraction: float = opt(0.1, "fraction of records held out for evaluation")

    def validate(self) -> None:
        super().validate()
        self.check(self.epochs > 0, "epochs", "a positive number")
        self.check(0 <= self.warmup_ratio < 1, "warmup_ratio", "a fraction in [0, 1)")
        self.check(0 < self.eval_fraction < 1, "eval_fraction", "a fraction in (0, 1)")
        self.check(self.parallel == "ddp" or getattr(self, "mode", "full") == "full", "parallel",
                   "'ddp' with LoRA/QLoRA (fsdp2 shards full-model training)")


@dataclass
class LoraFields(ConfigBase):
    """LoRA/QLoRA settings; defaults reproduce the second seed (r=8, alpha=32, dropout 0.05, q/v)."""
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] = opt(["q_proj", "v_proj"], "module names that get adapters")

    def validate_lora(self) -> None:
        self.check(self.lora_r > 0, "lora_r", "a positive integer")
        self.check(0 <= self.lora_dropout < 1, "lora_dropout", "a probability in [0, 1)")
