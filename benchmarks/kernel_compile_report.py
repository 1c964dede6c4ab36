"""Compile the Triton kernels for a Hopper GPU ahead of time, on any machine, and read the result.

    python benchmarks/kernel_compile_report.py                 # sm_90, every kernel × dtype
    python benchmarks/kernel_compile_report.py --arch 90 89 80 # also an RTX 4090/L40 and an A100
    python benchmarks/kernel_compile_report.py --check         # exit 1 when a kernel breaks a limit

No GPU needed: Triton's NVIDIA backend ships ptxas, cuobjdump and nvdisasm, so the kernels go
through the same pipeline as on the GPU (Triton IR -> PTX -> cubin, sm_90a for an H100) with the
very arguments the launchers pass at the benchmark shape, including the tile configuration
``gpu_launch_config`` picks for that compute capability's shared memory. The binder that the JIT runs before a launch
turns those arguments into the specialisation (stride 1 becomes a constant, 16-divisible ints and
pointers get divisibility hints), so the cubin is the one a GPU run would build.

What it reads off each cubin (nothing here is a timing):
- shared memory per program (metadata) against the per-block limit of that compute capability
  (227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_86/89);
- registers, stack frame and local memory per thread (cuobjdump --dump-resource-usage): a stack
  or local-memory size above 0 means register spills;
- SASS instruction counts (nvdisasm): HGMMA (Hopper warpgroup tensor-core MMA), HMMA (pre-Hopper
  tensor-core MMA), FP32 atomics, LDL/STL (local memory), LDGSTS/UTMALDG (async copies to shared).
Programs per SM follow from registers × threads (64 Ki registers per SM) and shared memory.

The forward's split count (kernels/triton_splits.py) depends on the GPU's SM count: the report
takes a typical GPU per compute capability (``SMS``) and prints the resulting grid. The split merges
(fp32, no dots) are compiled too; --check fails them on a compile error, a spill or an atomic.

--check fails when a kernel does not compile, needs more shared memory than the limit, spills
(fp16/bf16/tf32), has fp32 atomics (the gradients must be deterministic), or runs those dots without tensor cores (no HGMMA on sm_90 — the path Hopper
needs for its matmul peak —, no HMMA before it).
Results: benchmarks/results/kernels_sm<arch>_compile.{json,md}.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("kernel_compile_report: unset TRITON_INTERPRET; the interpreter cannot compile kernels")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
lp_mod = importlib.import_module("kernels.triton_logprob")
kl_mod = importlib.import_module("kernels.triton_kl")
sp_mod = importlib.import_module("kernels.triton_splits")
REGS_PER_SM, MAX_THREADS_PER_SM = 65536, 2048
DTYPES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True),
          "fp16": (torch.float16, False), "bf16": (torch.bfloat16, False)}
SASS_OPS = {
    "HGMMA": r"\bHGMMA\.",
    "HMMA": r"\bHMMA\.",
    "atomic_f32": r"\b(?:ATOMG|REDG|RED)\.E\.ADD\.(?:F32|FTZ)",
    "LDL/STL": r"\b(?:LDL|STL)\b",
    "MEMBAR.GPU": r"\bMEMBAR\.(?:ALL\.)?GPU\b",  # a GPU-wide fence (acq_rel atomics bring one each)
    "CCTL.IVALL": r"\bCCTL\.IVALL\b",  # L1 invalidation (likewise)
    "LDGSTS": r"\bLDGSTS\b",
    "UTMALDG": r"\bUTMALDG\b",
    "FFMA": r"\bFFMA\b",
    "MUFU.EX2": r"\bMUFU\.EX2\b",
}


def tool(name: str) -> str:
    """Path of a CUDA binary shipped inside Triton's NVIDIA backend."""
    import triton.backends.nvidia as nv

    path = Path(nv.__file__).parent / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"kernel_compile_report: {path} missing (Triton without its NVIDIA backend?)")
    return str(path)


