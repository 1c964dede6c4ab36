"""Triton fused linear logprob + entropy: hidden states in, per-token stats out, no [N, V] logits.

Forward: a 2-D grid of (block of kept rows, vocabulary split) programs (an index list: masked
rows are never launched); each walks its split's BLOCK_V tiles, each logits tile a tl.dot over H in
BLOCK_H chunks, folded into an online softmax that keeps, per row, the running max m,
s1 = Σ e^{z−m} − 1 (summed without the max's own 1, so log1p(s1) keeps its precision at low
entropy) and a = Σ e^{z−m} (m − z) ≥ 0, all rescaled when m grows. The splits' partial statistics
are merged with the same rescaling (``triton_splits.py``: the split count, the merge):
entropy = log1p(s1) + a / (1 + s1), no term the size of the logits subtracted (``stable_stats.py``
has the derivation and the torch version). It saves lse and the entropy per row (8 bytes/row) for
the backward.

Backward, per chunk of kept rows: a 2-D grid over (row block, vocab tile) recomputes each logits
tile and writes its dlogits into a [chunk, V] buffer (each element written once); d_hidden =
dlogits @ W and d_weight += dlogitsᵀ @ hidden are then GEMMs (cuBLAS on a GPU). No atomics, so
the gradients are bit-identical run to run; a frozen head skips the d_weight GEMM.
Cost: 2·N·H·V forward; 6·N·H·V backward (2 to recompute in Triton, 4 in the two GEMMs); memory
beyond inputs and gradients: the [chunk, V] dlogits buffer (≤ DZ_CHUNK_ELEMENTS), 8 bytes/row, and
during the forward 16·S bytes per kept row of split partials.

bf16 is loaded and converted to fp32 at once under the interpreter (its bf16 math is wrong);
on a GPU the dots run in the input dtype with an fp32 accumulator (UPCAST=False). Offsets are
int64 throughout (row, column and H indices), so strided inputs past 2^31 elements address right.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kernels import _dispatch
from kernels.triton_splits import (LP_STATS, _kept_rows, _logprob_merge_kernel, _split_range, _store_partials, merge,
                                   split_plan)


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
        ks = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)  # int64: ks * stride can pass 2^31
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
def _logprob_fwd_kernel(
    h_ptr,  # (N, H) hidden
    w_ptr,  # (V, H) weight
    t_ptr,  # (N,) int targets
    idx_ptr,  # (K,) int64 kept rows (target != ignore_index)
    part_ptr,  # (4, S, K) fp32 out: this split's m, s1, a, z_t per kept row
    K,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_t,
    inv_t,
    tiles_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    _, rows, row_ok = _kept_rows(idx_ptr, K, BLOCK_N)
    v_start, v_end = _split_range(V, tiles_per_split, BLOCK_V)
    tgt = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=0)  # (BLOCK_N,)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)  # running max
    s1 = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ e^{z-m} - 1
    a = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ e^{z-m} (m - z)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)  # target logit (0 unless this split holds it)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hh,
                         stride_wv, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION) * inv_t
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))  # (BLOCK_N, BLOCK_V)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # exp(-inf) = 0 on the first tile
        e = tl.exp(z - m_new[:, None])  # (BLOCK_N, BLOCK_V), 0 on padding
        gap = tl.where(col_ok[None, :], m_new[:, None] - z, 0.0)  # m - z ≥ 0, finite on padding
        top = z == m_new[:, None]  # the max's own e^0 = 1 is left out of s1
        n_top = tl.sum(top.to(tl.float32), axis=1)
        shift = tl.where(m > float("-inf"), m_new - m, 0.0)
        a = alpha * (a + (1.0 + s1) * shift) + tl.sum(e * gap, axis=1)
        s1 = tl.where(n_top > 0, alpha + alpha * s1 + tl.sum(tl.where(top, 0.0, e), axis=1) + (n_top - 1.0),
                      s1 + tl.sum(e, axis=1))
        m = m_new
    _store_partials(part_ptr, K, m, s1, a, zt, zt, zt, zt, zt, 4, BLOCK_N)


@triton.jit
def _logprob_bwd_kernel(
    h_ptr,  # (N, H) hidden
    w_ptr,  # (V, H) weight
    t_ptr,  # (N,) int targets
    idx_ptr,  # (C,) int64 this chunk's kept rows
    lse_ptr,  # (N,) fp32 logsumexp from forward
    ent_ptr,  # (N,) fp32 entropy from forward
    glp_ptr,  # (N,) fp32 upstream grad of logprobs
    gent_ptr,  # (N,) fp32 upstream grad of entropy (unused unless HAS_ENT)
    dz_ptr,  # (C, V) contiguous out: dloss/dlogits of the chunk's rows (GEMM dtype)
    C,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_t,
    inv_t,
    HAS_ENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    loc, rows, row_ok = _kept_rows(idx_ptr, C, BLOCK_N)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_ok = cols < V
    tgt = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=0)  # (BLOCK_N,)
    glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_N,)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_N,)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hh,
                     stride_wv, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION) * inv_t
    logp = z - lse[:, None]  # (BLOCK_N, BLOCK_V)
    p = tl.where(col_ok[None, :], tl.exp(logp), 0.0)
    # dlogprob/dz_j = onehot_j - p_j
    dz = tl.where(cols[None, :] == tgt[:, None], glp[:, None], 0.0) - p * glp[:, None]
    if HAS_ENT:
        # entropy = -Σ p log p  =>  d/dz_j = -p_j (log p_j + entropy)
        gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        dz -= gent[:, None] * p * (logp + ent[:, None])
    dz = dz * inv_t  # chain rule through z = logits / T
    tl.store(dz_ptr + loc[:, None] * V + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


KERNELS = (_logprob_fwd_kernel, _logprob_bwd_kernel)


def launch_config(hidden: torch.Tensor, weight: torch.Tensor) -> dict:
    """Block sizes and precision flags shared by the logprob and KL launchers.

    Under the interpreter: small blocks (so tests cross tile edges) and fp32 math everywhere.
    On a GPU: ``gpu_launch_config`` for the shared memory the device reports; mixed input dtypes
    (fp32 hidden, bf16 head) are upcast in the kernel and take the fp32 configuration.
    """
    if hidden.device.type == "cpu":
        return dict(BLOCK_N=32, BLOCK_V=128, BLOCK_H=32, UPCAST=True, PRECISION="ieee")
    dtype = hidden.dtype if hidden.dtype == weight.dtype else torch.float32
    return gpu_launch_config(dtype, torch.backends.cuda.matmul.allow_tf32, device_shared_kib(hidden.device))


# Shared memory one program may use (the opt-in maximum per block), KiB, by compute capability:
# the CUDA programming guide's table. Launches read the device's own property; this table is for
# compiling ahead of time (benchmarks/kernel_compile_report.py) and for a torch without the property.
SHARED_KIB = {(8, 0): 163, (8, 6): 99, (8, 7): 163, (8, 9): 99, (9, 0): 227, (10, 0): 227, (12, 0): 99}


def shared_memory_kib(capability: tuple[int, int]) -> int:
    return SHARED_KIB.get(tuple(capability), SHARED_KIB.get((capability[0], 0), 99))


def device_shared_kib(device: torch.device) -> int:
    """The opt-in shared memory per block of this device, KiB, from its properties."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return optin // 1024 if optin else shared_memory_kib((props.major, props.minor))


