"""Triton fused linear logprob + entropy: hidden states in, per-token stats out, no [N, V] logits.

Forward: one program per block of rows walks the vocabulary in BLOCK_V tiles; each logits tile
is a tl.dot over H in BLOCK_H chunks, then folded into an online softmax (running max m, sum of
exponentials s, and a = Σ e^{z-m}·z for the entropy, both rescaled by e^{m_old-m_new} when m grows).
It saves lse and Σpz per row (8 bytes/row) for the backward.

Backward: a 2-D grid over (row block, vocab tile). Each program recomputes its logits tile,
forms dlogits, and adds dlogits @ W into d_hidden and dlogits^T @ hidden into d_weight with
fp32 tl.atomic_add. Atomics instead of a second pass over vocab blocks because either split
would recompute the logits a second time (another 2·N·H·V FLOPs) or hold a [BLOCK_N, H]
accumulator that does not fit in registers at H = 4096; Cut Cross-Entropy makes the same choice.
The atomics are relaxed: nothing in the kernel reads the accumulators, and the kernel's end orders
them before any later reader. Triton's default (acq_rel) put a GPU-wide fence and an L1
invalidation (MEMBAR.ALL.GPU, CCTL.IVALL in the sm_90 SASS) around every accumulation.
Cost: 2·N·H·V forward; 6·N·H·V backward (2 to recompute, 2 per gradient).

bf16 is loaded and converted to fp32 at once under the interpreter (its bf16 math is wrong);
on a GPU the dots run in the input dtype with an fp32 accumulator (UPCAST=False).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _dispatch


@triton.jit
def _logits_tile(
    h_ptr,  # (N, H) hidden states, any strides
    w_ptr,  # (V, H) LM-head weight, any strides
    rows,  # (BLOCK_N,) int64 row ids
    cols,  # (BLOCK_V,) int64 vocab ids
    row_ok,  # (BLOCK_N,) bool
    col_ok,  # (BLOCK_V,) bool
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 tile hidden[rows] @ weight[cols].T (no temperature), looping over H."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        x = tl.load(
            h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_H)
        wt = tl.load(
            w_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wh,
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )  # (BLOCK_H, BLOCK_V) = W^T tile
        if UPCAST:
            x = x.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(x, wt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _accumulate_grads(
    dz,  # (BLOCK_N, BLOCK_V) fp32 dloss/dlogits of this tile, already divided by T
    h_ptr,  # (N, H) hidden
    w_ptr,  # (V, H) weight
    dh_ptr,  # (N, H) fp32 contiguous d_hidden accumulator
    dw_ptr,  # (V, H) fp32 contiguous d_weight accumulator
    rows,  # (BLOCK_N,) int64
    cols,  # (BLOCK_V,) int64
    row_ok,  # (BLOCK_N,) bool
    col_ok,  # (BLOCK_V,) bool
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    NEED_H: tl.constexpr,
    NEED_W: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d_hidden[rows] += dz @ W[cols];  d_weight[cols] += dz^T @ hidden[rows]  (atomics, fp32)."""
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        if NEED_H:
            w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wh,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_V, BLOCK_H)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(dz.to(w.dtype), w, input_precision=PRECISION)  # (BLOCK_N, BLOCK_H)
            tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], dh,
                          mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
        if NEED_W:
            x = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_H)
            if UPCAST:
                x = x.to(tl.float32)
            dw = tl.dot(tl.trans(dz.to(x.dtype)), x, input_precision=PRECISION)  # (BLOCK_V, BLOCK_H)
            tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], dw,
                          mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


