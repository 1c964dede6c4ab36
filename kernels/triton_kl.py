"""Triton exact per-token KL(π‖π_ref) over the full vocabulary, from both models' hidden states.

Forward: a 2-D grid of (block of kept rows, vocabulary split) programs; each walks its split's
BLOCK_V tiles, computing the policy tile z = h @ W^T / T and the reference tile
zq = h_ref @ W_ref^T / T, with two online softmaxes side by side (m_p, s_p, m_q, s_q). The KL
comes from the centred form of ``stable_stats.py``: with the centre c = m_p − m_q and x = c − (z − zq) it keeps
D = Σ e^{z−m_p} x and T = Σ e^{z−m_p} φ(x), φ(x) = e^x − 1 − x ≥ 0; when a max grows, the centre
moves by δ and T ← a_q T + a_p expm1(δ) D + a_p φ(δ) s_p, D ← a_p (D + δ s_p) (a_p, a_q the
rescalings; a_p e^δ = a_q, so every exponent stays ≤ 0). Each program writes its split's
(m_p, s_p, m_q, s_q, D, T) to a partials buffer; ``triton_splits.py`` merges the splits with the
same update and computes, with u = D/s_p, v = T/s_p:

    KL = log1p(u + v) − u = log(s_q / s_p) − u      (= Σ p (z − zq) − lse_p + lse_q)

so near-identical models lose nothing to the size of the logits, and KL ≥ 0 (up to eps·|u|,
which a final max(·, 0) removes). It saves lse_p and d̄ = Σ p (z − zq) = c − u per row.

Backward (policy side only; the reference model is frozen in PPO): dKL/dz_j = p_j (d_j − d̄), d = z − zq,
written per chunk of rows into a dlogits buffer and reduced by GEMMs (see triton_logprob.py):
no atomics, deterministic. Cost: 4·N·H·V forward (two GEMMs); 8·N·H·V backward (two recomputed in
Triton, two gradient GEMMs).

With ``HAS_TARGETS`` the same forward sweep also gathers both models' logits of the sampled
tokens: the rollout's log π(a), log π_ref(a) and exact KL in one pass over the vocabulary
(``triton_logprobs_kl``), instead of three.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _dispatch
from kernels.triton_logprob import (_kept_rows, _logits_tile, check_dtypes, kept_rows, launch_config, on_device,
                                    reduce_grads)
from kernels.triton_splits import (KL_STATS, _kl_merge_kernel, _phi, _recentre, _split_range, _store_partials, merge,
                                   split_plan)


@triton.jit
def _kl_fwd_kernel(
    h_ptr,  # (N, H) policy hidden
    w_ptr,  # (V, H) policy weight
    rh_ptr,  # (N, HR) reference hidden
    rw_ptr,  # (V, HR) reference weight
    idx_ptr,  # (K,) int64 kept rows
    part_ptr,  # (6 or 8, S, K) fp32 out: this split's m_p, s_p, m_q, s_q, D, T (, z_t, zq_t) per kept row
    t_ptr,  # (N,) int targets (read only with HAS_TARGETS)
    K,
    V,
    H,
    HR,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_rhn,
    stride_rhh,
    stride_rwv,
    stride_rwh,
    stride_t,
    inv_t,
    tiles_per_split,
    HAS_TARGETS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    _, rows, row_ok = _kept_rows(idx_ptr, K, BLOCK_N)
    v_start, v_end = _split_range(V, tiles_per_split, BLOCK_V)
    m_p = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s_p = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_q = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s_q = tl.zeros([BLOCK_N], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_N], dtype=tl.float32)  # D = Σ e^{z - m_p} x
    tsum = tl.zeros([BLOCK_N], dtype=tl.float32)  # T = Σ e^{z - m_p} φ(x)
    if HAS_TARGETS:
        tgt = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=-1)  # (BLOCK_N,) ignored rows match no column
        zt = tl.zeros([BLOCK_N], dtype=tl.float32)  # z[target]
        zqt = tl.zeros([BLOCK_N], dtype=tl.float32)  # zq[target]
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hh,
                         stride_wv, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION) * inv_t
        zq = _logits_tile(rh_ptr, rw_ptr, rows, cols, row_ok, col_ok, HR, stride_rhn, stride_rhh,
                          stride_rwv, stride_rwh, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION) * inv_t
        if HAS_TARGETS:
            hit = cols[None, :] == tgt[:, None]  # (BLOCK_N, BLOCK_V) the target's column
            zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
            zqt += tl.sum(tl.where(hit, zq, 0.0), axis=1)
        mp_new = tl.maximum(m_p, tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1))
        mq_new = tl.maximum(m_q, tl.max(tl.where(col_ok[None, :], zq, float("-inf")), axis=1))
        a_p = tl.exp(m_p - mp_new)  # 0 on the first tile
        a_q = tl.exp(m_q - mq_new)
        # move the centre c = m_p - m_q by delta: T and D re-expressed around the new centre
        started = m_p > float("-inf")  # before the first tile the centre is the new one (δ = 0)
        delta = (mp_new - mq_new) - (tl.where(started, m_p, mp_new) - tl.where(started, m_q, mq_new))
        em1, aphi = _recentre(a_p, a_q, delta)  # a_p expm1(δ), a_p φ(δ)
        tsum = a_q * tsum + em1 * dsum + aphi * s_p
        dsum = a_p * (dsum + delta * s_p)
        w_p = tl.where(col_ok[None, :], tl.exp(z - mp_new[:, None]), 0.0)  # (BLOCK_N, BLOCK_V) ≤ 1
        w_q = tl.where(col_ok[None, :], tl.exp(zq - mq_new[:, None]), 0.0)
        x = tl.where(col_ok[None, :], (mp_new - mq_new)[:, None] - (z - zq), 0.0)
        term = tl.where(x > 1.0, w_q - w_p * (1.0 + x), w_p * _phi(tl.minimum(x, 1.0)))  # w_p φ(x)
        dsum += tl.sum(w_p * x, axis=1)
        tsum += tl.sum(term, axis=1)
        s_p = a_p * s_p + tl.sum(w_p, axis=1)
        s_q = a_q * s_q + tl.sum(w_q, axis=1)
        m_p = mp_new
        m_q = mq_new
    if HAS_TARGETS:
        _store_partials(part_ptr, K, m_p, s_p, m_q, s_q, dsum, tsum, zt, zqt, 8, BLOCK_N)
    else:
        _store_partials(part_ptr, K, m_p, s_p, m_q, s_q, dsum, tsum, tsum, tsum, 6, BLOCK_N)


@triton.jit
def _kl_bwd_kernel(
    h_ptr,  # (N, H) policy hidden
    w_ptr,  # (V, H) policy weight
    rh_ptr,  # (N, HR) reference hidden
    rw_ptr,  # (V, HR) reference weight
    idx_ptr,  # (C,) int64 this chunk's kept rows
    lsep_ptr,  # (N,) fp32 policy logsumexp
    dbar_ptr,  # (N,) fp32 Σ p (z − zq)
    g_ptr,  # (N,) fp32 upstream grad of KL
    dz_ptr,  # (C, V) contiguous out: dloss/dlogits of the chunk's rows (GEMM dtype)
    C,
    V,
    H,
    HR,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_rhn,
    stride_rhh,
    stride_rwv,
    stride_rwh,
    inv_t,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    loc, rows, row_ok = _kept_rows(idx_ptr, C, BLOCK_N)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_ok = cols < V
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_N,)
    lse_p = tl.load(lsep_ptr + rows, mask=row_ok, other=0.0)
    dbar = tl.load(dbar_ptr + rows, mask=row_ok, other=0.0)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hh,
                     stride_wv, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION) * inv_t
    zq = _logits_tile(rh_ptr, rw_ptr, rows, cols, row_ok, col_ok, HR, stride_rhn, stride_rhh,
                      stride_rwv, stride_rwh, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION) * inv_t
    p = tl.where(col_ok[None, :], tl.exp(z - lse_p[:, None]), 0.0)  # (BLOCK_N, BLOCK_V)
    dz = p * ((z - zq) - dbar[:, None]) * (g * inv_t)[:, None]  # (BLOCK_N, BLOCK_V)
    tl.store(dz_ptr + loc[:, None] * V + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


KERNELS = (_kl_fwd_kernel, _kl_bwd_kernel)


def _strides(hidden, weight, ref_hidden, ref_weight) -> tuple[int, ...]:
    return (*hidden.stride(), *weight.stride(), *ref_hidden.stride(), *ref_weight.stride())


def _launch_fwd(hidden, weight, ref_hidden, ref_weight, temperature, rows, kl, lse_p, dbar,
                targets=None, lp=None, lq=None) -> None:
    """One forward sweep over the vocabulary for the kept ``rows``; with ``targets`` it also writes
    both models' log-probabilities of the targets into ``lp`` / ``lq``."""
    k = rows.numel()
    if k == 0:
        return
    hdim, v, hr = hidden.shape[1], weight.shape[0], ref_hidden.shape[1]
    has_t = targets is not None
    cfg = launch_config(hidden, weight)
    splits, per = split_plan(k, v, cfg, hidden.device)
    part = _dispatch.empty(KL_STATS + 2 * has_t, splits, k, device=hidden.device)  # (6 or 8, S, K) partials
    with on_device(hidden):
        _kl_fwd_kernel[(triton.cdiv(k, cfg["BLOCK_N"]), splits)](
            hidden, weight, ref_hidden, ref_weight, rows, part, targets if has_t else rows, k, v, hdim, hr,
            *_strides(hidden, weight, ref_hidden, ref_weight), targets.stride(0) if has_t else 0,
            1.0 / temperature, per, HAS_TARGETS=has_t, **cfg,
        )
        merge(_kl_merge_kernel, part, rows, kl, lse_p, dbar, lp if has_t else kl, lq if has_t else kl,
              HAS_TARGETS=has_t)