def gpu_launch_config(dtype: torch.dtype, allow_tf32: bool, shared_kib: int = 227) -> dict:
    """Tiles 64 rows × 128 vocab × BLOCK_H, 8 warps; fp32 inputs follow torch's allow_tf32 setting,
    fp16/bf16 dots run in the input dtype.

    BLOCK_H and the pipeline depth are sized to the shared memory (sizes from compiling every case
    with benchmarks/kernel_compile_report.py, which checks each configuration this returns):
    - ≥ 160 KiB (H100/H200, A100): 64-wide H steps, 3 stages; tf32 steps by 32;
    - smaller (99 KiB: RTX 30/40, A10, L4, L40): 2 stages and H steps of 32, with 32-row blocks
      for fp32 inputs (so tf32 does not spill).
    """
    fp32 = dtype == torch.float32
    tf32 = fp32 and allow_tf32
    if shared_kib >= 160:
        block_n, block_h, stages = 64, (32 if tf32 else 64), 3
    else:
        block_n, block_h, stages = (32 if fp32 else 64), 32, 2
    return dict(BLOCK_N=block_n, BLOCK_V=128, BLOCK_H=block_h, UPCAST=fp32,
                PRECISION="tf32" if tf32 else "ieee", num_warps=8, num_stages=stages)


# The backward's dlogits buffer: at most this many elements per chunk of rows on a GPU (256 MiB in
# bf16: 1024 rows at V = 128256, enough rows for the gradient GEMMs to run at full speed);
# under the interpreter 64 rows, so that the tests cross chunk edges.
DZ_CHUNK_ELEMENTS = 1 << 27
INTERPRETER_CHUNK_ROWS = 64


