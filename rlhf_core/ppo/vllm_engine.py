"""The vLLM rollout engine (``--ppo.rollout_engine vllm``): a colocated, in-process ``vllm.LLM`` per process.

The engine is built from the policy's config with placeholder weights (``load_format="dummy"``) and gets the
policy's real weights before every rollout through ``collective_rpc("reload_weights")`` — the one weight path
that works on vLLM's CPU backend (a direct ``model.load_weights``, TRL's colocate path, leaves the oneDNN-repacked
linear layers empty there). LoRA goes in merged (W + s·BA, in a copy); a shared-trunk value head never goes in:
it is not part of the LM's state dict. Sampling matches ``rollout.generate``: the full softmax at the training
temperature, at most ``response_length`` tokens, stop at EOS; each request's seed is drawn from the trainer's
sampling generator, so the stream is checkpointed with it. vLLM reports log μ(a_t|s_t) of every sampled token
after the temperature (``logprobs_mode="processed_logprobs"``): the behavior logprobs of the Experience.

References: vLLM ``LLM`` / ``SamplingParams`` (docs.vllm.ai); TRL's GRPOTrainer ``vllm_mode="colocate"``.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..config import PPOConfig
from ..distributed import is_dtensor
from ..errors import ConfigError

INSTALL = "pip install -e .[vllm] -c constraints-vllm.txt (docs/rollout.md)"
# On a GPU the colocated engine shares the device with training: its weights and KV cache get this share of the
# GPU memory (vLLM's own default, 0.9, is for a device of its own). Untested: no session has had vLLM on a GPU.
GPU_MEMORY_SHARE = 0.3


def import_vllm() -> Any:
    """The ``vllm`` module, imported in-process (no engine subprocess), or a one-line ConfigError."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # colocated: the engine lives in the trainer's process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # import and startup: Triton, LD_PRELOAD, chat-template noise
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"ppo.rollout_engine=vllm: vLLM is not installed ({type(e).__name__}: {e}); {INSTALL}") from e
    # Every sync: rotary embeddings hold a computed cos/sin cache, no weights; vLLM keeps it and warns per layer.
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
        lambda r: "RotaryEmbedding: Failed to load weights" not in r.getMessage())
    return vllm


def keep_trainer_process_group() -> None:
    """Under torchrun the in-process engine joins the trainer's process group (vLLM's world group spans the
    trainer's ranks; with one GPU-less or tensor-parallel-1 engine per rank no collective runs while sampling). But
    its shutdown — when the engine is collected, or at exit — calls ``cleanup_dist_env_and_memory``, which destroys
    the default process group: the rest of the run would continue as world size 1, every rank taking itself for rank
    0. When the group was there before the engine, the shutdown leaves it alone (vLLM's group objects stay for the
    next engine of this process, which reuses them)."""
    import vllm.v1.engine.core as core
    if getattr(core.cleanup_dist_env_and_memory, "keeps_trainer_group", False):
        return

    def keep_the_group(*args: Any, **kwargs: Any) -> None:  # installed only under the trainer's own group
        return None

    keep_the_group.keeps_trainer_group = True
    core.cleanup_dist_env_and_memory = keep_the_group


def check_settings(cfg: PPOConfig) -> None:
    """Refuse ``rollout_engine=vllm`` in one line when vLLM is missing (before anything is written).

    Every parallel layout is served: one engine per process, so under torchrun each rank samples its own share of
    the prompts with its own engine (DDP replicas sync their local weights; FSDP2 gathers the full weights at each
    sync, ``policy_state``)."""
    if cfg.rollout_engine == "vllm":
        import_vllm()


def check_model(config: Any, device: str = "cpu") -> None:
    """A one-line ConfigError when vLLM cannot run this HF model config: an architecture it does not register,
    or (CPU backend) an attention head size its kernels lack (the tiny preset's 64/4 = 16 is one)."""
    import_vllm()
    from vllm.model_executor.models import ModelRegistry
    archs = list(getattr(config, "architectures", None) or [])
    if not archs or not any(a in ModelRegistry.get_supported_archs() for a in archs):
        raise ConfigError(f"ppo.rollout_engine=vllm: vLLM cannot load the policy's architecture {archs or '(none)'}; "
                          "use rollout_engine=torch")
    if device == "cpu":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head not in sizes:
            raise ConfigError(f"ppo.rollout_engine=vllm: vLLM's CPU attention has no kernel for the policy's head size "
                              f"{head} (supported: {', '.join(map(str, sizes))}); for the tiny preset pass "
                              "--model.num_heads 2 (head size 32), or use rollout_engine=torch")


def policy_state(model: torch.nn.Module, is_lora: bool) -> dict[str, torch.Tensor]:
    """The LM's full weights under HF names, as vLLM's loader reads them; LoRA merged into a copy (the trained
    model keeps its adapters). The value head is not among them: it lives beside the LM (PolicyWithValue).
    Under FSDP2 every shard (a DTensor) is all-gathered into a full tensor on each rank (the engine holds a full
    copy anyway): collectives, so every rank syncs at the same point (make_experience, before sampling)."""
    if is_lora:
        model = copy.deepcopy(model).merge_and_unload()
    return {k: (v.full_tensor() if is_dtensor(v) else v).detach() for k, v in model.state_dict().items()}


