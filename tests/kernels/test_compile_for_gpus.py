"""The Triton kernels compile for an H100 (sm_90) and an RTX 4090 / L40 (sm_89) on this CPU-only
machine, within each one's limits.

benchmarks/kernel_compile_report.py builds each kernel's cubin with Triton's bundled ptxas from the
arguments the launchers pass (no GPU involved) and reads the compiler's resource report. This test
runs it for bf16 (the PPO dtype), tf32 and fp32. Two configurations it caught would each have
failed at their first GPU launch: the tf32 backward asked for 240 KiB of shared memory on sm_90
(limit 227 KiB), and the fp32 backward for 144 KiB on sm_89 (limit 99 KiB).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernel_compile_report.py"


def _nvidia_tools() -> bool:
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return False
    return all((Path(nv.__file__).parent / "bin" / t).exists() for t in ("ptxas", "cuobjdump", "nvdisasm"))


@pytest.mark.skipif(not _nvidia_tools(), reason="Triton's NVIDIA backend binaries are not installed")
def test_kernels_compile_for_sm90_and_sm89_within_limits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for the others
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from a cache
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--arch", "90", "89", "--dtypes", "bf16", "tf32", "fp32",
         "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for arch, limit_kib in ((90, 227), (89, 99)):
        rows = json.loads((tmp_path / f"kernels_sm{arch}_compile.json").read_text())["kernels"]
        assert {(r["kernel"], r["dtype"]) for r in rows} == {
            (k, d) for d in ("bf16", "tf32", "fp32")
            for k in ("logprob_fwd", "logprob_bwd", "logprob_bwd+entropy", "kl_fwd", "kl_fwd+logprobs", "kl_bwd")
        }
        for r in rows:
            assert r["ptx_target"] == ("sm_90a" if arch == 90 else "sm_89"), r  # wgmma needs the "a" target
            assert r["shared_limit_kib"] == limit_kib and r["shared_bytes"] <= limit_kib * 1024, r
            # no atomics at all: the backward writes dlogits once per element and GEMMs reduce them
            assert r["sass"]["atomic_f32"] == 0 and r["sass"]["MEMBAR.GPU"] == 0, r
            if r["dtype"] == "fp32":  # IEEE fp32 dots run on CUDA cores; a few spilled bytes are tolerated
                assert r["stack_bytes"] <= 64 and r["local_bytes"] == 0, r
                continue
            assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, r  # no register spills
            # the dots run on tensor cores: Hopper's warpgroup MMA on sm_90, HMMA before it
            assert r["sass"]["HGMMA" if arch == 90 else "HMMA"] > 0, r


def test_launch_config_fits_the_device_shared_memory():
    from kernels.triton_logprob import gpu_launch_config, shared_memory_kib

    assert [shared_memory_kib(cc) for cc in ((9, 0), (8, 0), (8, 6), (8, 9), (12, 0), (10, 3), (13, 1))] == [
        227, 163, 99, 99, 99, 227, 99]
    big, small = gpu_launch_config(torch.float32, False, 227), gpu_launch_config(torch.float32, False, 99)
    assert (big["BLOCK_H"], big["num_stages"]) == (64, 3) and (small["BLOCK_H"], small["num_stages"]) == (32, 2)
    assert gpu_launch_config(torch.float32, True, 227)["PRECISION"] == "tf32"
    assert gpu_launch_config(torch.bfloat16, True, 227)["PRECISION"] == "ieee"  # allow_tf32 is for fp32 only
