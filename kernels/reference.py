"""Torch reference for logprob / entropy / KL computed from hidden states.

Two flavours of the same math, both used by tests and benchmarks:

* ``logprobs_naive`` / ``kl_naive`` materialize the full ``[N, V]`` logits (what HF/TRL do).
  Tests call them in float64 as the ground truth.
* ``chunked_logprobs`` / ``chunked_kl`` walk over row chunks so that at most ``chunk * V``
  logits exist at once, in forward *and* backward (the backward recomputes each chunk's
  logits instead of saving them). This is the CPU fallback the PPO code runs;
  ``chunked_logprobs_kl`` is the rollout's no-grad pass giving both sides' logprobs and the KL.

Math (z = hidden @ weight.T / T, one row):
    lse      = log Σ_j exp(z_j)
    logprob  = z_target - lse
    entropy  = lse - Σ_j p_j z_j,             p = softmax(z)
    KL(p‖q)  = Σ_j p_j (z_j - zq_j) - lse + lse_q
computed in the forms of ``stable_stats.py`` (no term the size of the logits is subtracted), and
the gradients reduced with GEMMs per chunk (deterministic). Masked rows are skipped entirely.
References: Cut Cross-Entropy (Wijmans et al. 2024) for the recompute-in-backward idea;
Schulman, "Approximating KL divergence" for why the exact KL is worth having.
"""
from __future__ import annotations

import torch

from kernels import _dispatch
from kernels.stable_stats import kl_stats, softmax_stats

# ~8M fp32 logits (32 MB) per chunk, and never fewer than MIN_CHUNK_ROWS rows: every chunk streams
# the whole weight through its GEMMs, which stay bound by reading W (not by FLOPs) below ~256 rows
# (measured on CPU at V=50k: 83-row chunks ran 1.4x slower than 256-row ones).
CHUNK_ELEMENTS = 1 << 23
MIN_CHUNK_ROWS = 256
# The elementwise work on a chunk's logits (logsumexp, softmax, dlogits) runs over row blocks of
# ~1M elements, so its temporaries are 4 MB instead of another chunk×V buffer each: the GEMMs keep
# their big chunk, and the peak is one chunk of logits (two for KL) plus d_weight.
BLOCK_ELEMENTS = 1 << 20