# SMs of a typical GPU per compute capability (H100 SXM, RTX 4090, RTX 3090, A100): the forward's
# split count depends on it (kernels/triton_splits.py); here it only sets the tiles-per-split
# argument the cubin is specialised on, and the grid the report prints.
SMS = {90: 132, 89: 128, 86: 82, 80: 108}


def forward_grid(n: int, v: int, cfg: dict, arch: int) -> dict:
    """The forward's (row blocks, splits, tiles per split) at N kept rows on that GPU."""
    tiles = triton.cdiv(v, cfg["BLOCK_V"])
    blocks = triton.cdiv(n, cfg["BLOCK_N"])
    s = sp_mod.plan_splits(blocks, tiles, SMS.get(arch, 132) * sp_mod.FWD_PROGRAMS_PER_SM)
    per = triton.cdiv(tiles, s)
    return dict(row_blocks=blocks, splits=triton.cdiv(tiles, per), tiles_per_split=per, tiles=tiles,
                sms=SMS.get(arch, 132))


def cases(n: int, h: int, v: int, dtype: torch.dtype, tf32: bool,
          shared_kib: int, arch: int = 90) -> list[tuple[str, object, tuple, dict]]:
    """(name, kernel, positional args, constexpr kwargs) exactly as the launchers pass them,
    with small CPU tensors standing in for the pointers (only dtype and alignment matter)."""
    x = torch.empty(16, 16, dtype=dtype)  # hidden / weight stand-in
    dz = torch.empty(16, 16, dtype=torch.float32 if dtype == torch.float32 else dtype)  # dlogits, the GEMM dtype
    i64 = torch.empty(16, dtype=torch.int64)  # targets, kept-row ids
    f = torch.empty(16)
    cfg = lp_mod.gpu_launch_config(dtype, tf32, shared_kib)
    c = max(cfg["BLOCK_N"], lp_mod.DZ_CHUNK_ELEMENTS // v // cfg["BLOCK_N"] * cfg["BLOCK_N"])  # backward chunk rows
    strides = (h, 1, h, 1)  # contiguous hidden [N, H] and weight [V, H]
    inv_t = 1.0 / 0.7
    per = forward_grid(n, v, cfg, arch)["tiles_per_split"]
    lp_fwd = (x, x, i64, i64, f, n, v, h, *strides, 1, inv_t, per)  # f: the (4, S, K) partials
    lp_bwd = (x, x, i64, i64, f, f, f, f, dz, c, v, h, *strides, 1, inv_t)
    kl_fwd = (x, x, x, x, i64, f, i64, n, v, h, h, *strides, *strides, 1, inv_t, per)
    kl_bwd = (x, x, x, x, i64, f, f, f, dz, c, v, h, h, *strides, *strides, inv_t)
    return [
        ("logprob_fwd", lp_mod._logprob_fwd_kernel, lp_fwd, cfg),
        ("logprob_bwd", lp_mod._logprob_bwd_kernel, lp_bwd, dict(HAS_ENT=False, **cfg)),
        ("logprob_bwd+entropy", lp_mod._logprob_bwd_kernel, lp_bwd, dict(HAS_ENT=True, **cfg)),
        ("kl_fwd", kl_mod._kl_fwd_kernel, kl_fwd, dict(HAS_TARGETS=False, **cfg)),
        ("kl_fwd+logprobs", kl_mod._kl_fwd_kernel, kl_fwd, dict(HAS_TARGETS=True, **cfg)),  # the rollout's pass
        ("kl_bwd", kl_mod._kl_bwd_kernel, kl_bwd, cfg),
    ]


def merge_cases(n: int) -> list[tuple[str, object, tuple, dict]]:
    """The split merges (fp32 partials in, whatever the input dtype): as ``triton_splits.merge`` launches them."""
    i64, f = torch.empty(16, dtype=torch.int64), torch.empty(16)
    s = 3  # any S: a runtime loop bound
    kw = dict(BLOCK_K=sp_mod.MERGE_BLOCK_K, num_warps=4)
    return [
        ("logprob_merge", sp_mod._logprob_merge_kernel, (f, i64, f, f, f, n, s), kw),
        ("kl_merge", sp_mod._kl_merge_kernel, (f, i64, f, f, f, f, f, n, s), dict(HAS_TARGETS=False, **kw)),
        ("kl_merge+logprobs", sp_mod._kl_merge_kernel, (f, i64, f, f, f, f, f, n, s), dict(HAS_TARGETS=True, **kw)),
    ]


def compile_one(kernel, args: tuple, kwargs: dict, arch: int) -> triton.compiler.CompiledKernel:
    """Run the JIT's own binder on the arguments, then compile for ``arch`` without a driver."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def inspect_cubin(cubin: bytes, workdir: Path, name: str) -> dict:
    """Registers / stack / local bytes per thread and SASS op counts of one cubin."""
    path = workdir / f"{name}.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", str(path)],
                           capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    sass = subprocess.run([tool("nvdisasm"), str(path)], capture_output=True, text=True, check=True).stdout
    ops = {k: len(re.findall(p, sass)) for k, p in SASS_OPS.items()}
    return dict(registers=int(fields["REG"]), stack_bytes=int(fields["STACK"]),
                local_bytes=int(fields["LOCAL"]), sass=ops)


def problems(row: dict) -> list[str]:
    """Why ``--check`` would fail this kernel (empty when it passes)."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    out = []
    limit = row["shared_limit_kib"] * 1024
    if row["shared_bytes"] > limit:
        out.append(f"shared memory {row['shared_bytes']} B > {limit} B")
    tensor_core = row["dtype"] in ("fp16", "bf16", "tf32")
    spills = row["stack_bytes"] or row["local_bytes"] or row["sass"]["LDL/STL"]
    if spills and tensor_core:  # IEEE fp32 dots run on CUDA cores anyway; their few spilled bytes are noted
        out.append(f"register spills (stack {row['stack_bytes']} B, local {row['local_bytes']} B)")
    if row["sass"]["MEMBAR.GPU"] or row["sass"]["CCTL.IVALL"]:
        out.append("GPU-wide fences / L1 invalidations (acquire-release atomics where relaxed ones do)")
    if row["sass"]["atomic_f32"]:  # the backward writes dlogits once per element; GEMMs reduce them
        out.append(f"{row['sass']['atomic_f32']} fp32 atomics: non-deterministic accumulation")
    if tensor_core and row["arch"] >= 90 and not row["sass"]["HGMMA"]:
        out.append("no HGMMA: the dots are not on Hopper's warpgroup tensor-core path")
    if tensor_core and row["arch"] < 90 and not row["sass"]["HMMA"]:
        out.append("no HMMA: the dots are not on tensor cores")
    return out


def build(row: dict, kernel, args: tuple, kwargs: dict, arch: int, workdir: Path, tag: str) -> dict:
    """Compile one kernel into ``row`` (or its error), with the resource and SASS facts."""
    t0 = time.perf_counter()
    try:
        ck = compile_one(kernel, args, kwargs, arch)
    except Exception as exc:  # a compile failure is a result to report, not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return row
    row.update(compile_s=round(time.perf_counter() - t0, 2), num_stages=ck.metadata.num_stages,
               shared_bytes=ck.metadata.shared,
               ptx_target=re.search(r"\.target\s+(\S+)", ck.asm["ptx"]).group(1),
               **inspect_cubin(ck.asm["cubin"], workdir, tag))
    threads = 32 * row["num_warps"]
    by_regs = REGS_PER_SM // (row["registers"] * threads)
    by_smem = ((row["shared_limit_kib"] + 1) * 1024) // (row["shared_bytes"] + 1024)  # +1 KiB reserved per block
    row["programs_per_sm"] = min(by_regs, by_smem, MAX_THREADS_PER_SM // threads)
    return row


def summary(row: dict) -> str:
    return row.get("error") or (
        f"regs {row['registers']:3d} smem {row['shared_bytes'] // 1024:3d} KiB "
        f"spill {row['stack_bytes'] + row['local_bytes']} HGMMA {row['sass']['HGMMA']} HMMA {row['sass']['HMMA']} "
        f"atomics {row['sass']['atomic_f32']} progs/SM {row['programs_per_sm']}"
        + (f"  PROBLEM: {'; '.join(row['problems'])}" if row["problems"] else ""))


def merge_problems(row: dict) -> list[str]:
    """A merge has no dots: it must compile, fit, not spill, and use no atomics or fences."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    out = []
    if row["shared_bytes"] > row["shared_limit_kib"] * 1024:
        out.append(f"shared memory {row['shared_bytes']} B > {row['shared_limit_kib']} KiB")
    if row["stack_bytes"] or row["local_bytes"] or row["sass"]["LDL/STL"]:
        out.append(f"register spills (stack {row['stack_bytes']} B, local {row['local_bytes']} B)")
    if row["sass"]["atomic_f32"] or row["sass"]["MEMBAR.GPU"] or row["sass"]["CCTL.IVALL"]:
        out.append("atomics or GPU-wide fences")
    return out


def report(n: int, h: int, v: int, dtypes: list[str], arch: int, workdir: Path) -> tuple[list[dict], list[dict]]:
    """(kernel rows for every kernel × dtype, merge rows) compiled for ``arch``."""
    rows = []
    shared_kib = lp_mod.shared_memory_kib((arch // 10, arch % 10))
    for dname in dtypes:
        dtype, tf32 = DTYPES[dname]
        for name, kernel, args, kwargs in cases(n, h, v, dtype, tf32, shared_kib, arch):
            row = dict(kernel=name, dtype=dname, arch=arch, shared_limit_kib=shared_kib, num_warps=kwargs["num_warps"],
                       blocks={k: kwargs[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")},
                       precision=kwargs["PRECISION"])
            if name.endswith(("_fwd", "_fwd+logprobs")):
                row["grid"] = forward_grid(n, v, kwargs, arch)
            build(row, kernel, args, kwargs, arch, workdir, f"{name}_{dname}")
            row["problems"] = problems(row)
            rows.append(row)
            print(f"sm_{arch} {name:20s} {dname:5s} {summary(row)}", flush=True)
    merges = []
    for name, kernel, args, kwargs in merge_cases(n):
        row = dict(kernel=name, dtype="fp32", arch=arch, shared_limit_kib=shared_kib, num_warps=kwargs["num_warps"],
                   blocks=dict(BLOCK_K=kwargs["BLOCK_K"]))
        build(row, kernel, args, kwargs, arch, workdir, name)
        row["problems"] = merge_problems(row)
        merges.append(row)
        print(f"sm_{arch} {name:20s} fp32  {summary(row)}", flush=True)
    return rows, merges


def write_md(rows: list[dict], merges: list[dict], meta: dict, path: Path) -> None:
    grids: dict[tuple, list[str]] = {}  # (row blocks, splits, tiles per split, tiles, SMs) -> dtypes
    for r in rows:
        if "grid" in r:
            g = r["grid"]
            names = grids.setdefault((g["row_blocks"], g["splits"], g["tiles_per_split"], g["tiles"], g["sms"]), [])
            names += [] if r["dtype"] in names else [r["dtype"]]
    sms = next(iter(grids))[4] if grids else "?"
    lines = [
        f"# Triton kernels compiled ahead of time for sm_{meta['arch']} (no GPU used)", "",
        f"Shared memory per block on this compute capability: {meta['shared_limit_kib']} KiB.  ",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']} · triton {meta['triton']} · torch {meta['torch']} · host {meta['host']}", "",
        f"Launch arguments as at N={meta['N']}, H={meta['H']}, V={meta['V']} (contiguous inputs); "
        "the cubin is what Triton builds from them on such a GPU. These are compiler facts, not timings: "
        "whether the kernels reach the bf16 matmul peak can only be measured on the GPU "
        "(benchmarks/gpu_check.sh).", "",
        f"Forward grid at N={meta['N']} (kernels/triton_splits.py, for a {sms}-SM GPU of this compute capability; "
        "computed, not measured): "
        + "; ".join(f"{'/'.join(names)}: {rb} row blocks × {ns} split{'s' * (ns > 1)} of {per} of the {t} "
                    f"vocabulary tiles ({rb * ns} programs, {rb * ns / sm:.2f} waves of one per SM)"
                    for (rb, ns, per, t, sm), names in grids.items()) + ".", "",
        "| kernel | dtype | tiles N×V×H | warps | stages | regs/thread | shared KiB | spill B | programs/SM "
        "| HGMMA | HMMA | FP32 atomics | GPU fences | LDGSTS | problems |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['dtype']} | | | | | | | | | | | | | {r['error']} |")
            continue
        b, s = r["blocks"], r["sass"]
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {b['BLOCK_N']}×{b['BLOCK_V']}×{b['BLOCK_H']} | {r['num_warps']} "
            f"| {r['num_stages']} | {r['registers']} | {r['shared_bytes'] / 1024:.0f} "
            f"| {r['stack_bytes'] + r['local_bytes']} | {r['programs_per_sm']} | {s['HGMMA']} | {s['HMMA']} "
            f"| {s['atomic_f32']} | {s['MEMBAR.GPU'] + s['CCTL.IVALL']} | {s['LDGSTS']} | {'; '.join(r['problems']) or '—'} |")
    lines += ["", "SASS columns count static instructions in the kernel body (a loop body counts once). "
              "fp32 is torch's default (allow_tf32 off: IEEE fp32 dots on CUDA cores, FFMA); tf32 is fp32 "
              "inputs with torch.backends.cuda.matmul.allow_tf32 on.", "",
              "The split merges (fp32 partials in, any input dtype; one program per block of kept rows, "
              "a loop over the splits):", "",
              "| kernel | rows/program | warps | regs/thread | shared KiB | spill B | FP32 atomics | GPU fences "
              "| problems |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in merges:
        if "error" in r:
            lines.append(f"| {r['kernel']} | | | | | | | | {r['error']} |")
            continue
        s = r["sass"]
        lines.append(f"| {r['kernel']} | {r['blocks']['BLOCK_K']} | {r['num_warps']} | {r['registers']} "
                     f"| {r['shared_bytes'] / 1024:.0f} | {r['stack_bytes'] + r['local_bytes']} | {s['atomic_f32']} "
                     f"| {s['MEMBAR.GPU'] + s['CCTL.IVALL']} | {'; '.join(r['problems']) or '—'} |")
    lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90],
                   help="compute capabilities × 10 (90: H100/H200, 89: RTX 40/L4/L40, 86: RTX 30/A10, 80: A100)")
    p.add_argument("--shape", type=int, nargs=3, default=(8192, 4096, 128256), metavar=("N", "H", "V"))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--check", action="store_true", help="exit 1 when any kernel has a problem")
    args = p.parse_args(argv)
    n, h, v = args.shape
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"kernel_compile_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/kernel_compile_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    bad = []
    for arch in args.arch:
        rows, merges = report(n, h, v, args.dtypes, arch, work)
        meta = dict(arch=arch, shared_limit_kib=rows[0]["shared_limit_kib"], N=n, H=h, V=v,
                    triton=triton.__version__, torch=torch.__version__,
                    host=f"{platform.machine()} {platform.system()} (no GPU)",
                    date=time.strftime("%Y-%m-%d %H:%M:%S"), command=command.strip())
        stem = args.out / f"kernels_sm{arch}_compile"
        tmp = stem.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dict(meta=meta, kernels=rows, merge_kernels=merges), indent=1))
        tmp.replace(stem.with_suffix(".json"))
        write_md(rows, merges, meta, stem.with_suffix(".md"))
        print(f"wrote {stem}.json and .md")
        bad += [f"sm_{arch} {r['kernel']} {r['dtype']}: {'; '.join(r['problems'])}" for r in rows + merges
                if r["problems"]]
    for line in bad:
        print(f"kernel_compile_report: {line}", file=sys.stderr)
    return 1 if (bad and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
