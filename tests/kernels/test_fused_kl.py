"""kernels/triton_kl.py: exact full-vocabulary KL from hidden states (Triton, interpreter on CPU)."""
import pytest
import torch
from kernel_cases import DTYPES, LAYOUTS, TEMPERATURE, check_kl, grads_of, make_inputs

from kernels import fused_kl


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_triton_kl_matches_float64(layout, dtype_name):
    case = make_inputs(layout, DTYPES[dtype_name])

    def fn(h, w):
        return fused_kl(h, w, case["ref_hidden"], case["ref_weight"], TEMPERATURE, "triton")

    got = grads_of(fn, case["hidden"], case["weight"], case["g_kl"])
    assert got[1].dtype == DTYPES[dtype_name]
    check_kl(got, case, dtype_name)


def test_kl_gradient_formula_matches_autograd():
    """dKL/dz_j = p_j ((z_j - zq_j) - (lse_p - lse_q) - KL), the formula both backwards use."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 50, generator=g, dtype=torch.float64).requires_grad_()
    zq = torch.randn(6, 50, generator=g, dtype=torch.float64)
    lp, lq = z.log_softmax(-1), zq.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    (auto,) = torch.autograd.grad(kl.sum(), z)
    p = lp.exp().detach()
    lse_p, lse_q = z.detach().logsumexp(-1, keepdim=True), zq.logsumexp(-1, keepdim=True)
    formula = p * ((z.detach() - zq) - (lse_p - lse_q) - kl.detach()[:, None])
    torch.testing.assert_close(formula, auto, atol=1e-12, rtol=1e-10)


def test_triton_kl_of_a_model_with_itself_is_zero():
    case = make_inputs("weird", torch.float32)
    h = case["hidden"].detach().requires_grad_()
    kl = fused_kl(h, case["weight"], case["hidden"], case["weight"], TEMPERATURE, "triton")
    kl.sum().backward()
    assert kl.abs().max() < 1e-5 and h.grad.abs().max() < 1e-5


def test_triton_kl_frozen_weight_matches_torch():
    """NEED_W=False branch; the reference side gets no gradient on either backend."""
    case = make_inputs("strided", torch.float32)
    out = {}
    for backend in ("torch", "triton"):
        h = case["hidden"].detach().requires_grad_()
        rh = case["ref_hidden"].detach().requires_grad_()
        kl = fused_kl(h, case["weight"], rh, case["ref_weight"], TEMPERATURE, backend)
        (kl.double() * case["g_kl"]).sum().backward()
        assert rh.grad is None
        out[backend] = (kl, h.grad)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], atol=1e-5, rtol=1e-4)
