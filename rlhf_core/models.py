"""Build, load and save the models of every phase: tiny random-init Llama, LoRA/QLoRA, reward models.

References: LoRA (Hu et al. 2021), QLoRA (Dettmers et al. 2023: nf4 + double quantization + bf16
compute + gradient checkpointing), HF ``LlamaForSequenceClassification`` (reward = score head on
the last non-pad token, found through ``config.pad_token_id``).

Saved folders are plain HF folders (safetensors + tokenizer) that ``AutoModel*.from_pretrained``
loads. A QLoRA run saves its *adapter* (a 4-bit merge would be lossy): the folder holds
``adapter_config.json`` whose ``base_model_name_or_path`` is the absolute base folder, so
``AutoModelForCausalLM.from_pretrained(adapter_dir)`` (transformers' PEFT integration) and
:func:`load_causal_lm` both load base + adapter.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig,
                          LlamaConfig, LlamaForCausalLM)
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation
from transformers.utils import logging as hf_logging

from .checkpoint import atomic_dir
from .config import LoraFields, TinyModelConfig
from .errors import ConfigError

# bitsandbytes probes a hub package that is also named `kernels`; ours is a different one.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

ADAPTER_FILE = "adapter_config.json"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports/progress bars (expected when swapping heads), then restore."""
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_model_dir(path: str, what: str = "model") -> Path:
    """Raise a one-line ConfigError unless ``path`` is a folder holding an HF model or adapter."""
    p = Path(path) if path else None
    if p is None or not p.is_dir():
        raise ConfigError(f"{what} folder not found: '{path}' (expected a local HF model folder)")
    if not (p / "config.json").is_file() and not (p / ADAPTER_FILE).is_file():
        raise ConfigError(f"{p}: no config.json or {ADAPTER_FILE} — not a saved HF {what} folder")
    return p


def build_tiny_model(tokenizer: Any, model_cfg: TinyModelConfig, seed: int = 0) -> nn.Module:
    """Random-init Llama-style causal LM sized by ``model_cfg`` (q_proj/v_proj exist for LoRA).

    pad/eos/bos ids come from the tokenizer; the vocabulary is ``len(tokenizer)`` so added tokens fit.
    """
    model_cfg.validate()
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), model_cfg.vocab_size),
        hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_heads,
        intermediate_size=model_cfg.intermediate_size,
        max_position_embeddings=model_cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_tokenizer(path: str) -> Any:
    """Load a tokenizer folder; ensure a pad token distinct from eos and right padding."""
    p = Path(path) if path else None
    if p is None or not p.is_dir():
        raise ConfigError(f"tokenizer folder not found: '{path}'")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    # A pad equal to eos would mask the eos out of the loss and of the reward's last-token lookup.
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = "right"
    return tok


def lora_config(lora: LoraFields, task_type: str, modules_to_save: list[str] | None = None) -> Any:
    """peft LoraConfig from the shared LoRA fields."""
    from peft import LoraConfig  # peft takes seconds to import: only LoRA paths pay for it
    return LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                      target_modules=list(lora.lora_target_modules), task_type=task_type,
                      modules_to_save=modules_to_save)


def base_path_of(path: Path) -> str | None:
    """The base folder an adapter folder points to (None for a plain model folder)."""
    cfg = path / ADAPTER_FILE
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text())["base_model_name_or_path"]


def load_causal_lm(path: str, mode: str = "full", lora: LoraFields | None = None,
                   dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False) -> nn.Module:
    """Load a causal LM folder for training.

    Args:
        mode: "full" (all weights train), "lora" (peft adapters on ``lora.lora_target_modules``)
            or "qlora" (frozen nf4 base with double quantization and bf16 compute, gradient
            checkpointing, then LoRA adapters).
        lora: LoRA settings (defaults: r=8, alpha=32, dropout 0.05, q_proj/v_proj).
    An adapter folder (a saved QLoRA run) loads as its base with the adapter attached.
    """
    if mode not in ("full", "lora", "qlora"):
        raise ConfigError(f"mode={mode!r}: expected one of full, lora, qlora")
    p = check_model_dir(path)
    lora = lora or LoraFields()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False}
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = "cpu" if not torch.cuda.is_available() else {"": 0}
    if base_path_of(p) is not None and mode != "full":
        raise ConfigError(f"{p}: is an adapter folder; merge it first or train it in mode 'full'")
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    if mode == "full":
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training  # seconds to import: LoRA paths only
    if mode == "qlora":
        # bnb repacks 4-bit weights in place for CPU eval (avx512bf16 path); that layout fails on
        # small shapes (RuntimeError: shape '[32, 0]') and alternates with training: keep one layout.
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    return get_peft_model(model, lora_config(lora, "CAUSAL_LM"))


def _seq_cls_from(path: Path, num_labels: int, pad_token_id: int | None) -> nn.Module:
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, trust_remote_code=False, dtype=torch.float32)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def check_reward_dir(path: str, tokenizer_path: str = "") -> Path:
    """Refuse, in one line, a reward folder whose scores would be random: a model that is not a sequence
    classifier (a causal LM, e.g. the SFT policy, would get a freshly initialised score head), one with
    more than one label, or a tokenizer with more tokens than the model's embeddings (its ids past them
    would read random rows). Reads config.json and the tokenizer only (no weights): cheap enough for
    the checks a run makes before it writes anything.

    Raises:
        ConfigError: any of the above, or a folder that is not a saved HF model.
    """
    p = check_model_dir(path, "reward model")
    if not (p / "config.json").is_file():  # an adapter folder: its base says what it is
        return p
    config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        kind = archs[0] if archs else config.get("model_type", "model")
        raise ConfigError(f"{p}: a {kind}, not a sequence classifier: as a reward its score head would be freshly "
                          "initialised (random scores). Give a folder trained by `rlhf reward` or an HF sequence "
                          "classifier with one label")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
    if labels != 1:
        raise ConfigError(f"{p}: a classifier with {labels} labels; a reward model has one scalar output "
                          "(num_labels=1)")
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    tok = load_tokenizer(tokenizer_path or str(p))
    if vocab and len(tok) > vocab:
        raise ConfigError(f"{p}: its tokenizer has {len(tok)} tokens but the model's embeddings only {vocab}: the "
                          "ids past them would read rows nobody trained; give the tokenizer the model was trained "
                          "with")
    return p