def _chunk_rows(n_rows: int, vocab: int, chunk_size: int | None) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS logits, at least MIN_CHUNK_ROWS rows (or chunk_size)."""
    if chunk_size is None:
        chunk_size = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1))
    return max(1, min(chunk_size, max(n_rows, 1)))


def _row_blocks(n_rows: int, vocab: int):
    """Slices of about BLOCK_ELEMENTS logits covering ``n_rows`` rows."""
    step = max(1, BLOCK_ELEMENTS // max(vocab, 1))
    return (slice(r, min(r + step, n_rows)) for r in range(0, n_rows, step))


def _chunks(keep: torch.Tensor, chunk: int):
    """Index objects for the kept rows, ``chunk`` at a time: slices when every row is kept, else
    index tensors, so that masked rows cost no FLOPs."""
    n = keep.numel()
    rows = None if bool(keep.all()) else keep.nonzero().squeeze(1)  # (kept,) one host sync
    total = n if rows is None else rows.numel()
    for s in range(0, total, chunk):
        e = min(s + chunk, total)
        yield slice(s, e) if rows is None else rows[s:e]


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: float32, or float64 for float64 inputs (gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _logits(hidden: torch.Tensor, weight32: torch.Tensor, inv_t: float) -> torch.Tensor:
    """Accumulation-dtype logits of one chunk: (hidden @ weight.T) / T."""
    return (_acc(hidden) @ weight32.T).mul_(inv_t)  # (c, V)


def _grad_buffers(ctx, hidden: torch.Tensor, w32: torch.Tensor, dense: bool):
    """d_hidden (N, H) and the d_weight accumulator (V, H) where needed; skipped rows keep 0."""
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    alloc = _dispatch.empty if dense else torch.zeros
    d_hidden = alloc(*hidden.shape, device=hidden.device, dtype=w32.dtype) if need_h else None
    return d_hidden, torch.zeros_like(w32) if need_w else None


def _reduce_grads(dz: torch.Tensor, idx, hidden, w32, d_hidden, d_weight) -> None:
    """d_hidden[idx] = dz @ W and d_weight += dz^T @ hidden[idx]: GEMMs, deterministic."""
    if d_hidden is not None:
        d_hidden[idx] = dz @ w32
    if d_weight is not None:
        d_weight.addmm_(dz.T, _acc(hidden[idx]))


def _cast_grads(d_hidden, d_weight, hidden, weight):
    return (d_hidden.to(hidden.dtype) if d_hidden is not None else None,
            d_weight.to(weight.dtype) if d_weight is not None else None)


class _ChunkedLogprob(torch.autograd.Function):
    """Chunked logprob (+ entropy); reproduces, row by row,

        z = (hidden @ weight.T).float() / T
        logprob = z.log_softmax(-1).gather(-1, target)     # 0 where target == ignore_index
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    Rows whose target is ``ignore_index`` are skipped (no FLOPs, no gradient).
    """

    @staticmethod
    @_dispatch.fp32_math
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, ignore_index, chunk_size):
        n, v = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / temperature
        w32 = _acc(weight)  # (V, H) no copy for fp32 inputs
        valid = targets != ignore_index  # (N,)
        safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()  # (N,)
        lse = torch.zeros(n, device=hidden.device, dtype=w32.dtype)  # (N,) 0 on skipped rows
        ent = torch.zeros_like(lse)  # (N,) entropy, also saved for its gradient
        logprobs = torch.zeros_like(lse)  # (N,)
        c = _chunk_rows(n, v, chunk_size)
        for idx in _chunks(valid, c):
            z = _logits(hidden[idx], w32, inv_t)  # (c, V)
            st = torch.empty(3, z.shape[0], device=z.device, dtype=z.dtype)  # (3, c): m, log s, entropy
            for b in _row_blocks(z.shape[0], v):
                m, log_s, e = softmax_stats(z[b], return_entropy)
                st[0, b], st[1, b] = m, log_s
                if return_entropy:
                    st[2, b] = e
            lse[idx], ent[idx] = st[0] + st[1], st[2]
            logprobs[idx] = (z.gather(1, safe_t[idx, None]).squeeze(1) - st[0]) - st[1]
            del z  # before the next chunk's GEMM allocates its own
        entropy = ent if return_entropy else logprobs.new_empty(0)
        if not return_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, safe_t, valid, lse, ent)
        ctx.inv_t, ctx.chunk = inv_t, c
        return logprobs, entropy

    @staticmethod
    @_dispatch.fp32_math
    def backward(ctx, g_lp, g_ent):
        hidden, weight, safe_t, valid, lse, ent = ctx.saved_tensors
        inv_t, c, v = ctx.inv_t, ctx.chunk, weight.shape[0]
        w32 = _acc(weight)  # (V, H)
        g_lp = g_lp.to(lse.dtype) if g_lp is not None else torch.zeros_like(lse)  # (N,)
        g_ent = g_ent.to(lse.dtype) if g_ent is not None and g_ent.numel() == lse.numel() else None  # (N,)
        d_hidden, d_weight = _grad_buffers(ctx, hidden, w32, bool(valid.all()))
        for idx in _chunks(valid, c):
            dz = _logits(hidden[idx], w32, inv_t)  # (c, V) logits z, turned into dz in place
            lse_c, g_lp_c = lse[idx, None], g_lp[idx, None]  # (c, 1) each
            for b in _row_blocks(dz.shape[0], v):
                z = dz[b]  # view
                p = (z - lse_c[b]).exp_()  # (rows, V) block temporary
                # dlogprob/dz = onehot - p ; dentropy/dz = -p (log p + entropy)
                if g_ent is not None:
                    z.sub_(lse_c[b]).add_(ent[idx, None][b]).mul_(-g_ent[idx, None][b]).sub_(g_lp_c[b]).mul_(p)
                else:
                    torch.mul(p, -g_lp_c[b], out=z)
                del z, p  # a live view would keep the whole chunk of logits allocated
            dz.scatter_add_(1, safe_t[idx, None], g_lp_c)
            dz.mul_(inv_t)  # chain rule through z = logits / T
            _reduce_grads(dz, idx, hidden, w32, d_hidden, d_weight)
            del dz
        return (*_cast_grads(d_hidden, d_weight, hidden, weight), None, None, None, None, None)


def _kl_pass(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
             inv_t: float, chunk: int, keep: torch.Tensor,
             safe_targets: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """One pass over chunks of the kept rows of both models' logits: (lse_p, kl, dbar, logp[target],
    logq[target]), each (N,) and 0 on rows not kept; the last two only with ``safe_targets``."""
    n, v = hidden.shape[0], weight.shape[0]
    w32, rw32 = _acc(weight), _acc(ref_weight)  # (V, H) each
    lse_p, kl, dbar = (torch.zeros(n, device=hidden.device, dtype=w32.dtype) for _ in range(3))  # (N,)
    lp = lq = None
    if safe_targets is not None:
        lp, lq = torch.zeros_like(kl), torch.zeros_like(kl)  # (N,) each
    for idx in _chunks(keep, chunk):
        zp = _logits(hidden[idx], w32, inv_t)  # (c, V)
        zq = _logits(ref_hidden[idx], rw32, inv_t)  # (c, V)
        out = torch.empty(4, zp.shape[0], device=zp.device, dtype=zp.dtype)  # lse_p, lse_q, kl, dbar
        for b in _row_blocks(zp.shape[0], v):
            out[:, b] = torch.stack(kl_stats(zp[b], zq[b]))
        lse_p[idx], kl[idx], dbar[idx] = out[0], out[2], out[3]
        if safe_targets is not None:
            lp[idx] = zp.gather(1, safe_targets[idx, None]).squeeze(1) - out[0]
            lq[idx] = zq.gather(1, safe_targets[idx, None]).squeeze(1) - out[1]
        del zp, zq
    return lse_p, kl, dbar, lp, lq


class _ChunkedKL(torch.autograd.Function):
    """Chunked exact KL(π‖π_ref); reproduces, row by row,

        lp, lq = (h @ W.T / T).log_softmax(-1), (h_ref @ W_ref.T / T).log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)            # 0 where mask is False
    Gradients flow to the policy side only (hidden, weight); the reference side is a constant.
    """

    @staticmethod
    @_dispatch.fp32_math
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, temperature, chunk_size, mask):
        inv_t = 1.0 / temperature
        c = _chunk_rows(hidden.shape[0], weight.shape[0], chunk_size)
        lse_p, kl, dbar, _, _ = _kl_pass(hidden, weight, ref_hidden, ref_weight, inv_t, c, mask)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, lse_p, dbar, mask)
        ctx.inv_t, ctx.chunk = inv_t, c
        return kl

    @staticmethod
    @_dispatch.fp32_math
    def backward(ctx, g_kl):
        hidden, weight, ref_hidden, ref_weight, lse_p, dbar, mask = ctx.saved_tensors
        inv_t, c, v = ctx.inv_t, ctx.chunk, weight.shape[0]
        w32, rw32 = _acc(weight), _acc(ref_weight)  # (V, H) each
        g = g_kl.to(lse_p.dtype)  # (N,)
        d_hidden, d_weight = _grad_buffers(ctx, hidden, w32, bool(mask.all()))
        for idx in _chunks(mask, c):
            dz = _logits(hidden[idx], w32, inv_t)  # (c, V) policy logits zp, turned into dz in place
            zq = _logits(ref_hidden[idx], rw32, inv_t)  # (c, V)
            # dKL/dz_j = p_j (d_j - d̄), d = zp - zq, d̄ = Σ p d
            lp_c, dbar_c, scale = lse_p[idx, None], dbar[idx, None], g[idx, None] * inv_t  # (c, 1) each
            for b in _row_blocks(dz.shape[0], v):
                zp = dz[b]  # view
                p = (zp - lp_c[b]).exp_()  # (rows, V) block temporary
                zp.sub_(zq[b]).sub_(dbar_c[b]).mul_(p).mul_(scale[b])
                del zp, p  # a live view would keep the whole chunk of logits allocated
            del zq
            _reduce_grads(dz, idx, hidden, w32, d_hidden, d_weight)
            del dz
        return (*_cast_grads(d_hidden, d_weight, hidden, weight), None, None, None, None, None)


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token logprob (and entropy) from hidden states, never holding more than chunk×V logits.

    Formula: z = hidden @ weight.T / T; logprob = z[target] - logsumexp(z);
    entropy = logsumexp(z) - Σ softmax(z)·z. Accumulates in float32.

    Args:
        hidden: final hidden states (any float dtype, any strides).
        weight: LM-head weight.
        targets: token ids; rows equal to ``ignore_index`` give 0 (logprob and entropy) and no gradient.
        temperature: sampling temperature T (> 0) dividing the logits.
        return_entropy: also return the entropy of softmax(z).
        ignore_index: target value marking rows to skip.
        chunk_size: rows per chunk (default: ~8M logits per chunk, at least 256 rows).
    Shapes:
        hidden [N, H], weight [V, H], targets [N] -> logprobs [N], entropy [N]
    Returns:
        float32 ``logprobs`` or ``(logprobs, entropy)`` (float64 for float64 inputs);
        differentiable w.r.t. hidden and weight (backward recomputes each chunk's logits,
        so its memory is also O(chunk×V)).
    """
    lp, ent = _ChunkedLogprob.apply(
        hidden, weight, targets, float(temperature), return_entropy, ignore_index, chunk_size
    )
    return (lp, ent) if return_entropy else lp