def chunk_rows(n_kept: int, vocab: int, cfg: dict, device: torch.device) -> int:
    """Rows per backward chunk: a multiple of BLOCK_N, at least one block, at most the kept rows."""
    if device.type == "cpu":
        rows = INTERPRETER_CHUNK_ROWS
    else:
        rows = max(cfg["BLOCK_N"], DZ_CHUNK_ELEMENTS // max(vocab, 1) // cfg["BLOCK_N"] * cfg["BLOCK_N"])
    return max(1, min(rows, n_kept))


def on_device(t: torch.Tensor):
    """Launch under the tensors' own device (Triton launches on the *current* one): cuda:1 inputs
    with device 0 current would otherwise run in the wrong context."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def kept_rows(keep: torch.Tensor) -> torch.Tensor:
    """int64 ids of the rows to compute (one host sync): masked rows get no program at all."""
    return keep.nonzero().squeeze(1)


def reduce_grads(ctx, hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cfg: dict,
                 write_dz) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d_hidden and d_weight by GEMMs over chunks of the kept rows; ``write_dz(dz, idx)`` fills the
    chunk's [len(idx), V] dlogits. Rows not kept get zero gradient; a frozen head gets no GEMM.

    The GEMMs run in the kernels' dot dtype (fp32 under the interpreter or with mixed inputs), with
    d_weight summed over chunks in fp32: deterministic, as cuBLAS is for fixed shapes.
    """
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gd = torch.float32 if cfg["UPCAST"] else hidden.dtype
    n_kept, v = rows.numel(), weight.shape[0]
    d_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_h else None
    w_g = weight.to(gd) if need_h else None  # (V, H), no copy when the dtypes agree
    acc = None  # (V, H) fp32 d_weight
    c = chunk_rows(n_kept, v, cfg, hidden.device)
    dz_buf = torch.empty(c if n_kept else 0, v, device=hidden.device, dtype=gd)  # reused per chunk
    for s in range(0, n_kept, c):
        idx = rows[s:s + c]  # (c,)
        dz = dz_buf[: idx.numel()]  # (c, V)
        write_dz(dz, idx)
        if need_h:
            d_hidden[idx] = (dz @ w_g).to(hidden.dtype)
        if need_w:
            part = dz.T @ hidden[idx].to(gd)  # (V, H)
            acc = part.float() if acc is None else acc.add_(part)
    d_weight = None
    if need_w:
        d_weight = acc.to(weight.dtype) if acc is not None else torch.zeros_like(weight)
    return d_hidden, d_weight


def check_dtypes(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise TypeError(f"triton backend: expected fp32/fp16/bf16 inputs, got {hidden.dtype} and {weight.dtype}")
    if hidden.dtype != weight.dtype and torch.float32 not in (hidden.dtype, weight.dtype):
        raise TypeError(f"triton backend: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one")


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonLogprob(torch.autograd.Function):
    """Fused linear logprob + entropy; reproduces

        z = (hidden @ weight.T).float() / T
        logprob = z.log_softmax(-1).gather(-1, target[:, None])[:, 0]
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    with both set to 0 (and no gradient, and no FLOPs) where target == ignore_index.
    """

    @staticmethod
    @_dispatch.fp32_math
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, ignore_index):
        n, hdim = hidden.shape
        v = weight.shape[0]
        keep = targets != ignore_index  # (N,)
        rows = kept_rows(keep)  # (K,)
        lp, ent, lse = (_dispatch.empty(n, device=hidden.device) for _ in range(3))  # (N,) each
        cfg = launch_config(hidden, weight)
        k = rows.numel()
        if k:
            splits, per = split_plan(k, v, cfg, hidden.device)
            part = _dispatch.empty(LP_STATS, splits, k, device=hidden.device)  # (4, S, K) partials
            with on_device(hidden):
                _logprob_fwd_kernel[(triton.cdiv(k, cfg["BLOCK_N"]), splits)](
                    hidden, weight, targets, rows, part, k, v, hdim,
                    hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), targets.stride(0),
                    1.0 / temperature, per, **cfg,
                )
                merge(_logprob_merge_kernel, part, rows, lp, ent, lse)
        lp.masked_fill_(~keep, 0.0)
        ent.masked_fill_(~keep, 0.0)
        ctx.save_for_backward(hidden, weight, targets, rows, lse, ent)
        ctx.inv_t = 1.0 / temperature
        if not return_entropy:
            ent = ent.new_empty(0)
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    @_dispatch.fp32_math
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, rows, lse, ent = ctx.saved_tensors
        n, hdim = hidden.shape
        v = weight.shape[0]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()  # (N,)
        has_ent = g_ent is not None and g_ent.numel() == n
        g_ent = g_ent.float().contiguous() if has_ent else g_lp  # (N,) placeholder when unused
        cfg = launch_config(hidden, weight)

        def write_dz(dz, idx):
            grid = (triton.cdiv(idx.numel(), cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))
            with on_device(hidden):
                _logprob_bwd_kernel[grid](
                    hidden, weight, targets, idx, lse, ent, g_lp, g_ent, dz, idx.numel(), v, hdim,
                    hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), targets.stride(0),
                    ctx.inv_t, HAS_ENT=has_ent, **cfg,
                )

        return (*reduce_grads(ctx, hidden, weight, rows, cfg, write_dz), None, None, None, None)


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
    check_dtypes(hidden, weight)
    lp, ent = TritonLogprob.apply(hidden, weight, targets, float(temperature), return_entropy, ignore_index)
    return (lp, ent) if return_entropy else lp