class TritonKL(torch.autograd.Function):
    """Fused exact KL(π‖π_ref); reproduces

        lp = (hidden @ weight.T).float().div(T).log_softmax(-1)
        lq = (ref_hidden @ ref_weight.T).float().div(T).log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)            # 0 (no FLOPs, no gradient) where mask is False
    with the reference side detached (no gradient to ref_hidden / ref_weight).
    """

    @staticmethod
    @_dispatch.fp32_math
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, temperature, keep):
        rows = kept_rows(keep)  # (K,)
        kl, lse_p, dbar = (_dispatch.empty(hidden.shape[0], device=hidden.device) for _ in range(3))  # (N,) each
        _launch_fwd(hidden, weight, ref_hidden, ref_weight, temperature, rows, kl, lse_p, dbar)
        kl.masked_fill_(~keep, 0.0)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, rows, lse_p, dbar)
        ctx.inv_t = 1.0 / temperature
        return kl

    @staticmethod
    @_dispatch.fp32_math
    def backward(ctx, g_kl):
        hidden, weight, ref_hidden, ref_weight, rows, lse_p, dbar = ctx.saved_tensors
        hdim, v, hr = hidden.shape[1], weight.shape[0], ref_hidden.shape[1]
        g = g_kl.float().contiguous()  # (N,)
        cfg = launch_config(hidden, weight)

        def write_dz(dz, idx):
            grid = (triton.cdiv(idx.numel(), cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))
            with on_device(hidden):
                _kl_bwd_kernel[grid](
                    hidden, weight, ref_hidden, ref_weight, idx, lse_p, dbar, g, dz, idx.numel(), v, hdim, hr,
                    *_strides(hidden, weight, ref_hidden, ref_weight), ctx.inv_t, **cfg,
                )

        return (*reduce_grads(ctx, hidden, weight, rows, cfg, write_dz), None, None, None, None)


