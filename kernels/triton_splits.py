"""Split-vocabulary forward: how many splits, and the deterministic merge of their partial statistics.

The forward kernels run on a 2-D grid (row block, vocabulary split). Axis 0, the row blocks, varies
fastest, so the programs running at the same time read the same vocabulary slice of W (shared in
L2). Axis 1 cuts the BLOCK_V tiles into S contiguous runs of ``tiles_per_split`` whole tiles (the
last run may be shorter; none is empty). Each program runs the online statistics over its run and
writes them, fp32, to a [stats, S, K] buffer (K kept rows); a merge kernel then folds the S
partials of each row, in the order 0, 1, …, S−1, with the rescaling the online update applies when
its running max grows:

* logprob / entropy, per split (m_i, s1_i, a_i, z_t,i): m = max m_i, α_i = e^{m_i − m};
  s1 = Σ_{m_i = m} s1_i + Σ_{m_i < m} (α_i + α_i s1_i) + (n_top − 1) (each top split's own 1 is left
  out of its s1_i; n_top − 1 adds back all but one of them, as the kernel does for tied maxima);
  a = Σ α_i (a_i + (1 + s1_i)(m − m_i)), every term ≥ 0; z_t = Σ z_t,i (one split holds the
  target, the others add exact zeros).
* KL, per split (m_p, s_p, m_q, s_q, D, T[, z_t, zq_t]): with a_p, a_q the two rescalings and
  δ_i = (M_p − M_q) − (m_p,i − m_q,i) the move of the centre, D = Σ a_p (D_i + δ_i s_p,i) and
  T = Σ a_q T_i + a_p expm1(δ_i) D_i + a_p φ(δ_i) s_p,i — the kernel's own centre update
  (``_recentre``), since φ(x + δ) = e^δ φ(x) + expm1(δ) x + φ(δ).
The final forms (log1p(s1), KL = log1p(u + v) − u) are then computed once, in the merge.

Why a Triton merge and not torch ops on [S, K]: one launch instead of ~20 elementwise torch kernels
(each with its own [S, K] temporary), the same ``_log1p`` / ``_recentre`` code as the online update,
and a fixed summation order (a loop over S) that no library reduction can reorder. It reads
S·K·(4 or 6–8) floats: ~0.5 MB at K = 1024, S = 33, next to the forward's 2·K·H·V FLOPs.

Results are bit-identical run to run (each partial is written by one program, merged in a fixed
order). They depend on S, which depends on the kept-row count and the GPU's SM count: a row's values
can differ in the last bits between batches that get different S (as cuBLAS results do between GEMM
shapes), within fp32 rounding of each other.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Programs of a forward kernel resident on one SM: 1 at the GPU tiles (8 warps, 168–255 registers a
# thread in benchmarks/results/kernels_sm*_compile.md; fp32 on 99 KiB parts fits 2), so a wave is
# one program per SM.
FWD_PROGRAMS_PER_SM = 1
WAVES = 2  # aim: at least this many waves of forward programs
INTERPRETER_TILES_PER_SPLIT = 3  # CPU: splits of 3 tiles, so the tests cross split edges
SPLITS: int | None = None  # tests: force this many splits (clamped to [1, tiles]; an empty last one is dropped)
MERGE_BLOCK_K = 128  # rows per merge program
MAX_SPLITS = 65535  # CUDA's limit on grid axis 1

LP_STATS = 4  # m, s1, a, z_t
KL_STATS = 6  # m_p, s_p, m_q, s_q, D, T (+ z_t, zq_t with targets)


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=4096)
def plan_splits(row_blocks: int, tiles: int, wave: int) -> int:
    """Splits S for ``row_blocks`` row blocks over ``tiles`` vocabulary tiles on a GPU that runs
    ``wave`` forward programs at once.

    S = 1 when the row blocks alone fill WAVES waves. Otherwise, among the split counts from
    lo = ⌈WAVES·wave / row_blocks⌉ (at least WAVES waves of programs) to 2·lo that leave no split
    empty, the one with the fewest tile-steps in its slowest SM, ⌈row_blocks·S / wave⌉ waves ×
    ⌈tiles / S⌉ tiles a program (a model of the wave tail, not a measurement); ties go to fewer
    splits. S ≤ tiles always.
    """
    if tiles <= 1 or row_blocks >= WAVES * wave:
        return 1
    lo = min(tiles, -(-WAVES * wave // row_blocks))
    best = None  # (tile-steps, S); some S in [lo, 2·lo] leaves no split empty
    for per in range(-(-tiles // lo), 0, -1):  # tiles a program, largest first
        s = -(-tiles // per)  # the fewest splits of ≤ per tiles: none empty
        if s > 2 * lo:
            break
        if s >= lo and (best is None or (-(-row_blocks * s // wave) * per, s) < best):
            best = (-(-row_blocks * s // wave) * per, s)
    return min(best[1] if best else lo, MAX_SPLITS)


def split_plan(n_kept: int, vocab: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(S, tiles per split) of a forward launch: every split holds ≥ 1 tile, the last the rest."""
    tiles = triton.cdiv(vocab, cfg["BLOCK_V"])
    if SPLITS is not None:
        s = SPLITS
    elif device.type == "cpu":
        s = triton.cdiv(tiles, INTERPRETER_TILES_PER_SPLIT)
    else:
        s = plan_splits(triton.cdiv(n_kept, cfg["BLOCK_N"]), tiles, sm_count(device) * FWD_PROGRAMS_PER_SM)
    per = triton.cdiv(tiles, max(1, min(s, tiles, MAX_SPLITS)))
    return triton.cdiv(tiles, per), per


