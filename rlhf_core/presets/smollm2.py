"""The ``smollm2`` preset: real weights offline (``make real``; docs/real_weights.md).

SmolLM2-135M-Instruct is the policy base (LoRA SFT, or QLoRA with ``--sft.mode qlora``), the
all-MiniLM-L6-v2 encoder the reward model's backbone (its own WordPiece tokenizer), the
short-question task the data (prompts in SmolLM2's chat template), and PPO trains a LoRA policy
whose reference is the adapter-disabled base. No phase 0: the model is pretrained.
"""
from ..data import short_questions
from ..weights import convert_smollm2, minilm_path
from .preset import Preset

SMOLLM2 = Preset(
    name="smollm2",
    description="SmolLM2-135M-Instruct policy + MiniLM reward model, short-question task (`make real`)",
    phases=("sft", "reward", "ppo"),
    make_task=short_questions.generate_task,
    models={"base": convert_smollm2, "reward_backbone": minilm_path},
    task_tokenizer="base",
    inputs={"sft": {"model": "{base}"},
            "reward": {"model": "{reward_backbone}"},
            "ppo": {"policy": "{out}/sft", "reward": "{out}/reward"}},
    # Sized for ~20 min on one busy CPU core: short answers (24 tokens), 16 episodes per iteration.
    config={
        "task": {"n_sft": 600, "n_preferences": 1200, "n_prompts": 256, "n_eval_prompts": 48, "label_noise": 0.1},
        "sft": {"mode": "lora", "learning_rate": 1e-3, "batch_size": 8, "epochs": 1.0, "max_steps": 100,
                "max_length": 96, "eval_fraction": 0.05, "log_every": 10, "lora_r": 16},
        "reward": {"learning_rate": 1e-4, "batch_size": 16, "epochs": 1.0, "max_length": 64, "log_every": 10},
        "ppo": {"use_lora": True, "num_iterations": 40, "batch_size": 16, "num_mini_batches": 2, "ppo_epochs": 2,
                "response_length": 24, "max_prompt_length": 64, "temperature": 0.7, "learning_rate": 3e-4,
                "kl_coef": 0.05, "eval_every": 10, "num_threads": 1},
    },
)
