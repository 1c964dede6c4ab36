"""``--PHASE.mixed_precision bf16`` on one device (CPU or CUDA): autocast bf16 compute, fp32 master
weights and optimizer state.

What runs in bf16: the matmuls of every forward (the trunk, generation and its KV cache, the lm-head
product inside the fused logprob/KL kernels) under ``torch.autocast``. What stays fp32: the parameters
and AdamW's moments, the log-softmax, logprobs, entropy and KL (the fused kernels accumulate in fp32),
values (upcast as they leave the head), rewards, advantages and every loss. Under torchrun with
``parallel=fsdp2`` the same setting is FSDP2's MixedPrecisionPolicy instead (bf16 compute, fp32 weights
and gradient reduction), so one setting means one thing in both.

On a CPU, bf16 needs the AVX512-BF16 or AMX-BF16 instructions to be worth it (measured on this project's
Xeon: SmolLM2-135M forward + backward 2.2x faster than fp32); without them torch emulates bf16 more slowly
than fp32, so such a CPU is refused with one line, as is a GPU without bf16 (before Ampere).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU's native bf16 instruction sets (empty where /proc/cpuinfo does not list any)."""
    path = Path(cpuinfo)
    text = path.read_text(errors="replace") if path.is_file() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in CPU_BF16_FLAGS if f in flags]


def check_bf16(device: torch.device, setting: str) -> None:
    """One-line ConfigError when ``device`` has no native bf16 (``setting`` names the config field)."""
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise ConfigError(f"{setting}=bf16: {device} ({name}) has no bf16 support (Ampere or newer needed); "
                              "use 'no'")
    elif device.type == "cpu" and not cpu_bf16_flags():
        raise ConfigError(f"{setting}=bf16: this CPU has neither AVX512-BF16 nor AMX-BF16, so bf16 would be "
                          "emulated and slower than fp32; use 'no'")


def autocast(cfg: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast(device, bfloat16)`` when ``cfg.mixed_precision`` is bf16 on one device (not FSDP2's,
    which casts itself), else a no-op context."""
    if getattr(cfg, "mixed_precision", "no") != "bf16" or getattr(cfg, "parallel", "ddp") == "fsdp2":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def precision(cfg: Any) -> str:
    """What summary.json records: "bf16 autocast", "bf16 (FSDP2)" or "fp32"."""
    if getattr(cfg, "mixed_precision", "no") != "bf16":
        return "fp32"
    return "bf16 (FSDP2 MixedPrecisionPolicy)" if getattr(cfg, "parallel", "ddp") == "fsdp2" else "bf16 autocast"