@triton.jit
def _log1p(x):
    """log(1 + x) to a few ulp for small x (Goldberg's trick: the rounding of 1 + x cancels)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _phi(x):
    """φ(x) = e^x − 1 − x ≥ 0, from its Taylor series below |x| = 0.5 (no cancellation there)."""
    series = x * x * (0.5 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (1 / 720 + x * (1 / 5040 + x / 40320))))))
    return tl.maximum(tl.where(tl.abs(x) < 0.5, series, tl.exp(x) - 1.0 - x), 0.0)


@triton.jit
def _recentre(a_p, a_q, delta):
    """(a_p expm1(δ), a_p φ(δ)) for a centre moved by δ, with every exponent ≤ 0: a_p e^δ = a_q."""
    small = tl.abs(delta) <= 1.0
    phi_d = _phi(tl.minimum(tl.maximum(delta, -1.0), 1.0))
    em1 = tl.where(small, a_p * (phi_d + delta), a_q - a_p)
    aphi = tl.where(small, a_p * phi_d, a_q - a_p * (1.0 + delta))
    return em1, aphi


@triton.jit
def _split_range(V, tiles_per_split, BLOCK_V: tl.constexpr):
    """[start, end) of this program's vocabulary split (grid axis 1): whole tiles, end ≤ V."""
    start = tl.program_id(1) * tiles_per_split * BLOCK_V
    return start, tl.minimum(start + tiles_per_split * BLOCK_V, V)


