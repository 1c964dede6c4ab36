"""kernels.fused_logprobs_kl: the rollout's one pass (both logprobs + exact KL) equals the three
separate calls and the float64 ground truth, on the torch reference and the Triton kernel."""
import pytest
import torch
from kernel_cases import DTYPES, IGNORE, LAYOUTS, TEMPERATURE, TOL, assert_forward, make_inputs

from kernels import fused_kl, fused_logprobs, fused_logprobs_kl, kl_naive, logprobs_naive


def one_pass(case, backend):
    return fused_logprobs_kl(case["hidden"], case["weight"], case["ref_hidden"], case["ref_weight"],
                             case["targets"], TEMPERATURE, backend, IGNORE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_pass_matches_float64(layout, dtype_name, backend):
    case = make_inputs(layout, DTYPES[dtype_name])
    lp, lq, kl = one_pass(case, backend)
    d = {k: v.double() for k, v in case.items() if v.is_floating_point()}
    want_lp, _ = logprobs_naive(d["hidden"], d["weight"], case["targets"], TEMPERATURE, IGNORE)
    want_lq, _ = logprobs_naive(d["ref_hidden"], d["ref_weight"], case["targets"], TEMPERATURE, IGNORE)
    want_kl = kl_naive(d["hidden"], d["weight"], d["ref_hidden"], d["ref_weight"], TEMPERATURE)
    ignored = case["targets"] == IGNORE
    assert (lp[ignored] == 0).all() and (lq[ignored] == 0).all()
    for got, want in ((lp, want_lp), (lq, want_lq), (kl, want_kl)):
        assert_forward(got, want, dtype_name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_pass_equals_the_three_calls(backend):
    """The same numbers as two fused_logprobs calls and one fused_kl call (fp32, same backend)."""
    case = make_inputs("weird", torch.float32, seed=4)
    lp, lq, kl = one_pass(case, backend)
    sep_lp = fused_logprobs(case["hidden"], case["weight"], case["targets"], TEMPERATURE, backend=backend)
    sep_lq = fused_logprobs(case["ref_hidden"], case["ref_weight"], case["targets"], TEMPERATURE, backend=backend)
    sep_kl = fused_kl(case["hidden"], case["weight"], case["ref_hidden"], case["ref_weight"], TEMPERATURE, backend)
    atol = TOL["fp32"][0] / 10
    torch.testing.assert_close(lp, sep_lp, atol=atol, rtol=atol)
    torch.testing.assert_close(lq, sep_lq, atol=atol, rtol=atol)
    torch.testing.assert_close(kl, sep_kl, atol=atol, rtol=atol)


def test_one_pass_of_a_model_with_itself():
    case = make_inputs("strided", torch.float32)
    for backend in ("torch", "triton"):
        lp, lq, kl = fused_logprobs_kl(case["hidden"], case["weight"], case["hidden"], case["weight"],
                                       case["targets"], TEMPERATURE, backend, IGNORE)
        assert torch.equal(lp, lq) and kl.abs().max() < 1e-5


def test_one_pass_is_not_differentiable_and_checks_shapes():
    case = make_inputs("tiny", torch.float32)
    h = case["hidden"].detach().requires_grad_()
    lp, lq, kl = fused_logprobs_kl(h, case["weight"], case["ref_hidden"], case["ref_weight"], case["targets"])
    assert not (lp.requires_grad or lq.requires_grad or kl.requires_grad)  # rollout scoring: no graph
    with pytest.raises(ValueError, match="targets must be"):
        fused_logprobs_kl(h, case["weight"], case["ref_hidden"], case["ref_weight"], case["targets"][:1])
    with pytest.raises(ValueError, match="share N and V"):
        fused_logprobs_kl(h, case["weight"], case["ref_hidden"][:1], case["ref_weight"], case["targets"])