def triton_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launcher behind ``kernels.fused_kl(backend="triton")``.

    Formula: KL = Σ_j p_j (z_j - zq_j) - lse(z) + lse(zq), z = hidden @ weight.T / T,
    zq = ref_hidden @ ref_weight.T / T (computed in the centred form above).
    Shapes: hidden [N, H], weight [V, H], ref_hidden [N, H'], ref_weight [V, H'], mask [N] -> kl [N].
    Returns: float32 kl ≥ 0, 0 where mask is False; differentiable w.r.t. hidden and weight only.
    """
    check_dtypes(hidden, weight)
    check_dtypes(ref_hidden, ref_weight)
    keep = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    return TritonKL.apply(hidden, weight, ref_hidden, ref_weight, float(temperature), keep)


@torch.no_grad()
def triton_logprobs_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher behind ``kernels.fused_logprobs_kl(backend="triton")``: one sweep over the
    vocabulary gives log p(target), log q(target) and the exact KL(p‖q) per row (the rollout's
    scoring; no gradient). Shapes as :func:`triton_kl`, targets [N] -> three [N] float32 tensors;
    rows whose target is ``ignore_index`` read 0 in the two logprobs (their KL is still computed)."""
    check_dtypes(hidden, weight)
    check_dtypes(ref_hidden, ref_weight)
    n, dev = hidden.shape[0], hidden.device
    kl, lse_p, dbar, lp, lq = (_dispatch.empty(n, device=dev) for _ in range(5))  # (N,) each
    rows = torch.arange(n, device=dev)  # every row: the rollout reports the KL of ignored rows too
    _launch_fwd(hidden, weight, ref_hidden, ref_weight, float(temperature), rows, kl, lse_p, dbar,
                targets, lp, lq)
    ignored = targets == ignore_index
    return lp.masked_fill_(ignored, 0.0), lq.masked_fill_(ignored, 0.0), kl