def load_reward_model(path: str, num_labels: int = 1, tokenizer_path: str = "") -> tuple[nn.Module, Any]:
    """(sequence classifier, its tokenizer) from a folder (checked by :func:`check_reward_dir`);
    ``config.pad_token_id`` set so the score is read at the last non-pad token.

    Raises:
        ConfigError: ``check_reward_dir``'s cases, or weights that lack the classifier's head (it would be
            freshly initialised).
    """
    p = check_reward_dir(path, tokenizer_path)
    tok = load_tokenizer(tokenizer_path or str(p))
    with quiet_transformers():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(p), num_labels=num_labels, trust_remote_code=False, dtype=torch.float32, output_loading_info=True)
    if info.get("missing_keys"):
        raise ConfigError(f"{p}: its weights lack {', '.join(sorted(info['missing_keys'])[:3])}: the classifier "
                          "would score with freshly initialised parameters")
    if tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def build_reward_model_from_lm(path: str, mode: str = "full", lora: LoraFields | None = None,
                               tokenizer: Any | None = None) -> nn.Module:
    """``AutoModelForSequenceClassification(num_labels=1)`` from a causal-LM (or classifier) folder:
    backbone weights loaded, a new scalar ``score`` head. mode "lora" trains adapters + the head."""
    if mode not in ("full", "lora"):
        raise ConfigError(f"mode={mode!r}: expected one of full, lora")
    p = check_model_dir(path, "reward backbone")
    model = _seq_cls_from(p, 1, tokenizer.pad_token_id if tokenizer is not None else None)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if mode == "lora":
        from peft import get_peft_model  # seconds to import: LoRA paths only
        model = get_peft_model(model, lora_config(lora or LoraFields(), "SEQ_CLS", modules_to_save=["score"]))
    return model


def module_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)``, except a quantized (bitsandbytes) model, which ``load_causal_lm``
    already placed with a ``device_map`` and which cannot move."""
    return model if is_quantized(model) else model.to(device)


def is_quantized(model: nn.Module) -> bool:
    """True when the (possibly peft-wrapped) model holds bitsandbytes 4/8-bit weights."""
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def fast_activations(*models: nn.Module | None) -> int:
    """Swap GPT-2's tanh GELU modules for transformers' one-kernel ``GELUTanh``, in place.

    ``NewGELUActivation`` (``gelu_new``) and ``FastGELUActivation`` (``gelu_fast``) compute
    0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) in five or six element-wise ops, each a pass over
    the activations (and as many saved tensors for backward); ``GELUTanh`` is the same formula as
    one ``F.gelu(x, approximate="tanh")`` kernel. Results differ by float rounding only.
    Returns: the number of modules swapped.
    """
    swapped = 0
    for model in models:
        if not isinstance(model, nn.Module):
            continue
        for module in list(model.modules()):
            for name, child in module.named_children():
                if type(child) in (NewGELUActivation, FastGELUActivation):
                    setattr(module, name, GELUTanh())
                    swapped += 1
    return swapped


def is_peft(model: nn.Module) -> bool:
    """True for a peft-wrapped model (``PeftModel``), told by its adapter API rather than by
    importing peft (seconds) on every save."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, merge: bool = True,
               base_path: str | None = None, state_dict: dict[str, torch.Tensor] | None = None,
               extra: Callable[[Path], None] | None = None) -> Path:
    """Save safetensors + tokenizer into ``out_dir`` atomically: the one save path of every phase.

    A peft model is merged into a plain model when ``merge`` (LoRA; in place — pass a copy to keep
    training the adapter); a quantized (QLoRA) model always saves its adapter, whose config points
    at the absolute ``base_path``. ``state_dict``: the full weights to write instead of the
    model's own (FSDP2 shards gathered by :func:`rlhf_core.fsdp.full_state_dict`). ``extra(folder)``
    writes more files into the same atomic folder (PPO's value head, its trace).
    """
    out_dir = Path(out_dir)
    if is_peft(model):
        if is_quantized(model) or not merge:
            if base_path is not None:
                for cfg in model.peft_config.values():
                    cfg.base_model_name_or_path = str(Path(base_path).resolve())
        else:
            model = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp, quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return out_dir


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a saved (Q)LoRA adapter into its float32 base, so the next phase loads a plain model.

    The base is the folder the adapter's config names (``base_model_name_or_path``). For QLoRA
    (trained on the nf4 base) this is standard practice; the merged model is not bit-identical to
    the 4-bit one it was trained against.
    """
    from peft import PeftModel  # seconds to import; only adapter merges need it
    adapter_dir = check_model_dir(str(adapter_dir), "adapter")
    base = base_path_of(adapter_dir)
    if base is None:
        raise ConfigError(f"{adapter_dir}: no {ADAPTER_FILE}: not an adapter folder, nothing to merge")
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return save_model(model, load_tokenizer(str(adapter_dir)), out_dir, merge=True)