def chunked_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact per-token KL(π‖π_ref) over the full vocabulary, chunked over rows.

    Formula: KL = Σ_j p_j (z_j - zq_j) - lse(z) + lse(zq), z = hidden @ weight.T / T,
    zq = ref_hidden @ ref_weight.T / T, p = softmax(z). Accumulates in float32.

    Args:
        hidden, weight: policy hidden states and LM head (differentiable).
        ref_hidden, ref_weight: reference-model hidden states and LM head (treated as constants).
        temperature: T dividing both sides' logits.
        chunk_size: rows per chunk (default: ~8M logits per chunk, at least 256 rows).
        mask: bool [N]; rows where it is False give 0 and no gradient, at no cost (None: all rows).
    Shapes:
        hidden/ref_hidden [N, H] (H may differ between the two), weight/ref_weight [V, H] -> kl [N]
    Returns:
        float32 ``kl`` [N] (float64 for float64 inputs), ≥ 0; gradients flow to hidden and weight only.
    """
    keep = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    return _ChunkedKL.apply(hidden, weight, ref_hidden, ref_weight, float(temperature), chunk_size, keep)


@torch.no_grad()
def chunked_logprobs_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log π(target), log π_ref(target) and the exact KL(π‖π_ref) per row in one pass over the
    vocabulary, chunked over rows: the rollout's scoring (no gradient).

    Formula: z, zq as in :func:`chunked_kl`; logprob = z[target] - lse(z), ref_logprob =
    zq[target] - lse(zq), KL = Σ_j p_j (z_j - zq_j) - lse(z) + lse(zq). Accumulates in float32.
    Equals ``chunked_logprobs`` on each side and ``chunked_kl``, for the cost of one sweep.

    Shapes: hidden [N, H], weight [V, H], ref_hidden [N, H'], ref_weight [V, H'], targets [N]
        -> (logprobs [N], ref_logprobs [N], kl [N]); the logprobs are 0 where target == ignore_index.
    """
    valid = targets != ignore_index  # (N,)
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()  # (N,)
    c = _chunk_rows(hidden.shape[0], weight.shape[0], chunk_size)
    keep = torch.ones_like(valid)  # the KL of ignored rows is computed all the same
    _, kl, _, lp, lq = _kl_pass(hidden, weight, ref_hidden, ref_weight, 1.0 / temperature, c, keep, safe_t)
    return torch.where(valid, lp, 0.0), torch.where(valid, lq, 0.0), kl


