"""kernels/__init__.py + kernels/_dispatch.py: backend choice, lazy Triton import, name clashes."""
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kernel_cases import DEVICE, make_inputs

import kernels
from kernels import KernelBackendError, fused_kl, fused_logprobs
from kernels._dispatch import resolve_backend

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter at the repo root (module-import state matters here)."""
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_transformers_does_not_mistake_us_for_hf_kernels():
    pytest.importorskip("transformers")
    proc = _python("""
        import importlib.util, pathlib
        spec = importlib.util.find_spec("kernels")
        assert pathlib.Path(spec.origin).parent.name == "kernels", spec.origin
        from transformers.utils.import_utils import is_kernels_available
        print(spec.origin, is_kernels_available())
    """)
    assert proc.returncode == 0, proc.stderr
    origin, available = proc.stdout.split()
    assert origin.startswith(str(ROOT)), origin  # our package is the importable `kernels`
    assert available == "False"


def test_importing_kernels_does_not_import_triton_modules():
    proc = _python("""
        import sys, torch, kernels
        kernels.fused_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]))
        print([m for m in ("kernels.triton_logprob", "kernels.triton_kl") if m in sys.modules])
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_triton_imported_without_interpreter_raises_clearly():
    proc = _python("""
        import importlib, torch, kernels
        importlib.import_module("kernels.triton_logprob")  # decorated for a GPU: no TRITON_INTERPRET
        try:
            kernels.fused_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), backend="triton")
        except kernels.KernelBackendError as e:
            print("raised:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "raised:" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout


def test_public_fused_kl_survives_submodule_import():
    """The Triton modules are named apart from the public functions, so importing one cannot
    rebind ``kernels.fused_kl`` (no module shadows a function of the package)."""
    module = importlib.import_module("kernels.triton_kl")
    assert kernels.fused_kl is fused_kl and callable(kernels.fused_kl)
    assert hasattr(module, "TritonKL")
    assert not {"fused_kl", "fused_logprobs"} & {p.stem for p in Path(kernels.__file__).parent.glob("*.py")}


def test_auto_backend():
    t = torch.zeros(1, device=DEVICE)
    assert resolve_backend("auto", t) == ("triton" if DEVICE == "cuda" else "torch")
    assert resolve_backend("torch", t) == "torch"
    with pytest.raises(KernelBackendError, match="backend must be one of"):
        resolve_backend("cuda", t)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_low_precision_inputs_give_float32_outputs(backend):
    case = make_inputs("tiny", torch.bfloat16)
    lp, ent = fused_logprobs(case["hidden"], case["weight"], case["targets"], return_entropy=True, backend=backend)
    kl = fused_kl(case["hidden"], case["weight"], case["ref_hidden"], case["ref_weight"], backend=backend)
    assert lp.dtype == ent.dtype == kl.dtype == torch.float32


def test_input_errors_are_one_clear_line():
    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"expected hidden \[N, H\] and weight \[V, H\]"):
        fused_logprobs(h, torch.randn(5, 3), t)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="targets must be"):
        fused_logprobs(h, w, t[:2])
    with pytest.raises(ValueError, match="share N and V"):
        fused_kl(h, w, h, torch.randn(6, 4))
