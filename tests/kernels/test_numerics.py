"""kernels/stable_stats.py and its online twin in the Triton kernels: KL ≥ 0 and within 1e-6 of
float64 on near-identical models, entropy accurate at low entropy, on both backends.

Each case first shows that the textbook fp32 form (Σ p (z − zq) − lse_p + lse_q; lse − Σ p z)
misses the bound on the same inputs, so a pass means the new form, not an easy case.
"""
import pytest
import torch
from kernel_cases import DEVICE

from kernels import fused_kl, fused_logprobs, fused_logprobs_kl

BACKENDS = ["torch", "triton"]


def _models(n: int, h: int, v: int, offset: float, seed: int = 0):
    """fp32 hidden [n, h] and head [v, h] whose logits are offset + N(0, 4): column 0 of hidden is 1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    hidden[:, 0] = 1.0
    weight = torch.randn(v, h, generator=g) * 2 / h**0.5
    weight[:, 0] = offset
    return hidden, weight, g


def _float64_kl(h, w, rh, rw, t=1.0):
    lp = (h.double() @ w.double().T / t).log_softmax(-1)
    lq = (rh.double() @ rw.double().T / t).log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_textbook_kl_is_wrong_on_near_identical_models():
    """The case the tests below use: logits near 60, reference head 1e-3 away (KL ~ 1e-5)."""
    h, w, g = _models(40, 64, 1271, 60.0)
    rw = w + 1e-3 * torch.randn(w.shape, generator=g)
    zp, zq = h @ w.T, h @ rw.T
    textbook = (zp.softmax(-1) * (zp - zq)).sum(-1) - zp.logsumexp(-1) + zq.logsumexp(-1)
    assert (textbook.double() - _float64_kl(h, w, h, rw)).abs().max() > 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_of_near_identical_models_within_1e6_of_float64(backend):
    h, w, g = _models(40, 64, 1271, 60.0)
    rw = w + 1e-3 * torch.randn(w.shape, generator=g)
    want = _float64_kl(h, w, h, rw)
    kl = fused_kl(h.to(DEVICE), w.to(DEVICE), h.to(DEVICE), rw.to(DEVICE), backend=backend).cpu()
    assert (kl >= 0).all()
    assert (kl.double() - want).abs().max() <= 1e-6
    _, _, kl_one_pass = fused_logprobs_kl(h.to(DEVICE), w.to(DEVICE), h.to(DEVICE), rw.to(DEVICE),
                                          torch.zeros(40, dtype=torch.long, device=DEVICE), backend=backend)
    assert (kl_one_pass.cpu().double() - want).abs().max() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_of_a_model_and_its_shift_is_zero(backend):
    """A constant added to every reference logit changes no probability: the KL is 0 up to the
    logits' own rounding (~4e-6 each, hence ~1e-11 of KL), where the textbook form gives ~1e-6."""
    h, w, _ = _models(37, 48, 1271, 60.0)
    rh = h.clone()
    rh[:, 0] = 1.25  # every reference logit + 0.25 · 60 = + 15, exactly representable
    hd = h.to(DEVICE).requires_grad_()
    kl = fused_kl(hd, w.to(DEVICE), rh.to(DEVICE), w.to(DEVICE), backend=backend)
    kl.sum().backward()
    assert (kl >= 0).all() and kl.max() < 1e-9
    assert hd.grad.abs().max() < 1e-4  # d_j − d̄ is logit rounding (~4e-6) times |W| ≤ 60


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_of_distant_models_at_low_temperature(backend):
    """T = 0.1 makes the KL large (tens of nats): the direct form takes over, nothing overflows."""
    h, w, g = _models(37, 48, 1271, 0.0)
    rh, rw = torch.randn(h.shape, generator=g), torch.randn(w.shape, generator=g) * 2 / 48**0.5
    want = _float64_kl(h, w, rh, rw, 0.1)
    kl = fused_kl(h.to(DEVICE), w.to(DEVICE), rh.to(DEVICE), rw.to(DEVICE), 0.1, backend).cpu()
    assert want.min() > 5 and torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), want, rtol=2e-5, atol=1e-5)


def _peaked(n: int = 37, v: int = 1271):
    """Logits near 50 with token 5 about 24 above the rest: entropy ~ 1e-7 .. 1e-3."""
    h, w, _ = _models(n, 48, v, 50.0)
    hidden = h.clone()
    hidden[:, 1] = 1.0
    w = w.clone()
    w[:, 1] = 0.0
    w[5, 1] = 24.0
    return hidden, w


def _float64_entropy(h, w):
    logp = (h.double() @ w.double().T).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1), logp


def test_textbook_entropy_is_wrong_at_low_entropy():
    h, w = _peaked()
    want, _ = _float64_entropy(h, w)
    z = h @ w.T
    textbook = z.logsumexp(-1) - (z.softmax(-1) * z).sum(-1)
    assert want.max() < 2e-3 and want.min() > 1e-8 and ((textbook.double() - want) / want).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_and_logprob_accurate_at_low_entropy(backend):
    h, w = _peaked()
    want, logp = _float64_entropy(h, w)
    targets = torch.full((h.shape[0],), 5)
    lp, ent = fused_logprobs(h.to(DEVICE), w.to(DEVICE), targets.to(DEVICE), return_entropy=True, backend=backend)
    assert ((ent.cpu().double() - want) / want).abs().max() < 1e-4
    torch.testing.assert_close(lp.cpu().double(), logp[:, 5], rtol=1e-4, atol=1e-9)