class VLLMEngine:
    """One in-process vLLM engine sampling for the policy.

    Args:
        model: the policy's HF causal LM (``PolicyWithValue.model``; peft-wrapped under LoRA).
        cfg: the PPO config (temperature, response_length, max_prompt_length, mixed_precision, seed).
        eos_token_id, pad_token_id: the tokenizer's; a row stops at EOS (none: −1), pads follow it.
    """

    def __init__(self, model: torch.nn.Module, cfg: PPOConfig, eos_token_id: int, pad_token_id: int,
                 is_lora: bool = False, device: str = "cpu"):
        vllm = import_vllm()
        base = model.get_base_model() if is_lora else model
        config = base.config.to_dict()  # vLLM reads config.json only; the weights come with sync()
        config.pop("quantization_config", None)
        config["architectures"] = config.get("architectures") or [type(base).__name__]  # unset until saved once
        config["eos_token_id"] = eos_token_id if eos_token_id >= 0 else None  # vLLM also stops at the config's EOS
        check_model(SimpleNamespace(**config), device)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine on CPU
        self.cfg, self.eos, self.pad, self.is_lora = cfg, eos_token_id, pad_token_id, is_lora
        if torch.distributed.is_initialized():  # torchrun: the group is the trainer's; vLLM must not destroy it
            keep_trainer_process_group()
        self.dtype = "bfloat16" if cfg.mixed_precision == "bf16" else "float32"
        length = min(cfg.max_prompt_length + cfg.response_length, config.get("max_position_embeddings") or 1 << 30)
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        py_rng, np_rng = random.getstate(), np.random.get_state()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder, torch.random.fork_rng(devices=[]):  # vLLM reseeds globally
            (Path(folder) / "config.json").write_text(json.dumps(config))
            gpu = {"gpu_memory_utilization": GPU_MEMORY_SHARE} if device == "cuda" else {}
            self.llm = vllm.LLM(model=folder, dtype=self.dtype, load_format="dummy", enforce_eager=not cfg.vllm_compile,
                                seed=cfg.seed, max_model_len=length, **gpu,
                                skip_tokenizer_init=True, logprobs_mode="processed_logprobs",
                                enable_prefix_caching=False,  # a cached prefix would outlive a weight sync
                                generation_config="vllm")  # stop tokens: the tokenizer's EOS only
        # Its in-process CPU worker replaces torch.set_num_threads process-wide with a no-op: put it back, so the
        # trainer's num_threads holds (the engine computes on the same torch threads).
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(py_rng), np.random.set_state(np_rng)
        if os.environ["VLLM_LOGGING_LEVEL"] == "ERROR":
            logging.getLogger("vllm").setLevel(logging.WARNING)  # from here on, e.g. "weights were not loaded"
        self.startup_seconds = time.perf_counter() - t0
        self.sync(model)

    def sync(self, model: torch.nn.Module) -> float:
        """Load the policy's current weights into the engine (in place); returns the seconds it took."""
        t0 = time.perf_counter()
        state = policy_state(model, self.is_lora)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        return time.perf_counter() - t0

    @torch.no_grad()
    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, generator: torch.Generator | None = None,
                 greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample one response per left-padded prompt, as ``rollout.generate`` lays it out.

        Shapes: query_ids, query_mask (B, Lq).
        Returns: response_ids (B, T) (pads after EOS, T the longest row), mask (B, T) (1 through the EOS),
            has_eos (B,), behavior (B, T) float32: vLLM's log μ(a_t|s_t) at the temperature, 0 on padding.
        ``greedy``: top-1 (temperature 0 in vLLM); the logprobs are then not a sampling distribution's.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        cfg, b = self.cfg, query_ids.shape[0]
        seeds = torch.randint(0, 2**31 - 1, (b,), generator=generator, device=query_ids.device).tolist()
        params = [SamplingParams(temperature=0.0 if greedy else cfg.temperature, max_tokens=cfg.response_length,
                                 logprobs=0, seed=s, stop_token_ids=[self.eos] if self.eos >= 0 else None,
                                 detokenize=False) for s in seeds]
        prompts = [TokensPrompt(prompt_token_ids=ids[m.bool()].tolist()) for ids, m in zip(query_ids.cpu(), query_mask.cpu())]
        outs = [o.outputs[0] for o in self.llm.generate(prompts, params, use_tqdm=False)]
        t = max(max(len(o.token_ids) for o in outs), 1)
        response_ids = torch.full((b, t), self.pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((b, t), dtype=torch.long)  # (B, T)
        behavior = torch.zeros((b, t), dtype=torch.float32)  # (B, T)
        for i, o in enumerate(outs):
            n = len(o.token_ids)
            response_ids[i, :n] = torch.tensor(o.token_ids, dtype=torch.long)
            mask[i, :n] = 1
            behavior[i, :n] = torch.tensor([lp[tok].logprob for tok, lp in zip(o.token_ids, o.logprobs)])
        has_eos = (response_ids == self.eos).any(1) & (mask.sum(1) > 0)  # (B,)
        device = query_ids.device
        return response_ids.to(device), mask.to(device), has_eos.to(device), behavior.to(device)
