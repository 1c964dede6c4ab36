"""A tiny byte-level BPE tokenizer trained locally (nothing is downloaded).

Special tokens have fixed ids — ``<pad>`` 0, ``</s>`` (EOS) 1, ``<s>`` (BOS) 2 — and pad differs
from EOS, so a padded batch never hides where a response ended (TRL's PPO requires this too).
Encoding adds no special tokens: the phases append EOS to completions themselves.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS = "<pad>", "</s>", "<s>"

# Plain-text turns so the tiny model can learn them; the generation prompt ends without a space,
# matching the task's convention that completions start with one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512,
                    model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Every byte is in the initial alphabet, so any string encodes (no unknown token); the
    remaining ``vocab_size - 259`` slots hold merges learned from ``texts``.

    Args:
        texts: training documents (e.g. the task corpus).
        vocab_size: final vocabulary size including the 3 special tokens; at least 259.
        model_max_length: longest sequence the model accepts (recorded in the tokenizer).

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/eos/bos set, right padding and a chat template;
        ``save_pretrained(dir)`` then ``AutoTokenizer.from_pretrained(dir)`` round-trips.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 3:
        raise ValueError(f"vocab_size={vocab_size}: must be at least {len(alphabet) + 3} "
                         "(256 bytes + 3 special tokens)")
    tok = Tokenizer(models.BPE())
    # use_regex splits words GPT-2 style, so merges never cross word boundaries.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, BOS],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS,
        padding_side="right", model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