@triton.jit
def _logprob_fwd_kernel(
    h_ptr,  # (N, H) hidden
    w_ptr,  # (V, H) weight
    t_ptr,  # (N,) int targets
    lp_ptr,  # (N,) fp32 out: logprobs
    ent_ptr,  # (N,) fp32 out: entropy
    lse_ptr,  # (N,) fp32 out: logsumexp, for backward
    spz_ptr,  # (N,) fp32 out: Σ p z, for backward
    N,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_t,
    inv_t,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=ignore_index)  # (BLOCK_N,)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)  # running max
    s = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ e^{z-m}
    a = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ e^{z-m} z
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)  # target logit
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hh,
                         stride_wv, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION) * inv_t
        z = tl.where(col_ok[None, :], z, float("-inf"))  # (BLOCK_N, BLOCK_V)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # exp(-inf) = 0 on the first tile
        e = tl.exp(z - m_new[:, None])  # (BLOCK_N, BLOCK_V)
        s = s * alpha + tl.sum(e, axis=1)
        # padded columns have e = 0 and z = -inf: multiply by a finite z there (0 * -inf = nan)
        a = a * alpha + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    lse = m + tl.log(s)
    spz = a / s
    valid = tgt != ignore_index
    tl.store(lp_ptr + rows, tl.where(valid, zt - lse, 0.0), mask=row_ok)
    tl.store(ent_ptr + rows, tl.where(valid, lse - spz, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(spz_ptr + rows, spz, mask=row_ok)


@triton.jit
def _logprob_bwd_kernel(
    h_ptr,  # (N, H) hidden
    w_ptr,  # (V, H) weight
    t_ptr,  # (N,) int targets
    lse_ptr,  # (N,) fp32 logsumexp from forward
    spz_ptr,  # (N,) fp32 Σ p z from forward
    glp_ptr,  # (N,) fp32 upstream grad of logprobs
    gent_ptr,  # (N,) fp32 upstream grad of entropy (unused unless HAS_ENT)
    dh_ptr,  # (N, H) fp32 contiguous, zero-initialised: d_hidden accumulator
    dw_ptr,  # (V, H) fp32 contiguous, zero-initialised: d_weight accumulator
    N,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_t,
    inv_t,
    ignore_index,
    HAS_ENT: tl.constexpr,
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
    tgt = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=ignore_index)  # (BLOCK_N,)
    keep = row_ok & (tgt != ignore_index)  # ignored rows get no gradient
    glp = tl.where(keep, tl.load(glp_ptr + rows, mask=row_ok, other=0.0), 0.0)  # (BLOCK_N,)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_N,)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hh,
                     stride_wv, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION) * inv_t
    p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)  # (BLOCK_N, BLOCK_V)
    # dlogprob/dz_j = onehot_j - p_j
    dz = tl.where(cols[None, :] == tgt[:, None], glp[:, None], 0.0) - p * glp[:, None]
    if HAS_ENT:
        # entropy = lse - Σ p z  =>  d/dz_j = -p_j (z_j - Σ p z)
        gent = tl.where(keep, tl.load(gent_ptr + rows, mask=row_ok, other=0.0), 0.0)
        spz = tl.load(spz_ptr + rows, mask=row_ok, other=0.0)
        dz -= gent[:, None] * p * (z - spz[:, None])
    dz = dz * inv_t  # chain rule through z = logits / T
    _accumulate_grads(dz, h_ptr, w_ptr, dh_ptr, dw_ptr, rows, cols, row_ok, col_ok, H, stride_hn,
                      stride_hh, stride_wv, stride_wh, NEED_H, NEED_W, BLOCK_H, UPCAST, PRECISION)


KERNELS = (_logprob_fwd_kernel, _logprob_bwd_kernel)


def launch_config(hidden: torch.Tensor) -> dict:
    """Block sizes and precision flags shared by the logprob and KL launchers.

    Under the interpreter: small blocks (so tests cross tile edges) and fp32 math everywhere.
    On a GPU: see ``gpu_launch_config``, sized for the device's shared memory.
    """
    if hidden.device.type == "cpu":
        return dict(BLOCK_N=32, BLOCK_V=128, BLOCK_H=32, UPCAST=True, PRECISION="ieee")
    shared_kib = shared_memory_kib(torch.cuda.get_device_capability(hidden.device))
    return gpu_launch_config(hidden.dtype, torch.backends.cuda.matmul.allow_tf32, shared_kib)


# Shared memory one program may use (the opt-in maximum per block), KiB, by compute capability:
# the CUDA programming guide's table. Unknown minors take their major's .0 entry, else 99.
SHARED_KIB = {(8, 0): 163, (8, 6): 99, (8, 7): 163, (8, 9): 99, (9, 0): 227, (10, 0): 227, (12, 0): 99}


def shared_memory_kib(capability: tuple[int, int]) -> int:
    return SHARED_KIB.get(tuple(capability), SHARED_KIB.get((capability[0], 0), 99))


