"""The GPU launch configuration, run by the interpreter on CPU.

On CPU the kernels normally run with small tiles and every load upcast to fp32 (UPCAST=True). On a
GPU they run with the tiles ``gpu_launch_config`` picks for the device's shared memory (H100-class
and 99 KiB parts) and, for half precision, dots in the input dtype (UPCAST=False: `dlogits` is
cast down before the gradient dots). This runs that configuration
through the interpreter for fp16 (its half arithmetic is right; bf16's is not, and bf16 takes the
same code path) and IEEE fp32, so the GPU-only branches are checked against float64 here too.
"""
import importlib

import pytest
from kernel_cases import DEVICE, DTYPES, IGNORE, TEMPERATURE, check_kl, check_logprobs, grads_of, make_inputs

from kernels import fused_kl, fused_logprobs

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU these are the default kernels")


@pytest.fixture(params=[227, 99], ids=["smem227", "smem99"])
def gpu_config(request, monkeypatch):
    """Both launchers take the GPU configuration for a device with that many KiB of shared memory
    (without num_warps / num_stages, which only mean something to the GPU compiler)."""
    lp_mod = importlib.import_module("kernels.triton_logprob")
    kl_mod = importlib.import_module("kernels.triton_kl")
    used = []

    def config(hidden, weight):
        cfg = lp_mod.gpu_launch_config(hidden.dtype, allow_tf32=False, shared_kib=request.param)
        cfg.pop("num_warps"), cfg.pop("num_stages")
        used.append(cfg)
        return cfg

    monkeypatch.setattr(lp_mod, "launch_config", config)
    monkeypatch.setattr(kl_mod, "launch_config", config)
    return used


@pytest.mark.parametrize("dtype_name", ["fp16", "fp32"])
@pytest.mark.parametrize("layout", ["weird", "strided"])
def test_logprobs_with_gpu_tiles(layout, dtype_name, gpu_config):
    case = make_inputs(layout, DTYPES[dtype_name])

    def fn(h, w):
        return fused_logprobs(h, w, case["targets"], TEMPERATURE, True, "triton", IGNORE)

    check_logprobs(grads_of(fn, case["hidden"], case["weight"], case["g_lp"], case["g_ent"]), case, dtype_name)
    assert gpu_config and all(c["BLOCK_V"] == 128 and c["UPCAST"] == (dtype_name == "fp32") for c in gpu_config)


@pytest.mark.parametrize("dtype_name", ["fp16", "fp32"])
@pytest.mark.parametrize("layout", ["weird", "strided"])
def test_kl_with_gpu_tiles(layout, dtype_name, gpu_config):
    case = make_inputs(layout, DTYPES[dtype_name])

    def fn(h, w):
        return fused_kl(h, w, case["ref_hidden"], case["ref_weight"], TEMPERATURE, "triton")

    check_kl(grads_of(fn, case["hidden"], case["weight"], case["g_kl"]), case, dtype_name)
    assert gpu_config and all(c["BLOCK_V"] == 128 and c["UPCAST"] == (dtype_name == "fp32") for c in gpu_config)