@triton.jit
def _store_partials(part_ptr, K, x0, x1, x2, x3, x4, x5, x6, x7, NSTAT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write this program's first NSTAT partial statistics x0, x1, … of its rows into
    part[stat, split, row position], as one [BLOCK_N, 8] store (one layout change, not NSTAT:
    separate stores spilled the fp32 KL kernel's registers)."""
    loc = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    stat = tl.arange(0, 8)[None, :]  # (1, 8)
    x = tl.where(stat == 6, x6[:, None], x7[:, None])  # (BLOCK_N, 8): column j holds x_j
    x = tl.where(stat == 5, x5[:, None], x)
    x = tl.where(stat == 4, x4[:, None], x)
    x = tl.where(stat == 3, x3[:, None], x)
    x = tl.where(stat == 2, x2[:, None], x)
    x = tl.where(stat == 1, x1[:, None], x)
    x = tl.where(stat == 0, x0[:, None], x)
    slot = (stat * tl.num_programs(1) + tl.program_id(1)).to(tl.int64)
    tl.store(part_ptr + slot * K + loc[:, None], x, mask=(loc[:, None] < K) & (stat < NSTAT))


@triton.jit
def _load_partial(part_ptr, stat: tl.constexpr, split, S, loc, ok, K, other: tl.constexpr):
    return tl.load(part_ptr + (stat * S + split).to(tl.int64) * K + loc, mask=ok, other=other)


@triton.jit
def _kept_rows(idx_ptr, n_kept, BLOCK_N: tl.constexpr):
    """(local positions, their global row ids (int64), in range) of this program's kept rows (axis 0)."""
    loc = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ok = loc < n_kept
    return loc, tl.load(idx_ptr + loc, mask=ok, other=0), ok


@triton.jit
def _logprob_merge_kernel(
    part_ptr,  # (4, S, K) fp32 partials: m, s1, a, z_t
    idx_ptr,  # (K,) int64 kept rows
    lp_ptr,  # (N,) fp32 out: logprobs
    ent_ptr,  # (N,) fp32 out: entropy
    lse_ptr,  # (N,) fp32 out: logsumexp
    K,
    S,
    BLOCK_K: tl.constexpr,
):
    loc, rows, ok = _kept_rows(idx_ptr, K, BLOCK_K)
    m = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    for i in range(0, S):
        m = tl.maximum(m, _load_partial(part_ptr, 0, i, S, loc, ok, K, 0.0))
    s1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    a = tl.zeros([BLOCK_K], dtype=tl.float32)
    zt = tl.zeros([BLOCK_K], dtype=tl.float32)
    n_top = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in range(0, S):
        m_i = _load_partial(part_ptr, 0, i, S, loc, ok, K, 0.0)
        s1_i = _load_partial(part_ptr, 1, i, S, loc, ok, K, 0.0)
        alpha = tl.exp(m_i - m)
        top = m_i == m  # a split holding the row's max: its own 1 is already out of s1_i
        n_top += top.to(tl.float32)
        s1 += tl.where(top, s1_i, alpha + alpha * s1_i)
        a += alpha * (_load_partial(part_ptr, 2, i, S, loc, ok, K, 0.0) + (1.0 + s1_i) * (m - m_i))
        zt += _load_partial(part_ptr, 3, i, S, loc, ok, K, 0.0)
    s1 += n_top - 1.0  # tied maxima in several splits: all their 1s but one
    log_s = _log1p(s1)
    tl.store(lp_ptr + rows, (zt - m) - log_s, mask=ok)
    tl.store(ent_ptr + rows, log_s + a / (1.0 + s1), mask=ok)
    tl.store(lse_ptr + rows, m + log_s, mask=ok)


@triton.jit
def _kl_merge_kernel(
    part_ptr,  # (6 or 8, S, K) fp32 partials: m_p, s_p, m_q, s_q, D, T (, z_t, zq_t)
    idx_ptr,  # (K,) int64 kept rows
    kl_ptr,  # (N,) fp32 out: KL(p‖q)
    lsep_ptr,  # (N,) fp32 out: policy logsumexp
    dbar_ptr,  # (N,) fp32 out: Σ p (z − zq)
    lp_ptr,  # (N,) fp32 out: log p(target) (HAS_TARGETS)
    lq_ptr,  # (N,) fp32 out: log q(target) (HAS_TARGETS)
    K,
    S,
    HAS_TARGETS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    loc, rows, ok = _kept_rows(idx_ptr, K, BLOCK_K)
    m_p = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    m_q = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    for i in range(0, S):
        m_p = tl.maximum(m_p, _load_partial(part_ptr, 0, i, S, loc, ok, K, 0.0))
        m_q = tl.maximum(m_q, _load_partial(part_ptr, 2, i, S, loc, ok, K, 0.0))
    s_p = tl.zeros([BLOCK_K], dtype=tl.float32)
    s_q = tl.zeros([BLOCK_K], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_K], dtype=tl.float32)  # D = Σ e^{z − m_p} x, centred at m_p − m_q
    tsum = tl.zeros([BLOCK_K], dtype=tl.float32)  # T = Σ e^{z − m_p} φ(x)
    zt = tl.zeros([BLOCK_K], dtype=tl.float32)
    zqt = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in range(0, S):
        mp_i = _load_partial(part_ptr, 0, i, S, loc, ok, K, 0.0)
        sp_i = _load_partial(part_ptr, 1, i, S, loc, ok, K, 1.0)
        mq_i = _load_partial(part_ptr, 2, i, S, loc, ok, K, 0.0)
        d_i = _load_partial(part_ptr, 4, i, S, loc, ok, K, 0.0)
        a_p = tl.exp(mp_i - m_p)
        a_q = tl.exp(mq_i - m_q)
        delta = (m_p - m_q) - (mp_i - mq_i)  # the centre's move from the split's to the row's
        em1, aphi = _recentre(a_p, a_q, delta)
        tsum += a_q * _load_partial(part_ptr, 5, i, S, loc, ok, K, 0.0) + em1 * d_i + aphi * sp_i
        dsum += a_p * (d_i + delta * sp_i)
        s_p += a_p * sp_i
        s_q += a_q * _load_partial(part_ptr, 3, i, S, loc, ok, K, 1.0)
        if HAS_TARGETS:
            zt += _load_partial(part_ptr, 6, i, S, loc, ok, K, 0.0)
            zqt += _load_partial(part_ptr, 7, i, S, loc, ok, K, 0.0)
    u = dsum / s_p
    r = u + tsum / s_p  # s_q / s_p − 1
    log_ratio = tl.where(tl.abs(r) <= 0.5, _log1p(r), tl.log(s_q) - tl.log(s_p))
    lse_p = m_p + tl.log(s_p)
    tl.store(kl_ptr + rows, tl.maximum(log_ratio - u, 0.0), mask=ok)
    tl.store(lsep_ptr + rows, lse_p, mask=ok)
    tl.store(dbar_ptr + rows, (m_p - m_q) - u, mask=ok)
    if HAS_TARGETS:
        tl.store(lp_ptr + rows, zt - lse_p, mask=ok)
        tl.store(lq_ptr + rows, zqt - (m_q + tl.log(s_q)), mask=ok)


KERNELS = (_logprob_merge_kernel, _kl_merge_kernel)


def merge(kernel, part: torch.Tensor, rows: torch.Tensor, *outs: torch.Tensor, **constexprs) -> None:
    """Launch a merge kernel over the kept ``rows`` (the caller holds the device guard)."""
    k, s = rows.numel(), part.shape[1]
    extra = dict(num_warps=4) if part.is_cuda else {}
    kernel[(triton.cdiv(k, MERGE_BLOCK_K),)](part, rows, *outs, k, s, BLOCK_K=MERGE_BLOCK_K, **constexprs, **extra)
