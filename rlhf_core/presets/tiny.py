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
)
