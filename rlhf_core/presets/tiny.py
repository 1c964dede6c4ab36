"""The ``tiny`` preset (``make demo``): the movie-review task, a random-init 4-layer Llama and a
byte-level BPE tokenizer trained on the task's corpus (phase 0), every phase on a CPU in ~1 min.

The model's shape is the ``model`` config section (TinyModelConfig); its defaults are the demo's.
"""
from ..data import movie_reviews
from .preset import Preset

TINY = Preset(
    name="tiny",
    description="random-init Llama + locally trained tokenizer, movie-review task, all four phases",
    phases=("pretrain", "sft", "reward", "ppo"),
    make_task=movie_reviews.generate_task,
    inputs={"sft": {"model": "{out}/pretrain"},
            "reward": {"model": "{out}/pretrain"},
            "ppo": {"policy": "{out}/sft", "reward": "{out}/reward"}},
    # The critic on its own trunk, a copy of the reward model's (as InstructGPT's): the policy's states do not
    # encode the score (a ridge or MLP head fitted on them explains <= 0.08 of the returns), so a head on the
    # shared trunk learned only their mean (val/explained_variance -0.13 to 0); from the reward model's trunk
    # it ends at 0.4-0.67 (3 seeds) at an equal gold reward, for ~20 s more PPO (46 -> 66 s).
    # The demo's sizes: its prompts are ~10 tokens and its answers a sentence (the PPO defaults, 512 / 256, fit a
    # real chat model).
    pipeline_config={"ppo": {"value_model": "separate", "value_init_from_reward": True, "max_prompt_length": 32,
                             "response_length": 24}},
)
