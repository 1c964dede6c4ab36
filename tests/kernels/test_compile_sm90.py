"""The Triton kernels compile for an H100 (sm_90) on this CPU-only machine, within its limits.

benchmarks/kernel_compile_report.py builds each kernel's cubin with Triton's bundled ptxas from the
arguments the launchers pass (no GPU involved) and reads the compiler's resource report. This test
runs it for bf16 (the PPO dtype) and tf32, whose backward once asked for 240 KiB of shared memory —
more than the 227 KiB an H100 block can have, so it would have failed at its first GPU launch.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernel_compile_report.py"


def _nvidia_tools() -> bool:
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return False
    return all((Path(nv.__file__).parent / "bin" / t).exists() for t in ("ptxas", "cuobjdump", "nvdisasm"))


@pytest.mark.skipif(not _nvidia_tools(), reason="Triton's NVIDIA backend binaries are not installed")
def test_kernels_compile_for_sm90_within_limits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for the others
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from a cache
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--dtypes", "bf16", "tf32", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "kernels_sm90_compile.json").read_text())["kernels"]
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, d) for d in ("bf16", "tf32")
        for k in ("logprob_fwd", "logprob_bwd", "logprob_bwd+entropy", "kl_fwd", "kl_bwd")
    }
    for r in rows:
        assert r["ptx_target"] == "sm_90a", r  # Hopper's own instructions (wgmma) need the "a" target
        assert r["shared_bytes"] <= 227 * 1024, r
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, r  # no register spills
        assert r["sass"]["HGMMA"] > 0, r  # the dots run as warpgroup MMAs on tensor cores
        assert (r["sass"]["atomic_f32"] > 0) == r["kernel"].endswith(("bwd", "bwd+entropy")), r