def gpu_launch_config(dtype: torch.dtype, allow_tf32: bool, shared_kib: int = 227) -> dict:
    """Tiles 64 rows × 128 vocab × BLOCK_H, 8 warps; fp32 inputs follow torch's allow_tf32 setting,
    fp16/bf16 dots run in the input dtype.

    BLOCK_H and the pipeline depth are sized to the shared memory (sizes from compiling every case
    with benchmarks/kernel_compile_report.py, which checks each configuration this returns):
    - ≥ 160 KiB (H100/H200, A100): 64-wide H steps, 3 stages (bf16 backward 136 KiB on sm_90);
      tf32 steps by 32, since at 64 its backward needs 240 KiB on sm_90;
    - smaller (99 KiB: RTX 30/40, A10, L4, L40): 2 stages and H steps of 32, with 32-row blocks
      for fp32 inputs (so tf32 does not spill); the large-device fp32 backward would need 144 KiB
      there and fail at its first launch.
    """
    fp32 = dtype == torch.float32
    tf32 = fp32 and allow_tf32
    if shared_kib >= 160:
        block_n, block_h, stages = 64, (32 if tf32 else 64), 3
    else:
        block_n, block_h, stages = (32 if fp32 else 64), 32, 2
    return dict(BLOCK_N=block_n, BLOCK_V=128, BLOCK_H=block_h, UPCAST=fp32,
                PRECISION="tf32" if tf32 else "ieee", num_warps=8, num_stages=stages)


def _same_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """tl.dot needs one input dtype; a silent cast here would hide a 2x memory cost."""
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton backend: expected fp32/fp16/bf16 inputs, got {hidden.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"triton backend: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one")


class TritonLogprob(torch.autograd.Function):
    """Fused linear logprob + entropy; reproduces

        z = (hidden @ weight.T).float() / T
        logprob = z.log_softmax(-1).gather(-1, target[:, None])[:, 0]
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    with both set to 0 (and no gradient) where target == ignore_index.
    """

    @staticmethod
    @_dispatch.fp32_math
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, ignore_index):
        n, hdim = hidden.shape
        v = weight.shape[0]
        dev = hidden.device
        lp, ent, lse, spz = (_dispatch.empty(n, device=dev) for _ in range(4))  # (N,) each
        cfg = launch_config(hidden)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
        _logprob_fwd_kernel[grid](
            hidden, weight, targets, lp, ent, lse, spz, n, v, hdim,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), targets.stride(0),
            1.0 / temperature, ignore_index, **cfg,
        )
        ctx.save_for_backward(hidden, weight, targets, lse, spz)
        ctx.inv_t, ctx.ignore_index = 1.0 / temperature, ignore_index
        if not return_entropy:
            ent = ent.new_empty(0)
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    @_dispatch.fp32_math
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, spz = ctx.saved_tensors
        n, hdim = hidden.shape
        v = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()  # (N,)
        has_ent = g_ent is not None and g_ent.numel() == n
        g_ent = g_ent.float().contiguous() if has_ent else g_lp  # (N,) placeholder when unused
        d_hidden = torch.zeros(n if need_h else 0, hdim, device=hidden.device, dtype=torch.float32)
        d_weight = torch.zeros(v if need_w else 0, hdim, device=hidden.device, dtype=torch.float32)
        cfg = launch_config(hidden)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))
        _logprob_bwd_kernel[grid](
            hidden, weight, targets, lse, spz, g_lp, g_ent, d_hidden, d_weight, n, v, hdim,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), targets.stride(0),
            ctx.inv_t, ctx.ignore_index, HAS_ENT=has_ent, NEED_H=need_h, NEED_W=need_w, **cfg,
        )
        d_hidden = d_hidden.to(hidden.dtype) if need_h else None
        d_weight = d_weight.to(weight.dtype) if need_w else None
        return d_hidden, d_weight, None, None, None, None


def triton_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher behind ``kernels.fused_logprobs(backend="triton")``.

    Formula: logprob = z[target] - logsumexp(z), entropy = logsumexp(z) - Σ softmax(z) z,
    z = hidden @ weight.T / T.
    Shapes: hidden [N, H], weight [V, H], targets [N] -> logprobs [N] (, entropy [N]).
    Returns: float32 logprobs (and entropy); differentiable w.r.t. hidden and weight.
    """
    _same_dtype(hidden, weight)
    lp, ent = TritonLogprob.apply(hidden, weight, targets, float(temperature), return_entropy, ignore_index)
    return (lp, ent) if return_entropy else lp
