"""Well-conditioned softmax statistics of one block of logits rows: logsumexp, entropy, exact KL.

The textbook forms subtract numbers the size of the logits: entropy = lse − Σ p z and
KL = Σ p (z − zq) − lse_p + lse_q. With logits near 60, fp32 rounds each term by ~4e-6, so a KL
of 7e-7 between near-identical models came back as −9.5e-7, and an entropy of 3e-4 lost 1.6 %.
The forms here only add terms of one sign, or subtract numbers the size of the answer:

* entropy = log1p(s1) + Σ w (m − z) / s,   m = max z, w = e^{z−m}, s = Σ w, s1 = s − 1 summed
  without the largest term (the 1), so log1p(s1) keeps its precision at low entropy. Every term ≥ 0.
* KL with the centre c = m_p − m_q and x_j = c − (z_j − zq_j):
      u = Σ w_p x / s_p,   v = Σ w_p φ(x) / s_p,   φ(x) = e^x − 1 − x ≥ 0,
      KL = log(s_q / s_p) − u = log1p(u + v) − u          (since w_p e^x = w_q exactly).
  u and v are the size of the logit differences, so near-identical models lose nothing to the
  logits' size. The φ pass runs on the rows where every x ≤ 1 (e^x ≤ e: no overflow); a row with
  some x > 1 — models that differ by more than a nat somewhere — takes log s_q − log s_p − u, whose
  rounding (~eps·log V ≈ 1e-6) is that of the answer's own terms, and so does a row whose
  s_q / s_p is far from 1 (|u + v| > 0.5): the φ pass is then not worth its cost (a distant pair of
  models pays 6 elementwise passes, as the textbook form does). KL ≥ 0 is then exact up to rounding of size eps·|u|; the final
  max(·, 0) removes only that (the last-resort clamp, which the tests show changes nothing
  beyond 1e-9 on near-identical models).
* its gradient: dKL/dz_j = p_j (d_j − d̄) with d = z − zq, d̄ = Σ p d = c − u (saved as ``dbar``).
The Triton kernels (``triton_logprob.py``, ``triton_kl.py``) compute the same quantities online,
tile by tile; this is the torch path's version (a block of whole rows at once).
"""
from __future__ import annotations

import torch

# below this |x|, φ(x) = e^x − 1 − x comes from its Taylor series (relative error < 1e-7 at 0.5)
PHI_SERIES = 0.5


def phi(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = e^x − 1 − x (≥ 0), accurate to a few ulp relative to itself for x ≤ 1."""
    series = x * x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (1 / 720 + x * (1 / 5040 + x / 40320))))))
    return torch.where(x.abs() < PHI_SERIES, series, torch.exp(x) - 1 - x).clamp_min_(0)


def softmax_stats(z: torch.Tensor, entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(m, log s, entropy) of each row of ``z``: lse = m + log s, and log p(t) = (z_t − m) − log s
    keeps its precision near 0; entropy from shifted, one-signed sums (module docstring).

    Shapes: z (rows, V) -> m (rows,), log_s (rows,), entropy (rows,) or None.
    """
    if not entropy:
        m = z.amax(-1, keepdim=True)  # (rows, 1)
        return m[:, 0], torch.sub(z, m).exp_().sum(-1).log_(), None
    m, arg = z.max(dim=-1, keepdim=True)  # (rows, 1) each
    gap = torch.sub(m, z)  # (rows, V) m − z ≥ 0
    w = torch.neg(gap).exp_()  # (rows, V) e^{z−m}
    a = torch.linalg.vecdot(w, gap)  # (rows,) Σ w (m − z)
    s1 = w.scatter_(1, arg, 0.0).sum(-1)  # (rows,) Σ w without the largest term
    log_s = torch.log1p(s1)
    return m[:, 0], log_s, log_s + a / (1 + s1)


def kl_stats(zp: torch.Tensor, zq: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(lse_p, lse_q, kl, dbar) of each row pair; KL(softmax(zp) ‖ softmax(zq)) in the centred form.

    Shapes: zp, zq (rows, V) -> four (rows,) tensors; dbar = Σ p (zp − zq).
    """
    mp, mq = zp.amax(-1, keepdim=True), zq.amax(-1, keepdim=True)  # (rows, 1)
    wp = (zp - mp).exp_()  # (rows, V), ≤ 1
    sp = wp.sum(-1)  # (rows,)
    c = mp - mq  # (rows, 1) the centre
    x = zq.sub(zp).add_(c)  # (rows, V) x = c − (zp − zq)
    u = torch.linalg.vecdot(wp, x) / sp  # (rows,)
    near = x.amax(-1) <= 1  # (rows,) near-identical rows: add the one-signed φ term, no overflow possible
    if bool(near.all()):  # the common case: s_q = s_p (1 + u + v), so the reference's exp pass is not needed
        r = u + torch.linalg.vecdot(wp, torch.special.expm1(x).sub_(x)) / sp  # (rows,) s_q / s_p − 1
        if bool((r.abs() <= 0.5).all()):
            log_ratio = torch.log1p(r)
            lse_p = mp[:, 0] + torch.log(sp)
            return lse_p, lse_p - c[:, 0] + log_ratio, (log_ratio - u).clamp_min(0), c[:, 0] - u
    sq = (zq - mq).exp_().sum(-1)  # (rows,)
    log_ratio = torch.log(sq) - torch.log(sp)  # (rows,)
    kl = log_ratio - u  # (rows,) the centred textbook form: rows where the models differ (some x > 1)
    if bool(near.any()):
        xn, wpn = x[near], wp[near]  # (rows', V) each
        un = u[near]
        r = un + torch.linalg.vecdot(wpn, torch.special.expm1(xn).sub_(xn)) / sp[near]  # (rows',)
        kl = kl.masked_scatter(near, torch.where(r.abs() <= 0.5, torch.log1p(r), log_ratio[near]) - un)
    kl = kl.clamp_min(0)
    return mp[:, 0] + torch.log(sp), mq[:, 0] + torch.log(sq), kl, c[:, 0] - u
