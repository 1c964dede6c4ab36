"""Triton exact per-token KL(π‖π_ref) over the full vocabulary, from both models' hidden states.

Forward: one program per block of rows walks the vocabulary in BLOCK_V tiles, computing the policy
tile z = h @ W^T / T and the reference tile zq = h_ref @ W_ref^T / T, and runs two online softmaxes
side by side. Besides m_p, s_p, m_q, s_q it keeps t = Σ e^{z - m_p}(z - zq), rescaled together with
s_p by e^{m_old - m_new} whenever m_p grows. At the end

    KL = t / s_p - (m_p + log s_p) + (m_q + log s_q)      (= Σ p (z - zq) - lse_p + lse_q)

Backward (policy side only; the reference model is frozen in PPO, so ref_hidden/ref_weight are
constants): dKL/dz_j = p_j ((z_j - zq_j) - (lse_p - lse_q) - KL), then the same atomic
accumulation of d_hidden / d_weight as the logprob kernel (see triton_logprob.py for why).
Cost: 4·N·H·V forward (two GEMMs); 8·N·H·V backward (two recomputed, two gradients).

With ``HAS_TARGETS`` the same forward sweep also gathers both models' logits of the sampled
tokens: the rollout's log π(a), log π_ref(a) and exact KL in one pass over the vocabulary
(``triton_logprobs_kl``), instead of three.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _dispatch
from kernels.triton_logprob import _accumulate_grads, _logits_tile, _same_dtype, launch_config


@triton.jit
def _kl_fwd_kernel(
    h_ptr,  # (N, H) policy hidden
    w_ptr,  # (V, H) policy weight
    rh_ptr,  # (N, HR) reference hidden
    rw_ptr,  # (V, HR) reference weight
    kl_ptr,  # (N,) fp32 out: KL(p‖q)
    lsep_ptr,  # (N,) fp32 out: policy logsumexp, for backward
    lseq_ptr,  # (N,) fp32 out: reference logsumexp, for backward
    t_ptr,  # (N,) int targets (read only with HAS_TARGETS)
    lp_ptr,  # (N,) fp32 out: log p(target) (HAS_TARGETS)
    lq_ptr,  # (N,) fp32 out: log q(target) (HAS_TARGETS)
    N,
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
    ignore_index,
    HAS_TARGETS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    m_p = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s_p = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_q = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s_q = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ e^{z - m_p} (z - zq)
    if HAS_TARGETS:
        tgt = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=ignore_index)  # (BLOCK_N,)
        zt = tl.zeros([BLOCK_N], dtype=tl.float32)  # z[target]
        zqt = tl.zeros([BLOCK_N], dtype=tl.float32)  # zq[target]
    for v0 in range(0, V, BLOCK_V):
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
        diff = tl.where(col_ok[None, :], z - zq, 0.0)  # (BLOCK_N, BLOCK_V) finite on padding
        z = tl.where(col_ok[None, :], z, float("-inf"))
        zq = tl.where(col_ok[None, :], zq, float("-inf"))
        mp_new = tl.maximum(m_p, tl.max(z, axis=1))
        alpha = tl.exp(m_p - mp_new)
        e = tl.exp(z - mp_new[:, None])  # (BLOCK_N, BLOCK_V)
        s_p = s_p * alpha + tl.sum(e, axis=1)
        t = t * alpha + tl.sum(e * diff, axis=1)
        m_p = mp_new
        mq_new = tl.maximum(m_q, tl.max(zq, axis=1))
        s_q = s_q * tl.exp(m_q - mq_new) + tl.sum(tl.exp(zq - mq_new[:, None]), axis=1)
        m_q = mq_new
    lse_p = m_p + tl.log(s_p)
    lse_q = m_q + tl.log(s_q)
    tl.store(kl_ptr + rows, t / s_p - lse_p + lse_q, mask=row_ok)
    tl.store(lsep_ptr + rows, lse_p, mask=row_ok)
    tl.store(lseq_ptr + rows, lse_q, mask=row_ok)
    if HAS_TARGETS:
        valid = tgt != ignore_index
        tl.store(lp_ptr + rows, tl.where(valid, zt - lse_p, 0.0), mask=row_ok)
        tl.store(lq_ptr + rows, tl.where(valid, zqt - lse_q, 0.0), mask=row_ok)


@triton.jit
def _kl_bwd_kernel(
    h_ptr,  # (N, H) policy hidden
    w_ptr,  # (V, H) policy weight
    rh_ptr,  # (N, HR) reference hidden
    rw_ptr,  # (V, HR) reference weight
    kl_ptr,  # (N,) fp32 KL from forward
    lsep_ptr,  # (N,) fp32 policy logsumexp
    lseq_ptr,  # (N,) fp32 reference logsumexp
    g_ptr,  # (N,) fp32 upstream grad of KL
    dh_ptr,  # (N, H) fp32 contiguous, zero-initialised
    dw_ptr,  # (V, H) fp32 contiguous, zero-initialised
    N,
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
    NEED_H: tl.constexpr,
    NEED_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < V
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_N,)
    kl = tl.load(kl_ptr + rows, mask=row_ok, other=0.0)
    lse_p = tl.load(lsep_ptr + rows, mask=row_ok, other=0.0)
    lse_q = tl.load(lseq_ptr + rows, mask=row_ok, other=0.0)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hh,
                     stride_wv, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION) * inv_t
    zq = _logits_tile(rh_ptr, rw_ptr, rows, cols, row_ok, col_ok, HR, stride_rhn, stride_rhh,
                      stride_rwv, stride_rwh, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION) * inv_t
    p = tl.where(col_ok[None, :], tl.exp(z - lse_p[:, None]), 0.0)  # (BLOCK_N, BLOCK_V)
    shift = lse_p - lse_q + kl  # (BLOCK_N,)
    dz = p * ((z - zq) - shift[:, None]) * (g * inv_t)[:, None]  # (BLOCK_N, BLOCK_V)
    _accumulate_grads(dz, h_ptr, w_ptr, dh_ptr, dw_ptr, rows, cols, row_ok, col_ok, H, stride_hn,
                      stride_hh, stride_wv, stride_wh, NEED_H, NEED_W, BLOCK_H, UPCAST, PRECISION)


KERNELS = (_kl_fwd_kernel, _kl_bwd_kernel)


def _strides(hidden, weight, ref_hidden, ref_weight) -> tuple[int, ...]:
    return (*hidden.stride(), *weight.stride(), *ref_hidden.stride(), *ref_weight.stride())


def _launch_fwd(hidden, weight, ref_hidden, ref_weight, temperature, kl, lse_p, lse_q,
                targets=None, lp=None, lq=None, ignore_index=-100) -> None:
    """One forward sweep over the vocabulary; with ``targets`` it also writes both models'
    log-probabilities of the targets into ``lp`` / ``lq``."""
    n, hdim = hidden.shape
    v, hr = weight.shape[0], ref_hidden.shape[1]
    has_t = targets is not None
    cfg = launch_config(hidden)
    _kl_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        hidden, weight, ref_hidden, ref_weight, kl, lse_p, lse_q,
        targets if has_t else kl, lp if has_t else kl, lq if has_t else kl, n, v, hdim, hr,
        *_strides(hidden, weight, ref_hidden, ref_weight), targets.stride(0) if has_t else 0,
        1.0 / temperature, ignore_index, HAS_TARGETS=has_t, **cfg,
    )


class TritonKL(torch.autograd.Function):
    """Fused exact KL(π‖π_ref); reproduces

        lp = (hidden @ weight.T).float().div(T).log_softmax(-1)
        lq = (ref_hidden @ ref_weight.T).float().div(T).log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
    with the reference side detached (no gradient to ref_hidden / ref_weight).
    """

    @staticmethod
    @_dispatch.fp32_math
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, temperature):
        kl, lse_p, lse_q = (_dispatch.empty(hidden.shape[0], device=hidden.device) for _ in range(3))  # (N,) each
        _launch_fwd(hidden, weight, ref_hidden, ref_weight, temperature, kl, lse_p, lse_q)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, kl, lse_p, lse_q)
        ctx.inv_t = 1.0 / temperature
        return kl

    @staticmethod
    @_dispatch.fp32_math
    def backward(ctx, g_kl):
        hidden, weight, ref_hidden, ref_weight, kl, lse_p, lse_q = ctx.saved_tensors
        n, hdim = hidden.shape
        v, hr = weight.shape[0], ref_hidden.shape[1]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden = torch.zeros(n if need_h else 0, hdim, device=hidden.device, dtype=torch.float32)
        d_weight = torch.zeros(v if need_w else 0, hdim, device=hidden.device, dtype=torch.float32)
        cfg = launch_config(hidden)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))
        _kl_bwd_kernel[grid](
            hidden, weight, ref_hidden, ref_weight, kl, lse_p, lse_q, g_kl.float().contiguous(),
            d_hidden, d_weight, n, v, hdim, hr, *_strides(hidden, weight, ref_hidden, ref_weight),
            ctx.inv_t, NEED_H=need_h, NEED_W=need_w, **cfg,
        )
        d_hidden = d_hidden.to(hidden.dtype) if need_h else None
        d_weight = d_weight.to(weight.dtype) if need_w else None
        return d_hidden, d_weight, None, None, None


def triton_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Triton launcher behind ``kernels.fused_kl(backend="triton")``.

    Formula: KL = Σ_j p_j (z_j - zq_j) - lse(z) + lse(zq), z = hidden @ weight.T / T,
    zq = ref_hidden @ ref_weight.T / T.
    Shapes: hidden [N, H], weight [V, H], ref_hidden [N, H'], ref_weight [V, H'] -> kl [N].
    Returns: float32 kl; differentiable w.r.t. hidden and weight only.
    """
    _same_dtype(hidden, weight)
    _same_dtype(ref_hidden, ref_weight)
    return TritonKL.apply(hidden, weight, ref_hidden, ref_weight, float(temperature))


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
    _same_dtype(hidden, weight)
    _same_dtype(ref_hidden, ref_weight)
    n, dev = hidden.shape[0], hidden.device
    kl, lse_p, lse_q, lp, lq = (_dispatch.empty(n, device=dev) for _ in range(5))  # (N,) each
    _launch_fwd(hidden, weight, ref_hidden, ref_weight, float(temperature), kl, lse_p, lse_q,
                targets, lp, lq, ignore_index)
    return lp, lq, kl
