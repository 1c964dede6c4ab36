"""Backend choice and lazy loading of the Triton modules.

Why lazy: ``triton.jit`` decides *at decoration time* whether a kernel is compiled for a GPU or
run by the CPU interpreter (``TRITON_INTERPRET=1``). Importing ``kernels`` must therefore not
import the Triton modules; the first call that needs them sets the interpreter flag when the
tensors live on the CPU, then imports them.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch")
_TRITON_MODULES = ("kernels.triton_logprob", "kernels.triton_kl", "kernels.triton_splits")


def fp32_math(fn):
    """Run a kernel's ``forward`` / ``backward`` with autocast off, on every device: the kernels choose
    their own dtypes (the lm-head product and everything after it accumulate in fp32). Under bf16 autocast
    the logits would otherwise be rounded to bf16 (0.04 at a logit of 10: a ratio error PPO's clip sees),
    and a backward called inside the autocast block would mix dtypes."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return wrapped


class KernelBackendError(RuntimeError):
    """The requested backend cannot run on these tensors (bad name, or wrong Triton mode)."""


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map ``backend`` to "triton" or "torch".

    Args:
        backend: "auto" (Triton when the tensors are on a supported GPU, else torch), "triton" or "torch".
        tensors: the op's inputs; all must share one device.
    Returns:
        "triton" or "torch". "auto" on a GPU the kernels do not support falls back to torch with
        one warning per reason; an explicit "triton" there is an error.
    """
    if backend not in BACKENDS:
        raise KernelBackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise KernelBackendError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if backend == "torch" or (backend == "auto" and not tensors[0].is_cuda):
        return "torch"
    reason = unsupported(*tensors[:2]) if tensors[0].is_cuda else None
    if reason is None:
        return "triton"
    if backend == "triton":
        raise KernelBackendError(f"backend='triton': {reason}")
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"kernels: {reason}; using the chunked torch path", RuntimeWarning, stacklevel=3)
    return "torch"


_WARNED: set[str] = set()
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def unsupported(hidden: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on these CUDA tensors (None when they can): a ROCm build,
    a GPU below compute capability 8.0 (no bf16 tensor cores: T4, V100), or an input dtype
    other than fp32/fp16/bf16 (or two half dtypes mixed)."""
    if torch.version.hip is not None:
        return "the Triton kernels are built and checked for NVIDIA GPUs only, not ROCm"
    major, minor = torch.cuda.get_device_capability(hidden.device)
    if major < 8:
        return f"compute capability {major}.{minor} < 8.0 is not supported by the Triton kernels"
    if hidden.dtype not in _FLOATS or weight.dtype not in _FLOATS:
        return f"dtypes {hidden.dtype}/{weight.dtype} are not fp32/fp16/bf16"
    if hidden.dtype != weight.dtype and torch.float32 not in (hidden.dtype, weight.dtype):
        return f"mixed half dtypes {hidden.dtype}/{weight.dtype}"
    return None


def _is_interpreted(module: ModuleType) -> bool:
    """True when the module's kernels were decorated under TRITON_INTERPRET=1."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(getattr(module, "KERNELS")[0], InterpretedFunction)


def _stdlib_interpreted() -> bool:
    """True when triton.language's own @jit functions (tl.sum, tl.max, ...) run in the interpreter:
    they are decorated when triton.language is first imported, whatever our modules do later."""
    from triton.language import standard

    return type(standard.sum).__name__ == "InterpretedFunction"


def load_triton(name: str, device: torch.device) -> ModuleType:
    """Import ``kernels.<name>`` so that its kernels can run on ``device``.

    On a CPU device the interpreter is switched on before the first import. If the module was
    already imported in the other mode, raise a clear error instead of crashing inside Triton.
    """
    full = f"kernels.{name}"
    cpu = device.type == "cpu"
    if cpu and not any(m in sys.modules for m in _TRITON_MODULES):
        os.environ["TRITON_INTERPRET"] = "1"
    if cpu and not _stdlib_interpreted():
        raise KernelBackendError(
            "triton.language was imported (e.g. by transformers) before TRITON_INTERPRET=1 was set, so its "
            "library functions need a GPU; set TRITON_INTERPRET=1 at process start to run backend='triton' "
            "on CPU tensors (or use backend='torch')"
        )
    module = importlib.import_module(full)
    interpreted = _is_interpreted(module)
    if cpu and not interpreted:
        raise KernelBackendError(
            f"{full} was imported without TRITON_INTERPRET=1, so its kernels need a GPU; "
            "CPU tensors need the interpreter: set TRITON_INTERPRET=1 before the first "
            "backend='triton' call (or use backend='torch')"
        )
    if not cpu and interpreted:
        raise KernelBackendError(
            f"{full} runs under the Triton interpreter (TRITON_INTERPRET=1) but got {device} tensors; "
            "unset TRITON_INTERPRET in a fresh process to use the GPU kernels"
        )
    return module


def empty(*shape: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Allocate a kernel output buffer. Tests replace this to poison outputs with NaN."""
    return torch.empty(*shape, device=device, dtype=dtype)