def logprobs_naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialized-logits logprob and entropy (plain autograd) — the ground truth for tests.

    Computes in ``promote(dtype, float32)``: float64 in gives float64 out.
    Shapes: hidden [N, H], weight [V, H], targets [N] -> (logprobs [N], entropy [N]).
    Returns: (logprobs, entropy); both 0 on rows where target == ignore_index.
    """
    dt = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden.to(dt) @ weight.to(dt).T) / temperature  # (N, V)
    logp = logits.log_softmax(-1)  # (N, V)
    valid = targets != ignore_index  # (N,)
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()  # (N,)
    lp = logp.gather(1, safe_t[:, None]).squeeze(1)  # (N,)
    ent = -(logp.exp() * logp).sum(-1)  # (N,)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def kl_naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Materialized-logits exact KL(π‖π_ref) = Σ p (log p - log q) — the ground truth for tests.

    Computes in ``promote(dtype, float32)``; the reference side is detached (a constant).
    Shapes: hidden [N, H], weight [V, H], ref_hidden [N, H'], ref_weight [V, H'] -> kl [N].
    """
    dt = torch.promote_types(hidden.dtype, torch.float32)
    logp = ((hidden.to(dt) @ weight.to(dt).T) / temperature).log_softmax(-1)  # (N, V)
    with torch.no_grad():
        logq = ((ref_hidden.to(dt) @ ref_weight.to(dt).T) / temperature).log_softmax(-1)  # (N, V)
    return (logp.exp() * (logp - logq)).sum(-1)
